"""``stn-deploy train``."""

from __future__ import annotations

import click

from stn_deploy.commands.options import dataset_options
from stn_deploy.defaults import TRAIN_OUT


@click.command()
@dataset_options
@click.option("--distort", type=click.Choice(["none", "rts", "rts-canvas"]), default="none",
              show_default=True,
              help="rts: the STN paper's rotated, translated, scaled distortion (seeded). "
                   "rts-canvas: the same on a canvas 1.5x the image (the paper's 42x42 MNIST), "
                   "so the STN must find and zoom the object.")
@click.option("--image-size", type=click.IntRange(22, 1024), default=None,
              help="Model input size [default: 32 for digits and CIFAR-10, 28 for Fashion-MNIST,"
                   " the images' own for imagefolder].")
@click.option("--no-stn", is_flag=True, help="The same classifier without the STN (ablation).")
@click.option("--loc-net", type=click.Choice(["auto", "seed", "large"]), default="auto",
              show_default=True,
              help="The STN's localization net: the seed design's (8,928 parameters for 1x32x32)"
                   " or a larger one (55,718). auto: large with --distort, else seed.")
@click.option("--loc-act", type=click.Choice(["relu", "leaky"]), default="relu",
              show_default=True,
              help="The STN's activations: ReLU (the seed design's) or LeakyReLU 0.1, whose units "
                   "cannot die (no parameters added).")
@click.option("--stn-passes", type=click.IntRange(1, 4), default=None,
              help="Passes of the localization net: from 2 on it looks again at its own output "
                   "and refines theta (same weights, no parameters added) [default: 2 with "
                   "--distort, else 1].")
@click.option("--align-corners", is_flag=True, help="grid_sample/affine_grid align_corners=True.")
@click.option("--recipe", type=click.Choice(["auto", "seed", "improved", "rts"]), default="auto",
              show_default=True,
              help="seed: SGD + one-cycle, no augmentation, dropout 0.05, STN at 1/10 LR. improved:"
                   " crop/flip and label smoothing instead of dropout, nesterov; a quarter of each "
                   "batch RTS-distorted with the pose loss, the STN on AdamW 1e-3 without decay."
                   " rts: AdamW, the "
                   "STN at the full rate without weight decay, fresh distortions each epoch with "
                   "a quarter of the images left undistorted. "
                   "auto: rts with --distort, else seed.")
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=None, help="[default: 64]")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None,
              help="One-cycle peak learning rate [default: 0.05].")
@click.option("--augment/--no-augment", default=None,
              help="Random crop and flip [default: by recipe].")
@click.option("--affine", type=(click.FloatRange(0, 180), click.FloatRange(0, 1, max_open=True)),
              default=None, metavar="DEGREES ZOOM",
              help="Random rotation within +-DEGREES and zoom within 1+-ZOOM of every training "
                   "image each step: something for the STN to undo on undistorted data "
                   "[default: by recipe].")
@click.option("--rts-augment", type=click.FloatRange(0, 1), default=None, metavar="SHARE",
              help="Give this share of each training batch a fresh --distort rts distortion "
                   "(the test set stays as it is) [default: by recipe].")
@click.option("--stn-pose-loss", type=click.FloatRange(0), default=None, metavar="WEIGHT",
              help="With --rts-augment: also tell the STN to undo each distortion it applied "
                   "(its known transform), at this weight beside the classification loss "
                   "[default: by recipe].")
@click.option("--stn-warp-penalty", type=click.FloatRange(0), default=None, metavar="WEIGHT",
              help="Charge the STN for how far it moves the sampling points, at this weight: "
                   "a prior for one upright canonical pose rather than one per class "
                   "[default: by recipe].")
@click.option("--stn-warp-from", type=click.FloatRange(0), default=None, metavar="PX",
              help="Start --stn-warp-penalty only after an epoch whose training thetas spread "
                   "PX pixels (the STN has taken off); 0: from the first step "
                   "[default: by recipe].")
@click.option("--stn-warp-per-class/--stn-warp-per-image", default=None,
              help="Charge --stn-warp-penalty on each class's mean warp in the batch (its own "
                   "pose), not on each image's (which charges the undoing too) "
                   "[default: by recipe].")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Dropout after each 3x3 block [default: by recipe].")
@click.option("--stn-lr-scale", type=click.FloatRange(0, min_open=True), default=None,
              help="The STN's learning rate relative to the rest [default: by recipe].")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default=None,
              help="sgd (momentum) or adam (AdamW) [default: by recipe].")
@click.option("--stn-optimizer", type=click.Choice(["sgd", "adam"]), default=None,
              help="The STN's own optimizer, e.g. AdamW beside the classifier's SGD "
                   "[default: --optimizer].")
@click.option("--stn-lr", type=click.FloatRange(0, min_open=True), default=None,
              help="The STN's one-cycle peak, instead of --lr times --stn-lr-scale "
                   "(needed when --stn-optimizer differs).")
@click.option("--stn-weight-decay", type=click.FloatRange(0), default=None,
              help="Weight decay on the STN's parameters [default: by recipe].")
@click.option("--weight-decay", type=click.FloatRange(0), default=None,
              help="Weight decay on the classifier [default: by recipe].")
@click.option("--redistort/--no-redistort", default=None,
              help="With --distort: a fresh distortion of every training image each epoch "
                   "[default: by recipe].")
@click.option("--clean-fraction", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="With --redistort: this share of each epoch's training images keeps its "
                   "original pose, which gives the STN a pose to map to [default: by recipe].")
@click.option("--ema", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              metavar="DECAY",
              help="Keep a moving average of the weights (per-step decay, e.g. 0.999) and save "
                   "it as the model; metrics.json also gives the raw weights' accuracy.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=str(TRAIN_OUT),
              show_default=True, help="Folder for last.pt, metrics.json and the pictures.")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt.")
@click.option("--stop-after", type=click.IntRange(1), default=None,
              help="End this run after that epoch of the schedule (continue with --resume).")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines (the summary "
              "at the start and the end still prints).")
def train(dataset: str, data_dir: str | None, download: bool, distort: str,
          image_size: int | None, no_stn: bool, loc_net: str, loc_act: str,
          stn_passes: int | None, align_corners: bool, recipe: str,
          epochs: int, batch_size: int | None, lr: float | None, augment: bool | None,
          affine: tuple[float, float] | None, rts_augment: float | None,
          stn_pose_loss: float | None, stn_warp_penalty: float | None,
          stn_warp_from: float | None, stn_warp_per_class: bool | None,
          dropout: float | None, stn_lr_scale: float | None, optimizer: str | None,
          stn_optimizer: str | None, stn_lr: float | None,
          stn_weight_decay: float | None, weight_decay: float | None,
          redistort: bool | None, clean_fraction: float | None, ema: float | None, seed: int,
          device: str, out_dir: str, resume: bool,
          stop_after: int | None, quiet: bool) -> None:
    """Train the STN classifier and write a checkpoint each epoch (atomically)."""
    from pathlib import Path

    from stn_deploy.data import load_dataset
    from stn_deploy.errors import StnDeployError
    from stn_deploy.train import TrainOptions
    from stn_deploy.train import train as run_training

    if clean_fraction and distort == "none":
        raise StnDeployError("--clean-fraction needs --distort data: it picks which of each "
                             "epoch's fresh distortions stay undistorted")
    if recipe == "auto":
        recipe = "seed" if distort == "none" else "rts"
    if loc_net == "auto":
        loc_net = "seed" if distort == "none" else "large"
    if stn_passes is None:
        stn_passes = 1 if distort == "none" else 2
    opts = TrainOptions.from_recipe(recipe, epochs=epochs, batch_size=batch_size, lr=lr,
                                    augment=augment, dropout=dropout,
                                    affine_deg=affine[0] if affine else None,
                                    affine_scale=affine[1] if affine else None,
                                    rts_augment=rts_augment, stn_pose_loss=stn_pose_loss,
                                    stn_warp_penalty=stn_warp_penalty,
                                    stn_warp_from_px=stn_warp_from,
                                    stn_warp_per_class=stn_warp_per_class,
                                    stn_lr_scale=stn_lr_scale, optimizer=optimizer,
                                    stn_optimizer=stn_optimizer, stn_lr=stn_lr,
                                    stn_weight_decay=stn_weight_decay,
                                    weight_decay=weight_decay, redistort=redistort,
                                    clean_fraction=clean_fraction, ema=ema, seed=seed,
                                    device=device, quiet=quiet, stop_after=stop_after)
    if no_stn:
        opts = opts.without_stn(asked={"stn_pose_loss": stn_pose_loss,
                                       "stn_warp_penalty": stn_warp_penalty,
                                       "stn_warp_from_px": stn_warp_from,
                                       "stn_warp_per_class": stn_warp_per_class or None})
    resume_from = Path(out_dir) / "last.pt" if resume else None
    if resume_from is not None and not resume_from.is_file():
        raise StnDeployError(f"--resume: no checkpoint at {resume_from}")
    bundle = load_dataset(dataset, data_dir, download=download, image_size=image_size,
                          distort=distort, seed=seed, use_stn=not no_stn,
                          align_corners=align_corners, loc_net=loc_net,
                          loc_act=loc_act, stn_passes=stn_passes)
    # What was picked is said even with --quiet, which silences only per-epoch output.
    click.echo(f"{dataset}: {len(bundle.train)} train, {len(bundle.test)} test images, "
               f"input {'x'.join(map(str, bundle.config.input_shape))}, "
               f"{bundle.config.num_classes} classes; recipe {recipe}, "
               + ("no STN" if no_stn else f"{loc_net} localization net"
                  + (", LeakyReLU" if loc_act == "leaky" else "")
                  + (f", {stn_passes} passes" if stn_passes > 1 else "")))
    result = run_training(bundle, out_dir, opts, resume=resume_from)
    if result.history:
        last = result.history[-1]
        raw = (f" (weights averaged with --ema; the raw weights: {100 * last['raw_test_acc']:.2f}%)"
               if "raw_test_acc" in last else "")
        click.echo(f"{result.parameters:,} parameters; test accuracy {100 * last['test_acc']:.2f}%"
                   f"{raw} after {last['epoch']} epochs; checkpoint {result.checkpoint}")
    if result.health_rts is not None:
        click.echo(f"STN health on the test split RTS-distorted (--rts-augment): "
                   f"{result.health_rts.summary()}")
    if result.health is not None:
        click.echo(f"STN health on the test split: {result.health.summary()}")
        advice = stn_advice(result.health, opts, bundle.config)
        if advice:
            click.secho(f"warning: {advice}", fg="yellow", err=True)


def stn_advice(health: object, opts: object, config: object) -> str | None:
    """One warning that says what is wrong with the STN and what to try, or None."""
    from stn_deploy.health import StnHealth
    from stn_deploy.train import RECIPES

    if not isinstance(health, StnHealth) or not health.warnings:
        return None
    loc_net = getattr(config, "loc_net", "seed")
    if health.warnings[0].startswith("theta has run away"):
        return (f"{health.warnings[0]}; try a lower --stn-lr-scale (or --stn-lr) "
                "(README: 'Keeping the STN alive')")
    tries = []
    if getattr(config, "distort", "none") == "none" and not getattr(opts, "stn_pose_loss", 0):
        tries.append("--rts-augment 0.25 --stn-pose-loss 1 --stn-optimizer adam --stn-lr 1e-3 "
                     "--stn-weight-decay 0 (undistorted data: tell the STN what to undo)")
    if (health.dead_fraction or 0) > 0.5 and getattr(config, "loc_act", "relu") == "relu":
        tries.append("--loc-act leaky (units that cannot die)")
    if getattr(opts, "optimizer", "sgd") == "sgd":
        rts = RECIPES["rts"]  # read here, so the advice follows the recipe
        tries.append(f"--optimizer {rts['optimizer']} --lr {rts['lr']:g} --stn-lr-scale "
                     f"{rts['stn_lr_scale']:g} --stn-weight-decay {rts['stn_weight_decay']:g} "
                     "(the rts recipe's STN settings)")
    if getattr(opts, "redistort", True) is False:
        tries.append("--redistort (with --distort)")
    if loc_net != "large":
        tries.append("--loc-net large")
    if not tries:
        tries.append("more --epochs or another --seed (the rts recipe took off on 3 seeds "
                     "of 3 at 60 epochs, between epochs 10 and 20)")
    return f"{health.warnings[0]}; try {'; '.join(tries)} (README: 'Keeping the STN alive')"
