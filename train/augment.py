"""Image transforms: BYOL / DirectPred two-view augmentations, linear-evaluation and centre-crop
evaluation transforms (the role of MoCo's ``loader.py`` and torchvision's ``presets.py``).

Every transform draws from torch's global RNG only; :class:`train.data.Views` seeds it per sample
from (seed, epoch, index), which makes a run independent of worker count and exactly resumable.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2 as T

from .config import AugConfig
from .config_checks import blur_kernel_side


def _finish(mean: Sequence[float], std: Sequence[float], normalize: bool) -> list:
    steps = [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
    if normalize:
        steps.append(T.Normalize(mean, std))
    return steps


def view_transform(cfg: AugConfig, view: int, size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """The augmentation of view ``view`` (0 or 1): random-resized crop, flip, colour jitter,
    grayscale, Gaussian blur (sigma 0.1-2) and solarization, each applied with its probability.

    BYOL (Grill et al. 2020, Table 6) uses blur_p = (1.0, 0.1) and solarize_p = (0.0, 0.2); the
    DirectPred STL-10/CIFAR recipes draw both views from the same distribution.
    """
    steps: list = [T.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), antialias=True)]
    if cfg.flip > 0:
        steps.append(T.RandomHorizontalFlip(cfg.flip))
    if cfg.jitter_p > 0 and any(cfg.jitter):
        b, c, s, h = cfg.jitter
        steps.append(T.RandomApply([T.ColorJitter(b, c, s, h)], p=cfg.jitter_p))
    if cfg.gray_p > 0:
        steps.append(T.RandomGrayscale(cfg.gray_p))
    if cfg.blur_p[view] > 0:
        steps.append(T.RandomApply([T.GaussianBlur(blur_kernel_side(size, cfg.blur_kernel), sigma=(0.1, 2.0))],
                                   p=cfg.blur_p[view]))
    if cfg.solarize_p[view] > 0:
        # before ToDtype: PIL and uint8 images, so the threshold is on the 0-255 scale
        steps.append(T.RandomSolarize(threshold=128, p=cfg.solarize_p[view]))
    return T.Compose(steps + _finish(mean, std, cfg.normalize))


def two_view_transforms(cfg: AugConfig, size: int, mean: Sequence[float], std: Sequence[float]) -> tuple:
    return view_transform(cfg, 0, size, mean, std), view_transform(cfg, 1, size, mean, std)


def linear_train_transform(size: int, mean: Sequence[float], std: Sequence[float], normalize: bool) -> T.Compose:
    """Linear evaluation, training side: random-resized crop and horizontal flip only."""
    return T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()]
                     + _finish(mean, std, normalize))


def eval_transform(size: int, resize: int, mean: Sequence[float], std: Sequence[float], normalize: bool) -> T.Compose:
    """Evaluation: resize the short side to ``resize``, then the centre ``size`` crop."""
    return T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(size)] + _finish(mean, std, normalize))
