"""The geometry of the feature-dependent predictor (paper Sec. 4, "random partitions").

k fixed random hyperplanes through the origin; hyperplane i splits the samples at a
threshold on the projection ``x . planes[:, i]`` (the batch mean in training, as the
authors do; a running mean of those in eval mode). Each half-space keeps its own F
and W_p, hence 2k predictors: rows 2i / 2i+1 serve the samples above / below
hyperplane i, and a sample's prediction averages the k predictors of its halves.
docs/design.md ("Random partitions") gives the rules; the statistics of each half are
folded by :mod:`fastpred.statistics` like those of a plain predictor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def random_hyperplanes(dim: int, k: int) -> Tensor:
    """``(dim, k)`` Gaussian normals of k random hyperplanes (from torch's global RNG)."""
    return torch.randn(dim, k)


def project(x: Tensor, planes: Tensor) -> Tensor:
    """``(N, k)`` float32 projections of the samples on the hyperplanes' normals (float32
    also inside an autocast region: they decide the split and feed the thresholds' EMA)."""
    with torch.autocast(x.device.type, enabled=False):
        return x.float() @ planes.float()


def batch_thresholds(proj: Tensor, synced: bool) -> Tensor:
    """``(k,)`` mean projection of the batch: over all ranks when ``synced`` (one
    all-reduce). The count travels as a tensor made on the device (no host copy)."""
    if not synced:
        return proj.mean(0)
    total = torch.cat([proj.sum(0), proj.new_full((1,), proj.shape[0])])
    dist.all_reduce(total)
    return total[:-1] / total[-1]


def half_space_masks(proj: Tensor, thresholds: Tensor) -> Tensor:
    """``(2k, N)`` 0/1 float: row 2i is 1 where a sample lies on or above the threshold
    of hyperplane i, row 2i+1 where it lies below."""
    above = (proj >= thresholds).float().T  # (k, N)
    return torch.stack([above, 1.0 - above], dim=1).reshape(2 * proj.shape[1], proj.shape[0])


def partitioned_linear(x: Tensor, weight: Tensor, masks: Tensor) -> Tensor:
    """``y_n = (1/k) sum_i W_{i, half of n} x_n`` without forming per-sample matrices.

    Args:
        x: ``(N, d)``.
        weight: ``(2k, d, d)``, the predictors of the half-spaces.
        masks: ``(2k, N)`` from :func:`half_space_masks`.
    """
    k = weight.shape[0] // 2
    y_all = torch.einsum("nd,jed->jne", x, weight)  # (2k, N, d): every predictor on every sample
    coef = (masks / k).to(y_all.dtype)  # (2k, N)
    return torch.einsum("jn,jne->ne", coef, y_all)
