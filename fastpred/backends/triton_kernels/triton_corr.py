"""Fused correlation EMA in Triton (Eq. 19): ``F <- F + w (X^T X / N - F)``.

The plain-torch reference is :func:`fastpred.backends.reference.corr_ema_` (and
``gram``); ``tests/kernels/test_triton_corr.py`` holds this kernel against it and
``bench/bench_triton.py`` measures it.

How the kernel works:

- F is symmetric, so only the tiles of its lower triangle are computed: program
  ``t`` of grid axis 0 owns tile ``(bi, bj)``, ``bj <= bi``, and writes it twice,
  once in place and once mirrored across the diagonal: half a GEMM's work, and
  the result is exactly (bitwise) symmetric. A diagonal tile writes its lower
  half (diagonal included) and the mirror of its strict lower half, so no element
  is written by two programs or twice by one.
- Only the lower triangle of the old F is read (like ``torch.linalg.eigh``).
- Tiles of X are loaded in their own dtype (fp32, fp16 or bf16) and ``tl.dot``
  accumulates in fp32. 16-bit tiles go to the tensor cores' native fp16/bf16 dot
  (products of 16-bit numbers are exact in fp32, so this equals the reference's
  upcast-then-multiply up to summation order); for fp32 X the precision follows
  ``torch.get_float32_matmul_precision()`` like the reference's matmul
  (``"highest"``, the default, means IEEE fp32 FMA, no tensor cores: the reason
  ``backend="auto"`` leaves fp32 statistics to cuBLAS at that setting). Under the
  interpreter (tests on CPU) 16-bit tiles are widened to fp32 first, which is exact.
- Offsets along X are int64: a transposed X has ``stride_xd = N``, and
  ``d * N`` may exceed 2^31.
- ``w == 1`` (the first update) never loads the old F or mean: they are
  overwritten, NaN included. ``w`` is a float argument or read on the device from
  a 0-dim tensor (no host sync).
- The column sums for the mean EMA come for free from the X tiles the diagonal
  programs load anyway; only diagonal programs write the mean.
- Grid axis 1 is the batch: ``(..., d, d)`` matrices of several predictors update
  in one launch.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .triton_common import (
    INTERPRETED,
    MAX_DIM,
    TileConfig,
    batched_view,
    check_batch,
    define_op,
    fp32_input_precision,
    launch_device,
    lower_tile_coords,
    lower_tiles,
    pick_config,
    store_mirrored,
)

# ---------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------


@triton.jit
def corr_ema_kernel(
    # Pointers
    corr_ptr,  # (B, d, d) float32, updated in place
    x_ptr,  # (B, N, d) float32 / float16 / bfloat16
    mean_ptr,  # (B, d) float32, updated in place (when HAS_MEAN)
    weight_ptr,  # 0-dim float32 (when WEIGHT_FROM_PTR)
    # Sizes
    n_rows,
    d,
    # Strides
    stride_cb,
    stride_cr,
    stride_cc,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_mb,
    stride_md,
    # Scalars
    weight,  # used when not WEIGHT_FROM_PTR
    scale,  # 1/N for the EMA, 1 for a plain Gram matrix
    # Meta-parameters
    HAS_MEAN: tl.constexpr,
    WEIGHT_FROM_PTR: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    NATIVE_DOT: tl.constexpr,  # False under the interpreter only
):
    bi, bj = lower_tile_coords(tl.program_id(0))
    batch = tl.program_id(1).to(tl.int64)

    rows = bi * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) feature indices of the tile rows
    cols = bj * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) feature indices of the tile columns
    # Offsets into X in int64: rows * stride_xd reaches d * N for a transposed X.
    x_rows = rows.to(tl.int64) * stride_xd
    x_cols = cols.to(tl.int64) * stride_xd
    ks = tl.arange(0, BLOCK_K)
    # Samples k0 .. k0 + BLOCK_K of this matrix; advancing the pointer keeps every
    # offset below BLOCK_K * stride (int32) however large N * d is.
    x_chunk = x_ptr + batch * stride_xb

    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)  # X[:, rows]^T X[:, cols]
    col_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)  # sum over samples of X[:, rows]
    for k0 in range(0, n_rows, BLOCK_K):
        k_ok = k0 + ks < n_rows
        # (BLOCK_D, BLOCK_K): X[k, rows]^T, loaded transposed through the strides
        a = tl.load(
            x_chunk + x_rows[:, None] + ks[None, :] * stride_xn,
            mask=(rows[:, None] < d) & k_ok[None, :],
            other=0.0,
        )
        # (BLOCK_K, BLOCK_D): X[k, cols]
        b = tl.load(
            x_chunk + ks[:, None] * stride_xn + x_cols[None, :],
            mask=k_ok[:, None] & (cols[None, :] < d),
            other=0.0,
        )
        if not NATIVE_DOT:  # the interpreter multiplies bf16 wrongly: widen (exactly) first
            a, b = a.to(tl.float32), b.to(tl.float32)
        # In X's dtype: native fp16/bf16 tensor-core dot, fp32 accumulation.
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if HAS_MEAN:
            col_sum += tl.sum(a.to(tl.float32), axis=1)
        x_chunk += BLOCK_K * stride_xn

    if WEIGHT_FROM_PTR:
        w = tl.load(weight_ptr).to(tl.float32)
    else:
        w = weight
    # w == 1 overwrites: the old values are not even loaded (NaN-safe first update).
    # As a (BLOCK_D,) vector: the interpreter cannot AND a scalar predicate into a mask.
    blend = (tl.zeros((BLOCK_D,), dtype=tl.float32) + w) != 1.0

    corr_base = corr_ptr + batch * stride_cb
    lower = (rows[:, None] < d) & (cols[None, :] < d) & (rows[:, None] >= cols[None, :])
    old = tl.load(
        corr_base + rows[:, None] * stride_cr + cols[None, :] * stride_cc,
        mask=lower & blend[:, None],
        other=0.0,
    )
    new = old + w * (acc * scale - old)  # exactly acc * scale when w == 1 (old = 0)
    store_mirrored(corr_base, rows, cols, new, d, stride_cr, stride_cc)

    if HAS_MEAN:
        # Each diagonal program owns the mean entries of its rows.
        mean_ptrs = mean_ptr + batch * stride_mb + rows * stride_md
        mean_mask = (rows < d) & ((tl.zeros((BLOCK_D,), dtype=tl.int32) + bi) == bj)
        mean_old = tl.load(mean_ptrs, mask=mean_mask & blend, other=0.0)
        tl.store(mean_ptrs, mean_old + w * (col_sum * scale - mean_old), mask=mean_mask)


# ---------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(corr: Tensor, x: Tensor, weight_tensor: Tensor | None, mean: Tensor | None) -> None:
    if x.dim() < 2:
        raise ValueError(f"x must be (..., N, d), got shape {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    d = x.shape[-1]
    if x.shape[-2] == 0:
        raise ValueError("x must hold at least one sample (N >= 1), got N = 0")
    if d > MAX_DIM:
        raise ValueError(f"d must be at most {MAX_DIM} (int32 offsets inside a d x d matrix), got {d}")
    if corr.dtype != torch.float32:
        raise TypeError(f"corr must be float32, got {corr.dtype}")
    if tuple(corr.shape) != tuple(x.shape[:-2]) + (d, d):
        raise ValueError(
            f"corr must have shape {tuple(x.shape[:-2]) + (d, d)} for x of shape "
            f"{tuple(x.shape)}, got {tuple(corr.shape)}"
        )
    if x.device != corr.device:
        raise ValueError(f"x is on {x.device} but corr is on {corr.device}")
    if mean is not None:
        if mean.dtype != torch.float32 or tuple(mean.shape) != tuple(x.shape[:-2]) + (d,):
            raise ValueError(
                f"mean must be float32 of shape {tuple(x.shape[:-2]) + (d,)}, "
                f"got {mean.dtype} {tuple(mean.shape)}"
            )
        if mean.device != corr.device:
            raise ValueError(f"mean is on {mean.device} but corr is on {corr.device}")
    if weight_tensor is not None:
        if weight_tensor.numel() != 1 or weight_tensor.dim() != 0:
            raise ValueError(f"a tensor weight must be 0-dim, got shape {tuple(weight_tensor.shape)}")
        if weight_tensor.device != corr.device:
            raise ValueError(f"weight is on {weight_tensor.device} but corr is on {corr.device}")


def corr_ema_launch(
    corr: Tensor,
    x: Tensor,
    weight_tensor: Tensor | None,
    weight: float,
    mean: Tensor | None,
    scale: float | None = None,
    config: TileConfig | None = None,
) -> None:
    """Check the inputs and launch :func:`corr_ema_kernel` (in place on ``corr``, ``mean``).

    Args:
        corr: float32 ``(..., d, d)``, symmetric (its lower triangle is read).
        x: ``(..., N, d)`` float32, float16 or bfloat16.
        weight_tensor: 0-dim tensor holding the EMA weight, or None to use ``weight``.
        weight: the EMA weight when ``weight_tensor`` is None.
        mean: optional float32 ``(..., d)``.
        scale: multiplies ``x^T x`` (default ``1/N``).
        config: launch configuration (default :func:`pick_config`).
    """
    _check_inputs(corr, x, weight_tensor, mean)
    n, d = x.shape[-2], x.shape[-1]
    batch_shape = x.shape[:-2]
    batch = math.prod(batch_shape)
    if d == 0 or batch == 0:
        return
    check_batch(batch)
    config = config or pick_config(d)
    scale = 1.0 / n if scale is None else float(scale)

    x3 = x.reshape(batch, n, d)  # a view when possible; read only
    corr3, corr_is_view = batched_view(corr, (batch, d, d))
    mean2, mean_is_view = (None, True) if mean is None else batched_view(mean, (batch, d))
    w_t = None if weight_tensor is None else weight_tensor.to(torch.float32)

    # input_precision only matters for fp32 operands (16-bit ones use their native dot).
    precision = fp32_input_precision() if x.dtype == torch.float32 else "ieee"
    grid = (lower_tiles(d, config.block_d), batch)
    with launch_device(corr):
        wrap_triton(corr_ema_kernel)[grid](
            corr3,
            x3,
            mean2,
            w_t,
            n,
            d,
            corr3.stride(0),
            corr3.stride(1),
            corr3.stride(2),
            x3.stride(0),
            x3.stride(1),
            x3.stride(2),
            0 if mean2 is None else mean2.stride(0),
            0 if mean2 is None else mean2.stride(1),
            float(weight),
            scale,
            HAS_MEAN=mean2 is not None,
            WEIGHT_FROM_PTR=w_t is not None,
            BLOCK_D=config.block_d,
            BLOCK_K=config.block_k,
            INPUT_PRECISION=precision,
            NATIVE_DOT=not INTERPRETED,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    if not corr_is_view:
        corr.copy_(corr3.view(corr.shape))
    if not mean_is_view:
        mean.copy_(mean2.view(mean.shape))


# ---------------------------------------------------------------------------
# PyTorch operators (compose with torch.compile)
# ---------------------------------------------------------------------------


def _corr_ema_fake(corr: Tensor, x: Tensor, weight_tensor: Tensor | None, weight: float, mean: Tensor | None) -> None:
    _check_inputs(corr, x, weight_tensor, mean)


def _gram_fake(x: Tensor) -> Tensor:
    d = x.shape[-1]
    return x.new_empty(tuple(x.shape[:-2]) + (d, d), dtype=torch.float32)


@define_op("fastpred::triton_corr_ema_", mutates_args={"corr", "mean"}, fake=_corr_ema_fake)
def triton_corr_ema_(
    corr: Tensor,
    x: Tensor,
    weight_tensor: Tensor | None,
    weight: float,
    mean: Tensor | None,
) -> None:
    """``corr <- corr + w (x^T x / N - corr)`` (and the same EMA of the mean) in place.

    ``w`` is ``weight_tensor`` when given (read on the device), else ``weight``.
    """
    corr_ema_launch(corr, x, weight_tensor, weight, mean)


@define_op("fastpred::triton_gram", mutates_args=(), fake=_gram_fake)
def triton_gram(x: Tensor) -> Tensor:
    """``x^T x`` in float32, ``(..., d, d)``, from the lower-triangle tiles mirrored."""
    d = x.shape[-1]
    if x.dim() >= 2 and x.shape[-2] == 0:
        return x.new_zeros(tuple(x.shape[:-2]) + (d, d), dtype=torch.float32)  # empty sum
    out = torch.empty(tuple(x.shape[:-2]) + (d, d), dtype=torch.float32, device=x.device)
    # Weight 1: the (uninitialised) output is never read, only written.
    corr_ema_launch(out, x, None, 1.0, None, scale=1.0)
    return out
