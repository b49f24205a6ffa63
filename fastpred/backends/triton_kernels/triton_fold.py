"""The guards of a DirectPred step in Triton: the fold of a step's moments (Eq. 19),
judged by them, and the install guard of a rebuild. The torch reference is
:func:`fastpred.backends.reference.fold_` and :func:`~fastpred.backends.reference.install_`;
``tests/kernels/test_triton_fold.py`` holds these kernels against it.

A skip must be decided for the whole step before anything is written, and on the
device (no host sync), so each guard is two launches:

1. :func:`nonfinite_kernel` ORs "some entry is Inf or NaN" of a tensor into an int32
   flag (one atomic per program); the fold judges ``gram``, ``total`` and ``count``.
2. :func:`fold_kernel` reads the flag, computes the weight of its F
   (``1`` for a first fold, ``1 - rho`` after, ``0`` when the step is not usable or the F
   received no sample) and applies ``F <- F + w (G / n - F)`` to its block, masked off
   entirely where ``w == 0`` (a skipped step reads and writes nothing). Grid axis 1 is
   the stack of F (partitions); block 0 of each F also writes its weight and its mean.
   :func:`install_kernel` copies ``new`` into ``weight`` where the flag is clear.

The EMA uses torch.lerp's formula (exact at both ends), as the reference's ``ema_``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .triton_common import define_op, launch_device

BLOCK = 1024  # entries per program (a d x d block of F, a stretch of a flattened tensor)


@triton.jit
def nonfinite_kernel(x_ptr, numel, flag_ptr, BLOCK: tl.constexpr):
    """``flag |= 1`` when some entry of ``x`` (float32, contiguous) is Inf or NaN."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < numel, other=0.0)
    bad = tl.max((x != x) | (tl.abs(x) == float("inf")), axis=0)
    if bad:
        tl.atomic_or(flag_ptr, 1)


@triton.jit
def _lerp(a, b, w):
    return tl.where(tl.abs(w) < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def fold_kernel(corr_ptr, gram_ptr, total_ptr, count_ptr, first_ptr, mean_ptr, weight_ptr, usable_ptr, flag_ptr,
                d, blend, HAS_MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """One block of one F: the weight from the flag, ``first`` and ``count``; then the EMA."""
    block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    usable = tl.load(flag_ptr) == 0
    n = tl.load(count_ptr + b)
    first = tl.load(first_ptr + b) != 0
    w = tl.where(usable & (n > 0), tl.where(first, 1.0, blend), 0.0)
    n = tl.maximum(n, 1.0)
    dd = d.to(tl.int64) * d
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    # Scalar conditions enter the masks through the bound (w == 0: nothing read or written).
    mask = offsets < tl.where(w != 0.0, dd, 0)
    g = tl.load(gram_ptr + b * dd + offsets, mask=mask, other=0.0) / n
    f = tl.load(corr_ptr + b * dd + offsets, mask=offsets < tl.where((w != 0.0) & (w != 1.0), dd, 0), other=0.0)
    tl.store(corr_ptr + b * dd + offsets, tl.where(w == 1.0, g, _lerp(f, g, w)), mask=mask)
    if block == 0:
        tl.store(weight_ptr + b, w)
        if b == 0:
            tl.store(usable_ptr, usable)
        if HAS_MEAN:
            for start in range(0, d, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                m_mask = cols < tl.where(w != 0.0, d, 0)
                t = tl.load(total_ptr + b * d + cols, mask=m_mask, other=0.0) / n
                m = tl.load(mean_ptr + b * d + cols, mask=cols < tl.where((w != 0.0) & (w != 1.0), d, 0), other=0.0)
                tl.store(mean_ptr + b * d + cols, tl.where(w == 1.0, t, _lerp(m, t, w)), mask=m_mask)


@triton.jit
def install_kernel(weight_ptr, new_ptr, numel, ok_ptr, flag_ptr, BLOCK: tl.constexpr):
    """``weight <- new`` where the flag (``new`` has a non-finite entry) is clear."""
    ok = tl.load(flag_ptr) == 0
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < tl.where(ok, numel, 0)
    tl.store(weight_ptr + offsets, tl.load(new_ptr + offsets, mask=mask), mask=mask)
    if tl.program_id(0) == 0:
        tl.store(ok_ptr, ok)


def _judge(flag: Tensor, *tensors: Tensor) -> None:
    for t in tensors:
        if t.numel():
            wrap_triton(nonfinite_kernel)[(triton.cdiv(t.numel(), BLOCK),)](t, t.numel(), flag, BLOCK=BLOCK)


def _check_fold(corr: Tensor, gram: Tensor, total: Tensor, count: Tensor, first: Tensor, mean: Tensor | None) -> None:
    d = corr.shape[-1]
    stack = tuple(corr.shape[:-2])
    shapes = {"corr": (corr, (*stack, d, d)), "gram": (gram, (*stack, d, d)), "total": (total, (*stack, d)),
              "count": (count, stack)}
    if mean is not None:
        shapes["mean"] = (mean, (*stack, d))
    for name, (t, shape) in shapes.items():
        if t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous() or t.device != corr.device:
            raise ValueError(f"{name} must be a contiguous float32 tensor of shape {shape} on {corr.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if first.dtype != torch.bool or tuple(first.shape) != stack or first.device != corr.device:
        raise ValueError(f"first must be a bool tensor of shape {stack} on {corr.device}, got {first.dtype} "
                         f"{tuple(first.shape)}")


def _fold_fake(corr, gram, total, count, first, rho, mean):
    _check_fold(corr, gram, total, count, first, mean)
    return corr.new_empty(count.shape), corr.new_empty((), dtype=torch.bool)


def fold_launch(corr: Tensor, gram: Tensor, total: Tensor, count: Tensor, first: Tensor, rho: float,
                mean: Tensor | None) -> tuple[Tensor, Tensor]:
    """Check the inputs and launch :func:`nonfinite_kernel` (per sum) and :func:`fold_kernel`."""
    _check_fold(corr, gram, total, count, first, mean)
    d = corr.shape[-1]
    batch = count.numel()
    weight = torch.zeros(count.shape, dtype=torch.float32, device=corr.device)
    usable = torch.zeros((), dtype=torch.bool, device=corr.device)
    flag = torch.zeros((), dtype=torch.int32, device=corr.device)
    with launch_device(corr):
        _judge(flag, gram, total, count)
        if batch:
            grid = (max(1, triton.cdiv(d * d, BLOCK)), batch)
            wrap_triton(fold_kernel)[grid](corr, gram, total, count, first.contiguous(), mean, weight, usable, flag,
                                           d, float(1.0 - rho), HAS_MEAN=mean is not None, BLOCK=BLOCK)
    return weight, usable


@define_op("fastpred::triton_fold_", mutates_args={"corr", "mean"}, fake=_fold_fake)
def triton_fold_(corr: Tensor, gram: Tensor, total: Tensor, count: Tensor, first: Tensor, rho: float,
                 mean: Tensor | None) -> tuple[Tensor, Tensor]:
    """The fold of :func:`fastpred.backends.reference.fold_`: returns ``(weight, usable)``."""
    return fold_launch(corr, gram, total, count, first, rho, mean)


def _install_fake(weight, new):
    return weight.new_empty((), dtype=torch.bool)


def install_launch(weight: Tensor, new: Tensor) -> Tensor:
    """Check the inputs and launch :func:`nonfinite_kernel` and :func:`install_kernel`."""
    if (weight.dtype != torch.float32 or new.dtype != torch.float32 or weight.shape != new.shape
            or not weight.is_contiguous() or not new.is_contiguous()):
        raise ValueError("weight and new must be contiguous float32 tensors of one shape, got "
                         f"{weight.dtype} {tuple(weight.shape)} and {new.dtype} {tuple(new.shape)}")
    ok = torch.zeros((), dtype=torch.bool, device=weight.device)
    flag = torch.zeros((), dtype=torch.int32, device=weight.device)
    with launch_device(weight):
        _judge(flag, new)
        wrap_triton(install_kernel)[(max(1, triton.cdiv(new.numel(), BLOCK)),)](weight, new, new.numel(), ok, flag,
                                                                              BLOCK=BLOCK)
    return ok


@define_op("fastpred::triton_install_", mutates_args={"weight"}, fake=_install_fake)
def triton_install_(weight: Tensor, new: Tensor) -> Tensor:
    """``weight <- new`` where ``new`` is all finite (contiguous float32, one shape);
    returns the 0-dim bool "installed"."""
    return install_launch(weight, new)
