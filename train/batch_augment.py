"""Two-view augmentation of a whole batch by tensor operations on the training device.

The views of :func:`train.augment.view_transform` (random-resized crop, flip, colour jitter,
grayscale, Gaussian blur, solarize), made for a batch of uint8 images at once instead of one
image at a time in the data loader. The per-sample parameters follow torchvision's transforms
draw for draw (same distributions, same rejection sampling for the crop box, same order of the
colour-jitter operations drawn per sample); the pixels are computed in float32 throughout, where
the per-sample path rounds to uint8 after every operation.

Parameters are a function of (run seed, epoch, index, view) only: each sample has its own
counter-based stream (:func:`uniforms`), so its views do not depend on the batch it lands in, on
the number of processes or workers, and a resumed run draws exactly what an uninterrupted one does.

Resampling: a crop box resized to ``size`` x ``size`` is the separable product
``A_y @ image @ A_x^T`` with per-sample weight matrices holding the antialiased bilinear filter
of ``torch.nn.functional.interpolate(..., antialias=True)`` (PIL's triangle filter, widened by
the scale factor when downscaling), so a batch of boxes of different sizes is two batched matrix
products, exact to float rounding against torchvision's ``resized_crop``; the horizontal flip
reverses the rows of ``A_x``. The Gaussian blur is the same kind of product with a per-sample
banded matrix that includes the reflect padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from .config import AugConfig
from .config_checks import blur_kernel_side

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range
CROP_TRIES = 10  # RandomResizedCrop's attempts before its centre-crop fallback
SIGMA = (0.1, 2.0)  # GaussianBlur's sigma range in train.augment
SOLARIZE_THRESHOLD = 128 / 255  # RandomSolarize(threshold=128) on uint8 images

# slots of a view's stream: each parameter reads its own uniform whatever the configuration
_AREA, _LOG_RATIO = 0, CROP_TRIES
_TOP, _LEFT = 2 * CROP_TRIES, 2 * CROP_TRIES + 1
_FLIP, _JITTER, _ORDER, _FACTOR = _LEFT + 1, _LEFT + 2, _LEFT + 3, _LEFT + 7  # order: 4 keys, factors: 4
_GRAY, _BLUR, _SIGMA, _SOLARIZE = _FACTOR + 4, _FACTOR + 5, _FACTOR + 6, _FACTOR + 7
SLOTS = _SOLARIZE + 1

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele et al. 2014) on uint64 arrays."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epochs: Sequence[int] | np.ndarray, indices: Sequence[int] | np.ndarray, view: int,
             n: int = SLOTS) -> np.ndarray:
    """``n`` uniforms in [0, 1) per sample, a function of (seed, epoch, index, view) only.

    A SplitMix64 stream per sample: its state is a hash of the four integers, each absorbed by
    SplitMix64's mixing function, and its k-th output is ``mix(state + (k + 1) * golden)``.

    Returns:
        (len(indices), n) float64, 53 random bits each.
    """
    with np.errstate(over="ignore"):
        e = np.asarray(epochs, dtype=np.int64).astype(np.uint64)
        i = np.asarray(indices, dtype=np.int64).astype(np.uint64)
        state = _mix(np.full(i.shape, seed, dtype=np.uint64) + _GOLDEN)
        for word in (e, i, np.full(i.shape, view, dtype=np.uint64)):
            state = _mix((state ^ word) + _GOLDEN)
        k = np.arange(1, n + 1, dtype=np.uint64)
        bits = _mix(state[:, None] + k[None, :] * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


@dataclass
class ViewParams:
    """One view's parameters for a batch; each field has the batch as its first dimension."""

    top: torch.Tensor  # crop box, in pixels of the input image (int64)
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor  # bool
    jitter: torch.Tensor  # bool: colour jitter applied
    order: torch.Tensor  # (B, 4) int64: brightness 0, contrast 1, saturation 2, hue 3, in the order applied
    factors: torch.Tensor  # (B, 4) float64: brightness, contrast, saturation, hue factors
    gray: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor  # float64
    solarize: torch.Tensor  # bool


def crop_boxes(u: np.ndarray, height: int, width: int, scale: Sequence[float],
               ratio: Sequence[float] = RATIO) -> tuple[np.ndarray, ...]:
    """RandomResizedCrop's boxes (``get_params``) for a batch, from each sample's uniforms.

    Up to ten (area, log aspect ratio) draws; the first whose rounded box fits is placed
    uniformly; when none fits, torchvision's centre crop with the ratio clamped.

    Returns:
        (top, left, height, width), each (B,) int64.
    """
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, _AREA:_AREA + CROP_TRIES])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * u[:, _LOG_RATIO:_LOG_RATIO + CROP_TRIES])
    w = np.round(np.sqrt(area * aspect)).astype(np.int64)  # round half to even, as Python's round
    h = np.round(np.sqrt(area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)
    rows = np.arange(len(u))
    w, h, found = w[rows, first], h[rows, first], fits.any(axis=1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w, h = np.where(found, w, fw), np.where(found, h, fh)
    top = np.where(found, np.floor(u[:, _TOP] * (height - h + 1)), (height - h) // 2).astype(np.int64)
    left = np.where(found, np.floor(u[:, _LEFT] * (width - w + 1)), (width - w) // 2).astype(np.int64)
    return top, left, h, w


def jitter_ranges(jitter: Sequence[float]) -> list[tuple[float, float] | None]:
    """ColorJitter's factor ranges; None for an operation it leaves out (a strength of 0)."""
    b, c, s, h = jitter
    return [(max(0.0, 1 - v), 1 + v) if v > 0 else None for v in (b, c, s)] + [(-h, h) if h > 0 else None]


def draw_params(cfg: AugConfig, view: int, u: np.ndarray, height: int, width: int) -> ViewParams:
    """The parameters of view ``view`` (0 or 1) from the uniforms ``u`` (B, SLOTS).

    Each transform is applied when its uniform is below its probability (``torch.rand(1) < p``
    in torchvision's Random* transforms); the colour-jitter order is the argsort of four
    uniforms (a uniformly random permutation, as ``torch.randperm(4)``).
    """
    top, left, h, w = crop_boxes(u, height, width, cfg.crop_scale)
    ranges = jitter_ranges(cfg.jitter)
    factors = np.ones((len(u), 4))
    factors[:, 3] = 0.0
    for k, r in enumerate(ranges):
        if r is not None:
            factors[:, k] = r[0] + (r[1] - r[0]) * u[:, _FACTOR + k]
    jitter_on = cfg.jitter_p > 0 and any(r is not None for r in ranges)
    t = torch.from_numpy
    return ViewParams(
        top=t(top), left=t(left), height=t(h), width=t(w),
        flip=t(u[:, _FLIP] < cfg.flip),
        jitter=t((u[:, _JITTER] < cfg.jitter_p) & jitter_on),
        order=t(np.argsort(u[:, _ORDER:_ORDER + 4], axis=1, kind="stable")),
        factors=t(factors),
        gray=t(u[:, _GRAY] < cfg.gray_p),
        blur=t(u[:, _BLUR] < cfg.blur_p[view]),
        sigma=t(SIGMA[0] + (SIGMA[1] - SIGMA[0]) * u[:, _SIGMA]),
        solarize=t(u[:, _SOLARIZE] < cfg.solarize_p[view]))


# ----------------------------------------------------------------------------- resampling


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """Per-sample matrices resizing the segment [start, start + length) of an axis of ``in_size``
    pixels to ``out_size`` pixels: antialiased bilinear, as ``interpolate(mode="bilinear",
    antialias=True, align_corners=False)`` (aten's ``_upsample_bilinear2d_aa``).

    Output pixel i has centre ``c = (i + 0.5) * scale`` in the segment (scale = length / out_size);
    the triangle filter of half-width ``support = max(scale, 1)`` weighs segment pixel x by
    ``max(0, 1 - |x + 0.5 - c| / support)`` over the window
    ``[max(trunc(c - support + 0.5), 0), min(trunc(c + support + 0.5), length))``, normalised.

    Args:
        start, length: (B,) int64 on the target device.

    Returns:
        (B, out_size, in_size) float32.
    """
    scale = (length.double() / out_size)[:, None, None]  # (B, 1, 1)
    support = scale.clamp(min=1.0)
    centre = (torch.arange(out_size, device=start.device, dtype=torch.float64)[None, :, None] + 0.5) * scale
    x = (torch.arange(in_size, device=start.device)[None, None, :] - start[:, None, None]).double()  # (B, 1, in)
    lo = torch.trunc(centre - support + 0.5).clamp(min=0)
    hi = torch.minimum(torch.trunc(centre + support + 0.5), length[:, None, None].double())
    w = (1 - (x + 0.5 - centre).abs() / support).clamp(min=0) * ((x >= lo) & (x < hi))
    return (w / w.sum(dim=2, keepdim=True)).float()


def resized_crop(images: torch.Tensor, p: ViewParams, size: int) -> torch.Tensor:
    """Crop each image to its box, resize it to ``size`` x ``size`` (antialiased bilinear) and
    flip it where ``p.flip``: ``A_y @ image @ A_x^T`` per sample.

    Args:
        images: (B, C, H, W) float.
    """
    _, _, height, width = images.shape
    dev = images.device
    ay = resize_weights(p.top.to(dev), p.height.to(dev), height, size)  # (B, S, H)
    ax = resize_weights(p.left.to(dev), p.width.to(dev), width, size)  # (B, S, W)
    ax = torch.where(p.flip.to(dev)[:, None, None], ax.flip(1), ax)  # flipping the output reverses A_x's rows
    b, c = images.shape[:2]
    x = torch.bmm(images.reshape(b, c * height, width), ax.transpose(1, 2))  # (B, C*H, S): columns resampled
    x = x.view(b, c, height, size).transpose(1, 2).reshape(b, height, c * size)  # (B, H, C*S)
    return torch.bmm(ay, x).view(b, size, c, size).transpose(1, 2).contiguous()  # (B, C, S, S)


def blur_weights(sigma: torch.Tensor, kernel: int, size: int) -> torch.Tensor:
    """Per-sample (size, size) matrices of GaussianBlur's 1-D kernel with reflect padding.

    The kernel is torchvision's: ``exp(-t^2 / (2 sigma^2))`` at integer offsets t from
    ``-(kernel - 1) / 2`` to ``(kernel - 1) / 2``, normalised; output pixel i sums the kernel times
    input pixel ``reflect(i + t)``.

    Returns:
        (B, size, size) float32 on ``sigma``'s device.
    """
    r = kernel // 2
    t = torch.arange(-r, r + 1, device=sigma.device, dtype=torch.float64)
    k = torch.softmax(-(t[None, :] / sigma.double()[:, None]) ** 2 / 2, dim=1)  # (B, kernel)
    src = torch.arange(size, device=sigma.device)[:, None] + torch.arange(-r, r + 1, device=sigma.device)[None, :]
    src = src.abs()  # reflect below 0 ...
    src = torch.where(src > size - 1, 2 * (size - 1) - src, src)  # ... and above size - 1
    m = torch.zeros(len(sigma), size, size, device=sigma.device, dtype=torch.float64)
    m.scatter_add_(2, src[None].expand(len(sigma), -1, -1), k[:, None, :].expand(-1, size, -1))
    return m.float()


# ----------------------------------------------------------------------------- colour


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601-2, torchvision's), (n, 1, H, W); a 1-channel image is its own."""
    return x if x.shape[1] == 1 else TF.rgb_to_grayscale(x, num_output_channels=1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1).to(x.dtype)
    return (f * x + (1 - f) * other).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images in [0, 1] by ``shift`` (fractions of a turn, per sample),
    through HSV as torchvision's ``adjust_hue``."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    h6 = torch.remainder(h + shift.view(-1, 1, 1).to(x.dtype), 1.0).unsqueeze(1) * 6  # (n, 1, H, W)
    # HSV to RGB: channel c (offsets 5, 3, 1 for r, g, b) is v - v s clamp(min(k, 4 - k), 0, 1),
    # k = (offset + 6 h) mod 6 (the sector table of torchvision's _hsv_to_rgb, in closed form)
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1) + h6, 6)
    v = maxc.unsqueeze(1)
    return (v - v * s.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)).clamp(0, 1)


def _adjust(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    """ColorJitter's operation ``op`` (brightness, contrast, saturation, hue) with factors ``f``."""
    if op == 0:
        return _blend(x, torch.zeros_like(x), f)
    if op == 1:
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)
    if x.shape[1] == 1:  # saturation and hue leave a grey image as it is (torchvision, PIL)
        return x
    return _blend(x, _gray(x), f) if op == 2 else adjust_hue(x, f)


def color_jitter(x: torch.Tensor, p: ViewParams, ranges: Sequence[tuple[float, float] | None]) -> torch.Tensor:
    """ColorJitter where ``p.jitter``: each sample's operations in its own order ``p.order``."""
    on = p.jitter
    if not bool(on.any()):
        return x
    x = x.clone()
    for position in range(4):
        for op, r in enumerate(ranges):
            if r is None:
                continue
            idx = torch.nonzero(on & (p.order[:, position] == op)).squeeze(1)  # on the host: no device sync
            if len(idx):
                dev_idx = idx.to(x.device)
                x[dev_idx] = _adjust(x[dev_idx], op, p.factors[idx, op].to(x.device))
    return x


# ----------------------------------------------------------------------------- the views


class BatchAugment:
    """Both views of a batch, as :func:`train.augment.two_view_transforms` makes them per sample.

    Args:
        cfg: the ``aug`` section.
        size: output side (``data.image_size``).
        mean, std: per-channel normalisation (used when ``cfg.normalize``).
        seed: the run's seed.

    Example:
        >>> augment = BatchAugment(cfg.aug, 28, (0.286,), (0.353,), seed=0)
        >>> v1, v2 = augment(images_uint8, epochs, indices)  # (B, C, 28, 28) float32 each
    """

    def __init__(self, cfg: AugConfig, size: int, mean: Sequence[float], std: Sequence[float], seed: int):
        self.cfg, self.size, self.seed = cfg, size, seed
        self.mean, self.std = list(mean), list(std)
        self.kernel = blur_kernel_side(size, cfg.blur_kernel)
        self.ranges = jitter_ranges(cfg.jitter)

    def params(self, epochs: torch.Tensor, indices: torch.Tensor, view: int, height: int, width: int) -> ViewParams:
        return draw_params(self.cfg, view, uniforms(self.seed, epochs, indices, view), height, width)

    def view(self, images: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """One view of ``images`` (B, C, H, W) uint8, as float32 (B, C, size, size)."""
        x = resized_crop(images.float() / 255, p, self.size)
        x = color_jitter(x, p, self.ranges)
        dev = x.device
        if x.shape[1] == 3 and bool(p.gray.any()):  # RandomGrayscale keeps the 3 channels
            x = torch.where(p.gray.to(dev)[:, None, None, None], TF.rgb_to_grayscale(x, num_output_channels=3), x)
        if bool(p.blur.any()):
            idx = torch.nonzero(p.blur).squeeze(1)
            k = blur_weights(p.sigma[idx].to(dev), self.kernel, self.size)[:, None]  # (n, 1, S, S)
            dev_idx = idx.to(dev)
            x[dev_idx] = k @ x[dev_idx] @ k.transpose(-1, -2)
        if bool(p.solarize.any()):
            x = torch.where(p.solarize.to(dev)[:, None, None, None], TF.solarize(x, SOLARIZE_THRESHOLD), x)
        if self.cfg.normalize:
            x = TF.normalize(x, self.mean, self.std)
        return x

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, epochs: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Both views of ``images`` (B, C, H, W) uint8 on the training device; ``epochs`` and
        ``indices`` (B,) int64 on the host name each sample."""
        _, _, height, width = images.shape
        return tuple(self.view(images, self.params(epochs, indices, v, height, width)) for v in (0, 1))
