"""STN health: does theta depend on the input, and how much of a known distortion does it undo?

An STN whose theta is the same for every image is a defect however accurate the classifier
behind it: the grid carries no information and parity checks on theta certify a constant.
So train, export, bench and inspect all report the same figures, computed here from thetas
alone (numpy, no torch), so exported graphs with a theta output are judged like checkpoints.

The headline figure is the *theta spread in pixels*: how far, RMS over the images and over
the output frame, each image's sampling points lie from where the average theta puts them.
It has one unit whatever the mix of rotation, scale and shift, and 0.5 px (half a pixel)
is the line below which the transform no longer depends on the input.

On data whose applied distortion is known (``--distort rts``), each image's distortion D
(the sampling theta that made it) composed with the STN's theta gives the transform from
the warped output back to the undistorted image. A perfect STN makes that composition the
same for every image (the canonical pose); none leaves it equal to D. The fraction undone
of a component is ``1 - spread(composed) / spread(D)``.

On undistorted images a small spread is ambiguous: an STN that has learned to undo rotation
and scale rightly leaves upright, full-size images nearly as they are. So when it is below
the line there, the same images are measured once more RTS-distorted (a fixed seed): a
collapsed STN gives the same constant theta on them, a working one moves with the pose.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Below this RMS displacement (pixels) theta is taken as constant: the STN has collapsed.
COLLAPSE_PX = 0.5
# A regressor whose hidden units are nearly all dead can no longer move theta. Working STNs
# here run with 40-78% dead (benchmarks/results/archive/stn_recipes_*.json), so the line is 90%.
DEAD_WARN = 0.9
# Sampling points spread over more than the frame itself: theta has run away (a known STN
# instability at too high a rate), and the classifier sees mostly padding.
RUNAWAY_FRAMES = 1.0
# The summary shows the within-class figure when it is this much above the plain one.
WITHIN_CLASS_SHOWN = 0.1
# Fewer images than this give no meaningful spread.
MIN_IMAGES = 8
# The seed of the RTS-distorted copy of undistorted images (see the module docstring).
RTS_COPY_SEED = 20_151
COMPONENTS = ("rotation_deg", "log_scale", "log_aniso", "shear", "tx", "ty")


def pct(fraction: float | None, digits: int = 0) -> str:
    """A fraction as percent (whole by default), '-' where it was not measured: how every
    report shows them."""
    return "-" if fraction is None else f"{100 * fraction:.{digits}f}%"


def decompose(theta: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image rotation (degrees), log isotropic scale, log anisotropy, shear, translation.

    A = R(rotation) @ [[sx, shear * sy], [0, sy]] (QR), scale = sqrt(|det A|).
    """
    t = np.asarray(theta, dtype=np.float64).reshape(-1, 2, 3)
    a, b, c, d = t[:, 0, 0], t[:, 0, 1], t[:, 1, 0], t[:, 1, 1]
    rot = np.arctan2(c, a)
    sx = np.hypot(a, c)
    det = a * d - b * c
    sy = np.where(sx > 0, det / np.maximum(sx, 1e-12), 0.0)
    shear_num = (a * b + c * d) / np.maximum(sx, 1e-12)  # = shear * sy
    abs_det = np.maximum(np.abs(det), 1e-12)
    return {
        "rotation_deg": np.degrees(rot),
        "log_scale": 0.5 * np.log(abs_det),
        "log_aniso": np.log(np.maximum(sx, 1e-12) / np.maximum(np.abs(sy), 1e-12)),
        "shear": shear_num / np.where(np.abs(sy) > 1e-12, sy, 1e-12),
        "tx": t[:, 0, 2],
        "ty": t[:, 1, 2],
    }


def _circular_std_deg(deg: np.ndarray) -> float:
    """Rotation spread: the std of each angle's offset from the circular mean, wrapped to
    +-180, so that +179 and -179 degrees are 2 apart, not 358."""
    offset = (deg - _circular_mean_deg(deg) + 180.0) % 360.0 - 180.0
    return float(np.sqrt((offset ** 2).mean()))


def _circular_mean_deg(deg: np.ndarray) -> float:
    return float(np.degrees(np.arctan2(np.sin(np.radians(deg)).mean(),
                                       np.cos(np.radians(deg)).mean())))


def spreads(theta: np.ndarray) -> dict[str, float]:
    parts = decompose(theta)
    out = {k: float(v.std()) for k, v in parts.items()}
    out["rotation_deg"] = _circular_std_deg(parts["rotation_deg"])
    out["translation"] = float(math.sqrt(out["tx"] ** 2 + out["ty"] ** 2))
    return out


def pooled_class_spreads(theta: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``spreads`` within each class, pooled (root of the size-weighted mean variance)."""
    t = np.asarray(theta, dtype=np.float64).reshape(-1, 2, 3)
    labels = np.asarray(labels).reshape(-1)
    total: dict[str, float] = {}
    counted = 0
    for c in np.unique(labels):
        members = t[labels == c]
        if len(members) < 2:
            continue
        for k, v in spreads(members).items():
            total[k] = total.get(k, 0.0) + len(members) * v ** 2
        counted += len(members)
    return {k: math.sqrt(v / counted) for k, v in total.items()} if counted else {}


# The components "undone" is reported for: (name in ``undone``, key in ``spreads``).
UNDONE_PARTS = (("rotation", "rotation_deg"), ("scale", "log_scale"),
                ("translation", "translation"))


def _undone(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """1 - spread after / spread before, for each component that was distorted at all."""
    return {name: 1.0 - after[key] / before[key] for name, key in UNDONE_PARTS
            if before.get(key, 0.0) > 1e-6}


def pose(theta: np.ndarray) -> dict[str, float]:
    """The mean transform, as rotation (deg), scale (a factor), translation (frame = 2)."""
    parts = decompose(theta)
    return {"rotation_deg": round(_circular_mean_deg(parts["rotation_deg"]), 3),
            "scale": round(float(np.exp(parts["log_scale"].mean())), 4),
            "tx": round(float(parts["tx"].mean()), 4), "ty": round(float(parts["ty"].mean()), 4)}


def displacement_px(delta: np.ndarray, image_size: int) -> np.ndarray:
    """Per-image RMS, over the output frame, of the sampling-point shift a theta difference
    makes, in pixels. Grid points are uniform on [-1, 1]^2, so E[x^2] = 1/3, E[x] = E[xy] = 0.
    """
    d = np.asarray(delta, dtype=np.float64).reshape(-1, 2, 3)
    sq = (d[:, :, :2] ** 2).sum(axis=(1, 2)) / 3.0 + (d[:, :, 2] ** 2).sum(axis=1)
    return np.sqrt(sq) * (image_size / 2.0)


def theta_spread_px(theta: np.ndarray, image_size: int) -> float:
    t = np.asarray(theta, dtype=np.float64).reshape(-1, 2, 3)
    rms = displacement_px(t - t.mean(axis=0, keepdims=True), image_size)
    return float(math.sqrt((rms ** 2).mean()))


def at_rest_fraction(theta: np.ndarray, image_size: int, tol_px: float = 0.01) -> float:
    """The share of images whose theta lies within ``tol_px`` of the median theta. A ReLU
    regressor whose hidden layer is all zero for an image outputs exactly its bias, whatever
    the image: this counts those images (once they are the majority, the median is that
    bias). A small spread can mean a small move on every image or none on most; this says
    which, so a card does not call an STN that rests on 90% of images one that "moves little"."""
    t = np.asarray(theta, dtype=np.float64).reshape(-1, 2, 3)
    shift = displacement_px(t - np.median(t, axis=0, keepdims=True), image_size)
    return float((shift <= tol_px).mean())


def compose(applied: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Distortion D then the STN's theta: output pixel -> undistorted image, per image."""
    def homogeneous(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64).reshape(-1, 2, 3)
        h = np.zeros((len(t), 3, 3))
        h[:, :2] = t
        h[:, 2, 2] = 1.0
        return h

    return (homogeneous(applied) @ homogeneous(theta))[:, :2]


@dataclass
class StnHealth:
    """What the STN does across a set of images; ``None`` fields were not measurable."""

    images: int
    theta_spread_px: float
    spread: dict[str, float]  # per component, std across images
    mean_pose: dict[str, float]
    dead_fraction: float | None = None  # regressor ReLUs that never fire (None: LeakyReLU)
    undone: dict[str, float] | None = None  # rotation / scale / translation, on distorted data
    canonical_pose: dict[str, float] | None = None
    # ``undone`` with each class's own canonical pose allowed (spreads within each class,
    # pooled): an STN may turn every shoe to +20 degrees and every shirt to -14 degrees,
    # which helps the classifier as much as one pose for all, yet counts against ``undone``.
    undone_within_class: dict[str, float] | None = None
    # Undistorted images with a spread below COLLAPSE_PX: the spread on their RTS-distorted
    # copy, which decides whether theta depends on the input (None: not needed).
    rts_copy_spread_px: float | None = None
    collapsed: bool = False
    warnings: list[str] = field(default_factory=list)

    def headline(self) -> dict[str, float | None]:
        """The few figures that go into epoch lines, metrics.json and tables."""
        undone, within = self.undone or {}, self.undone_within_class or {}
        return {"theta_spread_px": round(self.theta_spread_px, 3),
                "dead_fraction": _r(self.dead_fraction, 3),
                "rotation_undone": _r(undone.get("rotation")),
                "scale_undone": _r(undone.get("scale")),
                # Per epoch: whether the classes drift to poses of their own.
                "rotation_undone_within_class": _r(within.get("rotation")),
                "collapsed": self.collapsed}

    def summary(self) -> str:
        """One line, for the terminal and the pictures' captions."""
        parts = [f"theta spread {self.theta_spread_px:.2f} px",
                 f"rotation spread {self.spread['rotation_deg']:.1f} deg"]
        if self.undone:
            for key in ("rotation", "scale", "translation"):
                if key in self.undone:
                    parts.append(f"{key} undone {pct(self.undone[key])}")
                    within = (self.undone_within_class or {}).get(key)
                    # Only where it tells something: the classes are mapped to different poses.
                    if within is not None and within - self.undone[key] >= WITHIN_CLASS_SHOWN:
                        parts[-1] += f" ({pct(within)} within each class)"
        if self.dead_fraction is not None:
            parts.append(f"dead regressor ReLUs {pct(self.dead_fraction)}")
        if self.rts_copy_spread_px is not None:
            parts.append(f"{self.rts_copy_spread_px:.2f} px on an RTS-distorted copy")
        if self.collapsed:
            parts.append("COLLAPSED")
        return ", ".join(parts)

    def verdict(self) -> str:
        """One sentence saying whether the STN transforms and what it undoes, for the end of
        a training run (the summary's figures, in words)."""
        if self.collapsed:
            return (f"The STN has COLLAPSED: theta moves the sampling points by "
                    f"{self.theta_spread_px:.2f} px across images, whatever the input.")
        if not self.undone:
            return (f"The STN transforms: theta moves the sampling points by "
                    f"{self.theta_spread_px:.2f} px across images.")
        undone = [f"{pct(self.undone[k])} of the {k}" for k in ("rotation", "scale", "translation")
                  if k in self.undone]
        listed = ", ".join(undone[:-1]) + (" and " if len(undone) > 1 else "") + undone[-1]
        return f"The STN transforms: it undoes {listed} the images were distorted with."

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spread"] = {k: round(v, 5) for k, v in self.spread.items()}
        d["theta_spread_px"] = round(self.theta_spread_px, 4)
        if self.undone is not None:
            d["undone"] = {k: round(v, 4) for k, v in self.undone.items()}
        if self.undone_within_class is not None:
            d["undone_within_class"] = {k: round(v, 4)
                                        for k, v in self.undone_within_class.items()}
        if self.rts_copy_spread_px is not None:
            d["rts_copy_spread_px"] = round(self.rts_copy_spread_px, 4)
        return d


def _r(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(v, digits)


NO_STN = "no STN"


@dataclass
class NotMeasured:
    """No health figures, and why: a model without an STN, or too few images. Not an error."""

    reason: str

    def headline(self) -> dict[str, Any]:
        return {"not_measured": self.reason}

    def summary(self) -> str:
        return self.reason

    def to_dict(self) -> dict[str, Any]:
        return {"measured": False, "stn": self.reason != NO_STN, "reason": self.reason}


Health = StnHealth | NotMeasured


def from_dict(d: dict[str, Any]) -> Health:
    """The inverse of ``to_dict``, for health stored in ONNX metadata and sidecars."""
    if d.get("measured") is False:
        return NotMeasured(str(d.get("reason", "not measured")))
    fields = {k: d[k] for k in StnHealth.__dataclass_fields__ if k in d}
    return StnHealth(**fields)


def assess(theta: np.ndarray, image_size: int, *, applied: np.ndarray | None = None,
           dead_fraction: float | None = None, rts_copy: np.ndarray | None = None,
           labels: np.ndarray | None = None) -> Health:
    """Health from thetas (N, 2, 3), optionally the applied distortions, dead units, the
    thetas of an RTS-distorted copy of the same (undistorted) images and, with the applied
    distortions, the images' class labels (for ``undone_within_class``)."""
    t = np.asarray(theta, dtype=np.float64).reshape(-1, 2, 3)
    if len(t) < MIN_IMAGES:
        return NotMeasured(f"{len(t)} images are too few to measure theta's spread (need at "
                           f"least {MIN_IMAGES})")
    health = StnHealth(images=len(t), theta_spread_px=theta_spread_px(t, image_size),
                       spread=spreads(t), mean_pose=pose(t), dead_fraction=dead_fraction)
    if applied is not None:
        a = np.asarray(applied, dtype=np.float64).reshape(-1, 2, 3)
        if len(a) != len(t):
            raise ValueError(f"{len(a)} applied transforms for {len(t)} thetas")
        composed = compose(a, t)
        health.undone = _undone(spreads(a), spreads(composed))
        health.canonical_pose = pose(composed)
        if labels is not None:
            lab = np.asarray(labels).reshape(-1)
            if len(lab) != len(t):
                raise ValueError(f"{len(lab)} labels for {len(t)} thetas")
            health.undone_within_class = _undone(pooled_class_spreads(a, lab),
                                                 pooled_class_spreads(composed, lab))
    still = health.theta_spread_px < COLLAPSE_PX
    if still and rts_copy is not None:
        health.rts_copy_spread_px = theta_spread_px(rts_copy, image_size)
        still = health.rts_copy_spread_px < COLLAPSE_PX
    health.collapsed = still or dead_fraction == 1.0
    if health.collapsed:
        copy = "" if health.rts_copy_spread_px is None else (
            f", {health.rts_copy_spread_px:.2f} px on an RTS-distorted copy")
        health.warnings.append(
            f"the STN has collapsed: theta moves sampling points by {health.theta_spread_px:.2f}"
            f" px across images{copy} (< {COLLAPSE_PX} px), so it does not depend on the input")
    elif health.theta_spread_px > RUNAWAY_FRAMES * image_size or not np.isfinite(t).all():
        health.warnings.append(
            f"theta has run away: sampling points spread by {health.theta_spread_px:.0f} px "
            f"across images, more than the {image_size}-pixel frame")
    elif dead_fraction is not None and dead_fraction > DEAD_WARN:
        health.warnings.append(f"{pct(dead_fraction)} of the STN regressor's hidden units "
                               "never fire")
    return health


def measure(model: Any, images_uint8: Any, *, applied: Any = None, rts_copy: Any = None,
            labels: Any = None, batch: int = 500) -> Health:
    """Health of a torch STNClassifier on uint8 NCHW images (in eval mode, on its device).

    A still theta on undistorted images is re-judged on ``rts_copy`` (uint8 images, an
    RTS-distorted copy of them); without one, on the images distorted with RTS_COPY_SEED. A
    caller that already holds such a copy (train's --rts-augment probe) passes it, so that
    the verdict and the copy's own health come from the same images.
    """
    from stn_deploy.data import distort

    if getattr(model, "stn", None) is None:
        return NotMeasured(NO_STN)
    if len(images_uint8) == 0:
        return NotMeasured("no images to measure theta on")
    theta, dead = _thetas(model, images_uint8, batch)
    applied_np = None if applied is None else np.asarray(applied, dtype=np.float64)
    health = assess(theta, model.config.image_size, applied=applied_np, dead_fraction=dead,
                    labels=None if labels is None else np.asarray(labels))
    if (applied is None and isinstance(health, StnHealth) and health.collapsed
            and dead != 1.0):
        if rts_copy is None:
            rts_copy = distort(images_uint8, "rts", RTS_COPY_SEED)[0]
        copy, _ = _thetas(model, rts_copy, batch)
        health = assess(theta, model.config.image_size, dead_fraction=dead, rts_copy=copy)
    return health


def measure_set(model: Any, split: Any, *, rts_copy: Any = None) -> Health:
    """``measure`` on an ImageSet: its images, their known distortions and labels."""
    return measure(model, split.images, applied=split.applied, labels=split.labels,
                   rts_copy=rts_copy)


def _thetas(model: Any, images_uint8: Any, batch: int) -> tuple[np.ndarray, float | None]:
    """(thetas, share of the regressor's ReLUs that never fired; None for LeakyReLU)."""
    import torch

    from stn_deploy.data import normalize

    stn = model.stn
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hidden = stn.regressor[1]  # the activation between the two linear layers
    # Only ReLU units die (zero output and gradient for every image); LeakyReLU's cannot.
    can_die = isinstance(hidden, torch.nn.ReLU)
    fired: list[torch.Tensor] = []
    handle = hidden.register_forward_hook(lambda m, i, o: fired.append((o > 0).any(dim=0)))
    thetas = []
    try:
        with torch.no_grad():
            for start in range(0, len(images_uint8), batch):
                x = normalize(images_uint8[start:start + batch].to(device), model.config)
                thetas.append(stn.theta(x).cpu())
    finally:
        handle.remove()
        model.train(was_training)
    alive = torch.stack(fired).any(dim=0)
    dead = 1.0 - float(alive.float().mean()) if can_die else None
    return torch.cat(thetas).double().numpy(), dead
