"""What a training run is asked to do, in one place: the options grouped by what they act on,
the recipes, the ``auto`` policy, and every refusal of a combination that means nothing.

Only the standard library is imported here (the data module loads inside functions), so the
``train`` command's ``--help`` can show the recipes' values without loading torch.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
import dataclasses
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from stn_deploy.errors import StnDeployError

RECIPES: dict[str, dict[str, Any]] = {
    # The seed design: SGD + one-cycle, no augmentation. The STN learns at a tenth of the
    # rate: at the full peak rate theta ran away on CIFAR-10 and on RTS digits (test accuracy
    # fell to chance), a known STN instability.
    "seed": dict(epochs=10, lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4,
                 label_smoothing=0.0, augment=False, stn_lr_scale=0.1, batch_size=64,
                 dropout=0.05),
    # Same model, a stronger recipe: crop+flip and label smoothing instead of dropout. The
    # 145k-parameter model underfits once augmented (train accuracy below test accuracy with
    # dropout 0.05), and on the CPU dropout's random masks cost a third of each step.
    # The STN: without being told what to undo, every CIFAR-10 run collapsed to a constant
    # theta (benchmarks/results/archive/cifar_stn_probes.md); a quarter of each batch RTS-distorted,
    # the pose loss on it and the STN on its own AdamW without decay kept it transforming
    # (71% of the rotation undone on the RTS-distorted test split) at 84.73% after 130
    # epochs, where the collapsed STN's run reached 84.41%.
    "improved": dict(epochs=10, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                     label_smoothing=0.1, augment=True, stn_lr_scale=0.1, batch_size=64,
                     dropout=0.0, rts_augment=0.25, stn_pose_loss=1.0, stn_optimizer="adam",
                     stn_lr=1e-3, stn_weight_decay=0.0),
    # The recipe of the shipped CIFAR-10 model (stn_deploy/pretrained/cifar10-stn.md): the
    # improved recipe for 300 epochs, the model underfitting at 130 (train accuracy 86.7%,
    # test 84.73%), and the weights averaged (--ema 0.999, the average is what is measured and
    # shipped; each epoch also records the raw weights' accuracy, the run without it).
    # benchmarks/cifar10_recipe.py trains it and writes the curve and the ablations.
    "cifar10-stn": dict(epochs=300, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                        label_smoothing=0.1, augment=True, stn_lr_scale=0.1, batch_size=64,
                        dropout=0.0, rts_augment=0.25, stn_pose_loss=1.0,
                        stn_optimizer="adam", stn_lr=1e-3, stn_weight_decay=0.0, ema=0.999),
    # Distorted data (--distort rts): what kept the STN transforming in
    # benchmarks/stn_recipes.py. Under the seed recipe theta collapsed or undid 2-24% of the
    # rotation; AdamW with the STN without weight decay, and a fresh distortion of every image
    # each epoch, undid 60-70% (with --loc-net large) on two seeds in three. A quarter of each
    # epoch's images left upright (a pose to map to) made it take off on all three. The STN
    # learns at the full rate: at 3x it ran away on a 30-epoch Fashion-MNIST schedule, and on
    # the digits 1x undoes as much as 3x did (two passes, 3 seeds: 66% / 64% of rotation /
    # scale against 67% / 61%). Once the STN has taken off (training thetas spread 2 px), a
    # charge on the warp (0.1): without it one Fashion-MNIST seed in three turned clothes and
    # footwear to poses of their own, undoing 33% of the rotation; charged from the first
    # step, one digits seed took off late and undid 37% of the scale. Charged per image (0.1)
    # that seed still undid 59%, and twice that cost scale: the charge is on each class's mean
    # warp (0.3), which a class's own pose pays and the undoing does not (Fashion-MNIST 3
    # seeds: 68-74% of the rotation undone; docs/training.md, "Keeping the STN alive").
    # 20 epochs: on the digits the STN takes off between epochs 5 and 8 and has undone about
    # two thirds of the rotation and scale by epoch 20 (about 2 minutes on 2 cores).
    "rts": dict(epochs=20, optimizer="adam", lr=1e-3, weight_decay=1e-4, stn_weight_decay=0.0,
                stn_lr_scale=1.0, redistort=True, clean_fraction=0.25, label_smoothing=0.0,
                augment=False, batch_size=64, dropout=0.05, stn_warp_penalty=0.3,
                stn_warp_from_px=2.0, stn_warp_per_class=True),
}
# stn_deploy.data.DISTORTIONS, which loads torch; tests/test_data.py holds the two equal.
DISTORTIONS = ("none", "rts", "rts-canvas")
AUTO = "auto"


# ------------------------------------------------------------------------- the options

@dataclass(frozen=True)
class OptimOptions:
    """How the weights are fitted: optimizer, rates, regularisation, batch."""

    optimizer: str = "sgd"  # sgd (momentum, nesterov as set) or adam (AdamW: decoupled decay)
    lr: float = 0.05  # one-cycle peak
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    batch_size: int = 64
    dropout: float = 0.05  # after every 3x3 block; the model config carries it
    ema: float = 0.0  # per-step decay of a moving average of the weights (0: off)
    stn_optimizer: str | None = None  # None: the same as optimizer; else the STN's own
    stn_lr: float | None = None  # the STN's one-cycle peak; None: lr * stn_lr_scale
    stn_lr_scale: float = 0.1  # the STN's LR relative to the rest
    stn_weight_decay: float | None = None  # None: the same as weight_decay


@dataclass(frozen=True)
class AugmentOptions:
    """What each step's training images go through."""

    augment: bool = False  # random crop (pad 4) and horizontal flip
    affine_deg: float = 0.0  # random rotation within +-this many degrees, per image and step
    affine_scale: float = 0.0  # random zoom within 1 +- this, per image and step
    rts_augment: float = 0.0  # this share of each batch gets a fresh --distort rts distortion
    redistort: bool = False  # distorted data: a fresh distortion per image every epoch
    clean_fraction: float = 0.0  # with redistort: this share of each epoch's images undistorted


@dataclass(frozen=True)
class StnObjectiveOptions:
    """The STN's own loss terms (stn_deploy.training.objectives); 0 / False: off."""

    stn_pose_loss: float = 0.0  # weight of the pose loss on the --rts-augment images
    stn_warp_penalty: float = 0.0  # weight of the warp penalty on every batch
    # The warp penalty starts after the first epoch whose training thetas spread this many
    # pixels (0: from the first step).
    stn_warp_from_px: float = 0.0
    stn_warp_per_class: bool = False  # charge each class's mean warp, not each image's


@dataclass(frozen=True)
class RunOptions:
    """The schedule and where it runs; none of these but epochs and seed shape the weights."""

    epochs: int = 10
    seed: int = 0
    recipe: str = "seed"
    device: str = "auto"
    quiet: bool = False
    stop_after: int | None = None  # end this run after that epoch; --resume finishes it


_GROUPS = {"optim": OptimOptions, "augment": AugmentOptions, "stn": StnObjectiveOptions,
           "run": RunOptions}
# Every option's name -> its group: the names are unique across groups, so the flat form
# (checkpoints' train_args, metrics.json, the recipes) maps back one to one.
_GROUP_OF = {f.name: group for group, cls in _GROUPS.items() for f in fields(cls)}


@dataclass(frozen=True)
class TrainOptions:
    """Defaults are the seed recipe. Build with ``TrainOptions.of(epochs=3, lr=0.01)`` (flat
    names) or ``TrainOptions.from_recipe("rts", ...)``; checkpoints record ``to_dict()``."""

    optim: OptimOptions = field(default_factory=OptimOptions)
    augment: AugmentOptions = field(default_factory=AugmentOptions)
    stn: StnObjectiveOptions = field(default_factory=StnObjectiveOptions)
    run: RunOptions = field(default_factory=RunOptions)

    @classmethod
    def of(cls, **values: Any) -> "TrainOptions":
        """From flat names, each routed to its group; an unknown name is refused."""
        return cls().replace(**values)

    def replace(self, **values: Any) -> "TrainOptions":
        unknown = sorted(set(values) - set(_GROUP_OF))
        if unknown:
            raise StnDeployError(f"unknown training option(s): {', '.join(unknown)}")
        groups = {g: dataclasses.replace(getattr(self, g), **{
            k: v for k, v in values.items() if _GROUP_OF[k] == g}) for g in _GROUPS}
        return TrainOptions(**groups)

    def to_dict(self) -> dict[str, Any]:
        """Every option by its flat name, as checkpoints and metrics.json record them."""
        return {k: v for g in _GROUPS for k, v in asdict(getattr(self, g)).items()}

    @classmethod
    def from_recipe(cls, recipe: str, *, use_stn: bool = True,
                    **overrides: Any) -> "TrainOptions":
        """The recipe's values under those given (None: not given). What the recipe sets and
        nothing can use goes: its clean share without fresh distortions, its warp charge's
        start and kind without a charge, its STN terms without an STN. The same, given by
        name, stays, so that ``check`` refuses it by name."""
        if recipe not in RECIPES:
            raise StnDeployError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        values = {**RECIPES[recipe], **given}
        if "stn_lr_scale" in given and "stn_lr" not in given:
            values.pop("stn_lr", None)  # a scale asked for is not overruled by the recipe's rate
        if "clean_fraction" not in given and not values.get("redistort", False):
            values["clean_fraction"] = 0.0  # the recipe's share applies to fresh distortions only
        for part in WARP_PARTS:
            if part not in given and not values.get("stn_warp_penalty"):
                values[part] = STN_ONLY[part][0]  # the recipe's start and kind go with its charge
        if not use_stn:
            values.update({k: off for k, (off, _) in STN_ONLY.items() if not given.get(k)})
        return cls.of(recipe=recipe, **values)


# ------------------------------------------------------------------- flags and refusals

# The train command's flag for each option whose flag is not its name with dashes
# (tests/test_train_cli.py holds every name to the command's real options).
_FLAGS = {"affine_deg": "--affine DEGREES", "affine_scale": "--affine ZOOM",
          "stn_warp_from_px": "--stn-warp-from", "use_stn": "--no-stn",
          # The data's own facts in the model config: another dataset or folder.
          **{k: "--dataset/--data-dir" for k in ("in_channels", "num_classes", "class_names",
                                                 "mean", "std")}}


def flag(name: str) -> str:
    """The ``train`` flag that sets option (or model config field) ``name``."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


# The options that act on the STN alone: each one's "off" value, and what it does.
STN_ONLY: dict[str, tuple[float | bool, str]] = {
    "stn_pose_loss": (0.0, "it tells the STN what to undo"),
    "stn_warp_penalty": (0.0, "it charges the STN's warp"),
    "stn_warp_from_px": (0.0, "it waits for the STN's take-off"),
    "stn_warp_per_class": (False, "it charges the STN's warp per class"),
}
# The options that shape the warp charge, and what each says about it: without a charge they
# mean nothing, so a recipe's go with its charge and one asked for alone is refused.
WARP_PARTS: dict[str, str] = {"stn_warp_from_px": "when that starts",
                              "stn_warp_per_class": "what that charges"}
OPTIMIZERS = ("sgd", "adam")


def check(opts: TrainOptions, *, use_stn: bool, distort: str, dropout: float | None = None,
          asked: Collection[str] = ()) -> None:
    """Refuse, by the flag's name, every option that would do nothing or mean nothing.

    The one place options are judged: the command calls it before loading any data (with
    ``asked``, the options given by name), ``train`` again for callers of the API (with the
    model config's ``dropout``, which must be the options')."""
    o, a, s = opts.optim, opts.augment, opts.stn
    if distort == "none":  # fresh distortions of undistorted data would do nothing
        for name in ("clean_fraction", "redistort"):
            if name in asked and getattr(a, name):
                raise StnDeployError(f"{flag(name)} needs --distort data: it draws each "
                                     "epoch's fresh distortions")
    if a.clean_fraction and not a.redistort:
        raise StnDeployError("--clean-fraction needs --redistort: it picks which of each "
                             "epoch's fresh distortions stay undistorted")
    if not 0 <= a.clean_fraction < 1:
        raise StnDeployError(f"--clean-fraction must be in [0, 1), got {a.clean_fraction}")
    for name in ("optimizer", "stn_optimizer"):
        if getattr(o, name) not in (*OPTIMIZERS, None):
            raise StnDeployError(f"unknown {flag(name)} {getattr(o, name)!r}; use sgd or adam")
    if o.stn_optimizer not in (None, o.optimizer) and o.stn_lr is None:
        raise StnDeployError(f"--stn-optimizer {o.stn_optimizer} beside --optimizer "
                             f"{o.optimizer} needs --stn-lr: a fraction of the other's rate "
                             "means nothing across optimizers")
    if not 0 <= o.ema < 1:
        raise StnDeployError(f"--ema must be in (0, 1), got {o.ema}")
    if dropout is not None and dropout != o.dropout:
        raise StnDeployError(f"the data's model config has dropout {dropout} and the options "
                             f"{o.dropout}: load the data with load_dataset(..., dropout=...)")
    if s.stn_pose_loss and not (a.rts_augment and use_stn):
        raise StnDeployError("--stn-pose-loss needs --rts-augment and an STN: it tells the STN "
                             "to undo the distortions --rts-augment applies")
    for name, (off, why) in STN_ONLY.items():
        if not use_stn and getattr(s, name) != off:
            raise StnDeployError(f"{flag(name)} needs an STN: {why}")
    for name, says in WARP_PARTS.items():
        if getattr(s, name) != STN_ONLY[name][0] and not s.stn_warp_penalty:
            raise StnDeployError(f"{flag(name)} needs --stn-warp-penalty: it says {says}")


# ------------------------------------------------------------- the command's whole setup

@dataclass(frozen=True)
class DataChoices:
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    distort: str = "none"
    image_size: int | None = None  # None: the dataset's (data.DEFAULT_SIZE) or the images' own


@dataclass(frozen=True)
class ModelChoices:
    use_stn: bool = True
    loc_net: str = "seed"
    loc_act: str = "relu"
    stn_passes: int = 1
    align_corners: bool = False


@dataclass(frozen=True)
class TrainSetup:
    """Everything ``stn-deploy train`` resolved its options to, and where each value came
    from (``sources``: name -> "recipe rts" or "auto: ..."; given and plain defaults have
    none)."""

    data: DataChoices
    model: ModelChoices
    train: TrainOptions
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def load(self) -> Any:
        """The DataBundle, whose model config (dropout included) is built there, once."""
        from stn_deploy.data import load_dataset

        d = self.data
        return load_dataset(d.dataset, d.data_dir, download=d.download, image_size=d.image_size,
                            distort=d.distort, seed=self.train.run.seed,
                            dropout=self.train.optim.dropout, **asdict(self.model))

    def rows(self) -> list[tuple[str, list[tuple[str, Any, str]]]]:
        """(section, [(name, value, source)]) for every option: what --print-config shows."""
        from stn_deploy.data import model_image_size

        d = self.data
        size = model_image_size(d.dataset, d.image_size, d.distort)
        data = {**asdict(d), "image_size": size if size is not None else "the images' own"}
        model = {"no_stn": not self.model.use_stn,
                 **{k: v for k, v in asdict(self.model).items() if k != "use_stn"}}
        sections = [("data", data), ("model", model)]
        sections += [(title, asdict(getattr(self.train, g))) for g, title in
                     (("optim", "optimizer"), ("augment", "augmentation"),
                      ("stn", "STN objectives"), ("run", "run"))]
        return [(title, [(k, v, self.sources.get(k, "")) for k, v in values.items()])
                for title, values in sections]


def auto_distort(dataset: str) -> str:
    """The digits are centred and upright: undistorted, they give the STN nothing to undo
    (plain `train` on them collapsed on every epoch), so ``auto`` RTS-distorts them; other
    data is taken as it is."""
    return "rts" if dataset == "digits" else "none"


def resolve(values: Mapping[str, Any]) -> TrainSetup:
    """The train command's values (None or "auto": not given) -> the whole setup, checked."""
    given = {k: v for k, v in values.items() if v is not None and v != AUTO}
    sources: dict[str, str] = {}

    def pick(name: str, value: Any, why: str) -> Any:
        if name in given:
            return given.pop(name)
        sources[name] = f"auto: {why}"
        return value

    dataset = given.pop("dataset", "digits")
    distort = pick("distort", auto_distort(dataset), f"{auto_distort(dataset)} for {dataset}")
    plain = distort == "none"
    with_what = "without --distort" if plain else "with --distort"
    recipe = pick("recipe", "seed" if plain else "rts", with_what)
    data = DataChoices(dataset, given.pop("data_dir", None), bool(given.pop("download", False)),
                       distort, given.pop("image_size", None))
    model = ModelChoices(use_stn=not given.pop("no_stn", False),
                         loc_net=pick("loc_net", "seed" if plain else "large", with_what),
                         loc_act=given.pop("loc_act", "relu"),
                         stn_passes=pick("stn_passes", 1 if plain else 2, with_what),
                         align_corners=bool(given.pop("align_corners", False)))
    affine = given.pop("affine", None)
    if affine is not None:
        given.update(affine_deg=affine[0], affine_scale=affine[1])
    opts = TrainOptions.from_recipe(recipe, use_stn=model.use_stn, **given)
    resolved = opts.to_dict()
    for k, v in RECIPES[recipe].items():
        if k not in given:
            sources[k] = (f"recipe {recipe}" if resolved[k] == v else
                          f"recipe {recipe}'s {show(v)} does not apply here")
    o = opts.optim
    unset = {"stn_optimizer": f"= --optimizer {o.optimizer}",
             "stn_lr": f"= --lr x --stn-lr-scale = {o.lr * o.stn_lr_scale:g}",
             "stn_weight_decay": f"= --weight-decay {o.weight_decay:g}"}
    sources.update({k: v for k, v in unset.items() if resolved[k] is None})
    if data.image_size is None:
        sources["image_size"] = ("auto: the images' own" if dataset == "imagefolder"
                                 else "auto: the dataset's")
    check(opts, use_stn=model.use_stn, distort=distort, asked=set(given))
    return TrainSetup(data, model, opts, sources)


def recipe_values(name: str, unset: str = "-") -> str:
    """What the recipes set ``name`` to, for --help: "64" when all agree, else
    "seed, improved: 0.05; rts: 0.001" (``unset`` stands for None)."""
    default = TrainOptions().to_dict()[name]
    by_value: dict[str, list[str]] = {}
    for recipe, values in RECIPES.items():
        value = values.get(name, default)
        by_value.setdefault(unset if value is None else show(value), []).append(recipe)
    if len(by_value) == 1:
        return next(iter(by_value))
    return "; ".join(f"{', '.join(recipes)}: {v}" for v, recipes in by_value.items())


def show(value: Any) -> str:
    """An option's value as help and --print-config write it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)
