"""The checks of a configuration that OmegaConf's types do not make: each numeric key's accepted
range (``RANGES``) and the checks across keys (the crop's area range, a blur kernel that fits the
image, IsoLoss only where it is defined). :func:`train.config.validate` runs them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the schema imports these checks
    from .config import AugConfig, Config

LOSS_NAMES = ("byol", "isoloss")
LOSS_FORMS = ("cosine", "euclidean")  # fastpred.losses.FORMS


@dataclass(frozen=True)
class Range:
    """The accepted values of a numeric key: finite numbers from ``lo`` to ``hi``, where an end
    marked open is excluded. A key holding several numbers (``aug.blur_p``) checks each."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return math.isfinite(v) and above and below

    def __str__(self) -> str:
        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        if self.hi == math.inf:
            return f"a finite number {'>' if self.lo_open else '>='} {num(self.lo)}"
        return f"a number in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, lo_open=True)
PROBABILITY = Range(0, 1)
BELOW_1 = Range(0, 1, hi_open=True)

RANGES: dict[str, Range] = {
    # seed: NumPy's seeds (torch's generators take them too); batch_size: BatchNorm in training mode
    # needs more than one value per channel
    "epochs": AT_LEAST_1, "seed": Range(0, 2**32 - 1), "batch_size": Range(2), "log_every": AT_LEAST_1,
    "data.image_size": AT_LEAST_1, "data.workers": NON_NEGATIVE, "data.train_subset": NON_NEGATIVE,
    "aug.crop_scale": Range(0, 1, lo_open=True), "aug.flip": PROBABILITY, "aug.jitter": NON_NEGATIVE,
    "aug.jitter_p": PROBABILITY, "aug.gray_p": PROBABILITY, "aug.blur_p": PROBABILITY,
    "aug.blur_kernel": POSITIVE, "aug.solarize_p": PROBABILITY, "model.width": AT_LEAST_1,
    "model.proj_hidden": AT_LEAST_1, "model.proj_dim": AT_LEAST_1, "model.ema_tau": PROBABILITY,
    "predictor.mlp_hidden": AT_LEAST_1, "predictor.rho": BELOW_1, "predictor.eps": NON_NEGATIVE,
    "predictor.freq": AT_LEAST_1, "predictor.power": POSITIVE, "predictor.min_eig": NON_NEGATIVE,
    "predictor.partitions": NON_NEGATIVE,
    "optim.lr": POSITIVE, "optim.lr_batch": NON_NEGATIVE, "optim.momentum": BELOW_1,
    "optim.weight_decay": NON_NEGATIVE, "optim.lars_eta": POSITIVE, "optim.warmup_epochs": NON_NEGATIVE,
    "monitor.knn_every": AT_LEAST_1, "monitor.knn_k": AT_LEAST_1, "monitor.knn_t": POSITIVE,
    "monitor.knn_max_train": NON_NEGATIVE, "monitor.probe_lr": POSITIVE, "monitor.collapse_erank": NON_NEGATIVE,
    "eval.epochs": AT_LEAST_1, "eval.batch_size": Range(2), "eval.lr_grid": POSITIVE,
    "eval.val_fraction": BELOW_1, "eval.weight_decay": NON_NEGATIVE,
    "ckpt.every_steps": NON_NEGATIVE, "ckpt.keep": AT_LEAST_1,
}


def check_ranges(values: dict[str, Any]) -> None:
    """Each key of ``RANGES`` in ``values`` (``{"dotted.key": value}``) within its range.

    Raises:
        ValueError: naming the first key out of range, its value and the accepted range.
    """
    for key, accepted in RANGES.items():
        value = values[key]
        if isinstance(value, list) and not value:
            raise ValueError(f"{key}=[] is empty: it needs at least one value, each {accepted}")
        if not all(v in accepted for v in (value if isinstance(value, list) else [value])):
            each = "each value " if isinstance(value, list) else ""
            raise ValueError(f"{key}={value!r} is out of range: {each}must be {accepted}")


def blur_kernel_side(size: int, fraction: float) -> int:
    """The odd side of the Gaussian blur kernel, ``aug.blur_kernel`` x ``size`` (at least 3)."""
    k = max(3, int(round(size * fraction)))
    return k if k % 2 == 1 else k + 1  # GaussianBlur needs an odd kernel


def check_augment(aug: AugConfig, size: int) -> None:
    """The crop's area range in order, and a blur kernel the image can hold: both blurs pad by
    reflection, which needs the kernel's half-width below the image side (a kernel of at most
    ``2 * size - 1`` pixels).

    Raises:
        ValueError: naming the keys, their values and what would be accepted.
    """
    lo, hi = aug.crop_scale
    if lo > hi:
        raise ValueError(f"aug.crop_scale=[{lo:g}, {hi:g}]: the lower bound of the crop's area range is above the "
                         f"upper one (write [{hi:g}, {lo:g}])")
    if max(aug.blur_p) == 0:
        return
    k, widest = blur_kernel_side(size, aug.blur_kernel), 2 * size - 1
    if widest < 3:
        raise ValueError(f"data.image_size={size} is too small to blur (the smallest kernel, 3 pixels, needs images "
                         f"of at least 2): set aug.blur_p=[0, 0]")
    if k > widest:
        raise ValueError(f"aug.blur_kernel={aug.blur_kernel:g} makes a {k}-pixel blur kernel, wider than "
                         f"data.image_size={size} allows (at most {widest} pixels): lower aug.blur_kernel, "
                         "or set aug.blur_p=[0, 0]")


def check_loss(cfg: Config) -> None:
    """``loss.*`` choices, and IsoLoss only where it is defined.

    IsoLoss (Halvagal, Laborieux & Zenke 2023) is derived for a predictor set in closed form from
    F: a symmetric PSD ``W_p`` with a square root ``W_p^(1/2)``. Its gradient reaches the online
    projection only, never ``W_p``, so a predictor trained by gradient (``linear``, ``mlp``, or
    DirectPred's SGD steps between rebuilds when ``freq > 1``) would not learn, and a trained
    ``W_p`` has no such square root. Its target is stop-gradient by definition.

    Raises:
        ValueError: naming the key, its value and what is accepted.
    """
    loss, pred = cfg.loss, cfg.predictor
    if loss.name not in LOSS_NAMES:
        raise ValueError(f"loss.name={loss.name!r}: expected one of {', '.join(LOSS_NAMES)}")
    if loss.form not in LOSS_FORMS:
        raise ValueError(f"loss.form={loss.form!r}: expected one of {', '.join(LOSS_FORMS)}")
    if loss.name != "isoloss":
        return
    why = ("IsoLoss needs W_p set from F (symmetric PSD, with a square root W_p^(1/2)) and sends no gradient "
           "to W_p")
    if pred.name != "directpred":
        raise ValueError(f"loss.name=isoloss needs predictor.name=directpred, got {pred.name!r}: {why}, so "
                         "linear and mlp (trained by gradient) would never learn, and with none (W_p = I) it is "
                         "the loss without a predictor, which collapses (use loss.name=byol)")
    if pred.freq != 1:
        raise ValueError(f"loss.name=isoloss needs predictor.freq=1, got {pred.freq}: {why}, so the SGD steps "
                         "on W_p between rebuilds would not happen")
    if not cfg.model.stop_grad:
        raise ValueError("loss.name=isoloss needs model.stop_grad=true: the stop-gradient on the target is part "
                         "of IsoLoss's definition")
