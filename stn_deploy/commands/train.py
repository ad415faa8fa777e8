"""``stn-deploy train``: the options most runs need in ``--help``, the research ones in titled
sections shown by ``--help-all``; ``--print-config`` shows what they all resolve to.

The options' meaning, the recipes and the ``auto`` policy live in
``stn_deploy.training.options`` (standard library only, so ``--help`` stays instant); this
module only declares the flags and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from stn_deploy.commands.options import dataset_options, device_option
from stn_deploy.config import LOC_ACTS, LOC_NETS, MAX_STN_PASSES
from stn_deploy.defaults import TRAIN_OUT
from stn_deploy.training.options import (AUTO, DISTORTIONS, OPTIMIZERS, RECIPES, flag,
                                         recipe_values, show)

if TYPE_CHECKING:
    from stn_deploy.config import ModelConfig
    from stn_deploy.health import Health
    from stn_deploy.training.options import TrainOptions, TrainSetup

_HELP_ALL = "stn_deploy.help_all"
# The sections --help-all adds below the first list: (short name, title).
MODEL = ("the model", "Advanced: the model")
OPTIM = ("optimizer", "Advanced: optimizer (the recipe sets these)")
AUGMENT = ("augmentation", "Advanced: augmentation")
STN = ("STN objectives", "Advanced: STN objectives (research)")
RUN = ("run", "Advanced: run")


class SectionOption(click.Option):
    """An option listed in ``section`` by --help-all (None: the first list, in --help)."""

    def __init__(self, *args: Any, section: tuple[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.section = section


class SectionedCommand(click.Command):
    """--help lists the options without a section; --help-all every section, titled."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        first: list[tuple[str, str]] = []
        sections: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            section = getattr(param, "section", None)
            if record is not None:
                (first if section is None else sections.setdefault(section, [])).append(record)
        with formatter.section("Options"):
            formatter.write_dl(first)
        if ctx.meta.get(_HELP_ALL):
            for (_, title), records in sections.items():
                with formatter.section(title):
                    formatter.write_dl(records)
            return
        count = sum(len(records) for records in sections.values())
        formatter.write_paragraph()
        formatter.write_text(f"{count} more options ({', '.join(s for s, _ in sections)}): "
                             "--help-all.")


def _help_all(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    ctx.meta[_HELP_ALL] = True
    click.echo(ctx.get_help(), color=ctx.color)
    ctx.exit()


def _opt(*decls: str, section: tuple[str, str] | None = None, **kwargs: Any) -> Any:
    return click.option(*decls, cls=SectionOption, section=section, **kwargs)


def _by_recipe(name: str, unset: str = "-") -> str:
    return f"[default: {recipe_values(name, unset)}]"


_RECIPE_HELP = ("auto: rts with --distort, else seed; improved: for photos such as CIFAR-10. "
                "--print-config shows what each sets.")
_DISTORT_HELP = ("auto: rts for digits (centred, upright digits give the STN nothing to undo), "
                 "none for other data. rts: rotated, shifted, scaled (seeded); rts-canvas: the "
                 "same on a 1.5x canvas.")


@click.command(cls=SectionedCommand)
@dataset_options
@_opt("--distort", type=click.Choice([AUTO, *DISTORTIONS]), default=AUTO, show_default=True,
      help=_DISTORT_HELP)
@_opt("--recipe", type=click.Choice([AUTO, *RECIPES]), default=AUTO, show_default=True,
      help=_RECIPE_HELP)
@_opt("--epochs", type=click.IntRange(1), default=None,
      help=f"Length of the one-cycle schedule {_by_recipe('epochs')}.")
@_opt("--out-dir", "out_dir", type=click.Path(file_okay=False), default=str(TRAIN_OUT),
      show_default=True, help="Folder for last.pt, metrics.json and the pictures.")
@_opt("--resume", is_flag=True, help="Continue from OUT_DIR/last.pt.")
@device_option
@_opt("--seed", type=int, default=0, show_default=True)
@_opt("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
@_opt("--print-config", is_flag=True,
      help="Print what every option resolves to, and exit.")
@_opt("--help-all", is_flag=True, expose_value=False, is_eager=True, callback=_help_all,
      help="Show every option, and exit.")
# --------------------------------------------------------------------------- the model
@_opt("--image-size", type=click.IntRange(22, 1024), default=None, section=MODEL,
      help="Model input size [default: 32 for digits and CIFAR-10, 28 for Fashion-MNIST, 1.5x "
           "that with rts-canvas, the images' own for imagefolder].")
@_opt("--no-stn", is_flag=True, section=MODEL,
      help="The same classifier without the STN (ablation).")
@_opt("--loc-net", type=click.Choice([AUTO, *LOC_NETS]), default=AUTO, show_default=True,
      section=MODEL, help="The STN's localization net: the seed design's (8,928 parameters for "
      "1x32x32) or a larger one (55,718). auto: large with --distort, else seed.")
@_opt("--loc-act", type=click.Choice(LOC_ACTS), default="relu", show_default=True,
      section=MODEL, help="The STN's activations: ReLU (the seed design's) or LeakyReLU 0.1, "
      "whose units cannot die (no parameters added).")
@_opt("--stn-passes", type=click.IntRange(1, MAX_STN_PASSES), default=None, section=MODEL,
      help="Passes of the localization net: from 2 on it looks again at its own output and "
           "refines theta (same weights) [default: 2 with --distort, else 1].")
@_opt("--align-corners", is_flag=True, section=MODEL,
      help="grid_sample/affine_grid align_corners=True.")
# ----------------------------------------------------------------------- the optimizer
@_opt("--optimizer", type=click.Choice(OPTIMIZERS), default=None, section=OPTIM,
      help=f"sgd (momentum) or adam (AdamW) {_by_recipe('optimizer')}.")
@_opt("--lr", type=click.FloatRange(0, min_open=True), default=None, section=OPTIM,
      help=f"One-cycle peak learning rate {_by_recipe('lr')}.")
@_opt("--momentum", type=click.FloatRange(0, 1, max_open=True), default=None, section=OPTIM,
      help=f"SGD's momentum {_by_recipe('momentum')}.")
@_opt("--nesterov/--no-nesterov", default=None, section=OPTIM,
      help=f"SGD with Nesterov momentum {_by_recipe('nesterov')}.")
@_opt("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=None,
      section=OPTIM, help=f"Of the classification loss {_by_recipe('label_smoothing')}.")
@_opt("--batch-size", type=click.IntRange(1), default=None, section=OPTIM,
      help=_by_recipe("batch_size"))
@_opt("--weight-decay", type=click.FloatRange(0), default=None, section=OPTIM,
      help=f"Weight decay on the classifier {_by_recipe('weight_decay')}.")
@_opt("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None, section=OPTIM,
      help=f"Dropout after each 3x3 block {_by_recipe('dropout')}.")
@_opt("--ema", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
      metavar="DECAY", section=OPTIM,
      help="Keep a moving average of the weights (per-step decay, e.g. 0.999) and save it as "
           "the model; metrics.json also gives the raw weights' accuracy [default: off].")
@_opt("--stn-optimizer", type=click.Choice(OPTIMIZERS), default=None, section=OPTIM,
      help="The STN's own optimizer, e.g. AdamW beside the classifier's SGD "
           f"{_by_recipe('stn_optimizer', '--optimizer')}.")
@_opt("--stn-lr", type=click.FloatRange(0, min_open=True), default=None, section=OPTIM,
      help="The STN's one-cycle peak, needed when --stn-optimizer differs "
           f"{_by_recipe('stn_lr', '--lr x --stn-lr-scale')}.")
@_opt("--stn-lr-scale", type=click.FloatRange(0, min_open=True), default=None, section=OPTIM,
      help=f"The STN's learning rate relative to the rest {_by_recipe('stn_lr_scale')}.")
@_opt("--stn-weight-decay", type=click.FloatRange(0), default=None, section=OPTIM,
      help=f"Weight decay on the STN {_by_recipe('stn_weight_decay', '--weight-decay')}.")
# -------------------------------------------------------------------- the augmentation
@_opt("--augment/--no-augment", default=None, section=AUGMENT,
      help=f"Random crop and flip {_by_recipe('augment')}.")
@_opt("--affine", type=(click.FloatRange(0, 180), click.FloatRange(0, 1, max_open=True)),
      default=None, metavar="DEGREES ZOOM", section=AUGMENT,
      help="Random rotation within +-DEGREES and zoom within 1+-ZOOM of every training image "
           "each step: something for the STN to undo on undistorted data [default: off].")
@_opt("--rts-augment", type=click.FloatRange(0, 1), default=None, metavar="SHARE",
      section=AUGMENT, help="Give this share of each training batch a fresh rts distortion "
      f"(the test set stays as it is) {_by_recipe('rts_augment')}.")
@_opt("--redistort/--no-redistort", default=None, section=AUGMENT,
      help=f"With --distort: a fresh distortion of every training image each epoch "
           f"{_by_recipe('redistort')}.")
@_opt("--clean-fraction", type=click.FloatRange(0, 1, max_open=True), default=None,
      section=AUGMENT, help="With --redistort: this share of each epoch's training images "
      f"keeps its original pose, a pose to map to {_by_recipe('clean_fraction')}.")
# ---------------------------------------------------------------------- STN objectives
@_opt("--stn-pose-loss", type=click.FloatRange(0), default=None, metavar="WEIGHT", section=STN,
      help="With --rts-augment: also tell the STN to undo each distortion it applied, at this "
           f"weight beside the classification loss {_by_recipe('stn_pose_loss')}.")
@_opt("--stn-warp-penalty", type=click.FloatRange(0), default=None, metavar="WEIGHT",
      section=STN, help="Charge the STN for how far it moves the sampling points: a prior for "
      f"one upright pose rather than one per class {_by_recipe('stn_warp_penalty')}.")
@_opt("--stn-warp-from", "stn_warp_from_px", type=click.FloatRange(0), default=None,
      metavar="PX", section=STN, help="Start --stn-warp-penalty only after an epoch whose "
      "training thetas spread PX pixels (the STN has taken off); 0: from the first step "
      f"{_by_recipe('stn_warp_from_px')}.")
@_opt("--stn-warp-per-class/--stn-warp-per-image", default=None, section=STN,
      help="Charge --stn-warp-penalty on each class's mean warp in the batch (its own pose), "
           f"not each image's (which charges the undoing too) {_by_recipe('stn_warp_per_class')}.")
# ----------------------------------------------------------------------------- the run
@_opt("--stop-after", type=click.IntRange(1), default=None, section=RUN,
      help="End this run after that epoch of the schedule (continue with --resume).")
def train(out_dir: str, resume: bool, print_config: bool, **values: Any) -> None:
    """Train the STN classifier, a checkpoint each epoch. With no options: the bundled digits,
    RTS-distorted, 20 epochs of the rts recipe (minutes on 2 cores)."""
    from stn_deploy.errors import StnDeployError
    from stn_deploy.training.options import resolve

    setup = resolve(values)
    if print_config:
        click.echo(config_text(setup, out_dir, resume))
        return
    from stn_deploy.training.loop import train as run_training

    resume_from = Path(out_dir) / "last.pt" if resume else None
    if resume_from is not None and not resume_from.is_file():
        raise StnDeployError(f"--resume: no checkpoint at {resume_from}")
    bundle = setup.load()
    # What was picked is said even with --quiet, which silences only per-epoch output.
    click.echo(_first_line(setup, bundle.config, len(bundle.train), len(bundle.test)))
    result = run_training(bundle, out_dir, setup.train, resume=resume_from)
    if result.history:
        last = result.history[-1]
        raw = (f" (weights averaged with --ema; the raw weights: {100 * last['raw_test_acc']:.2f}%)"
               if "raw_test_acc" in last else "")
        click.echo(f"{result.parameters:,} parameters; test accuracy {100 * last['test_acc']:.2f}%"
                   f"{raw} after {_epochs(last['epoch'])}; checkpoint {result.checkpoint}")
    if result.health_rts is not None:
        click.echo(f"STN health on the test split RTS-distorted (--rts-augment): "
                   f"{result.health_rts.summary()}")
    if result.health is not None:
        click.echo(f"STN health on the test split: {result.health.summary()}")
        _verdict(result.health, Path(out_dir) / "transforms.png")
        advice = stn_advice(result.health, setup.train, bundle.config)
        if advice:
            click.secho(f"warning: {advice}", fg="yellow", err=True)


def _first_line(setup: TrainSetup, config: ModelConfig, n_train: int, n_test: int) -> str:
    d, m = setup.data, setup.model
    distort = "" if d.distort == "none" else f", {d.distort}-distorted"
    stn = ("no STN" if not m.use_stn else f"{m.loc_net} localization net"
           + (", LeakyReLU" if m.loc_act == "leaky" else "")
           + (f", {m.stn_passes} passes" if m.stn_passes > 1 else ""))
    return (f"{d.dataset}{distort}: {n_train} train, {n_test} test images, input "
            f"{'x'.join(map(str, config.input_shape))}, {config.num_classes} classes; recipe "
            f"{setup.train.run.recipe}, {_epochs(setup.train.run.epochs)}, {stn}")


def _epochs(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def _verdict(health: Health, picture: Path) -> None:
    from stn_deploy.health import StnHealth

    if isinstance(health, StnHealth):
        click.echo(f"{health.verdict()} Picture: {picture}")


def config_text(setup: TrainSetup, out_dir: str, resume: bool) -> str:
    """--print-config: every option's resolved value by its flag, and where it came from."""
    sections = [("output", [("out_dir", out_dir, ""), ("resume", resume, "")]), *setup.rows()]
    lines = [f"stn-deploy train resolves to (recipe {setup.train.run.recipe}); on the right, "
             "where a value came from (none: given, or the plain default):"]
    for title, rows in sections:
        lines.append(f"{title}:")
        lines += [f"  {flag(name):<28} {show(value):<16}{'  ' + src if src else ''}".rstrip()
                  for name, value, src in rows]
    return "\n".join(lines)




def stn_advice(health: Health, opts: TrainOptions, config: ModelConfig) -> str | None:
    """One warning that says what is wrong with the STN and what to try, or None."""
    from stn_deploy.health import StnHealth

    if not isinstance(health, StnHealth) or not health.warnings:
        return None
    if health.warnings[0].startswith("theta has run away"):
        return (f"{health.warnings[0]}; try a lower --stn-lr-scale (or --stn-lr) "
                "(docs/training.md#keeping-the-stn-alive)")
    tries = []
    if config.distort == "none" and not opts.stn.stn_pose_loss:
        tries.append("--rts-augment 0.25 --stn-pose-loss 1 --stn-optimizer adam --stn-lr 1e-3 "
                     "--stn-weight-decay 0 (undistorted data: tell the STN what to undo)")
    if (health.dead_fraction or 0) > 0.5 and config.loc_act == "relu":
        tries.append("--loc-act leaky (units that cannot die)")
    if opts.optim.optimizer == "sgd":
        rts = RECIPES["rts"]  # read here, so the advice follows the recipe
        tries.append(f"--optimizer {rts['optimizer']} --lr {rts['lr']:g} --stn-lr-scale "
                     f"{rts['stn_lr_scale']:g} --stn-weight-decay {rts['stn_weight_decay']:g} "
                     "(the rts recipe's STN settings)")
    if not opts.augment.redistort:
        tries.append("--redistort (with --distort)")
    if config.loc_net != "large":
        tries.append("--loc-net large")
    if not tries:
        tries.append("more --epochs or another --seed (the rts recipe took off on 3 seeds "
                     "of 3 at 60 epochs, between epochs 10 and 20)")
    return f"{health.warnings[0]}; try {'; '.join(tries)} (docs/training.md#keeping-the-stn-alive)"
