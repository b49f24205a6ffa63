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
- Tiles of X are loaded in their own dtype (fp32, fp16 or bf16) and converted to
  fp32 before ``tl.dot``, which accumulates in fp32. For 16-bit X the conversion
  is exact and so is TF32 (10 mantissa bits hold fp16's and bf16's), so TF32
  tensor cores give the products exactly; for fp32 X the precision follows
  ``torch.get_float32_matmul_precision()`` like the reference's matmul
  (``"highest"``, the default, means IEEE fp32).
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
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton
from triton.runtime.interpreter import InterpretedFunction

# ---------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration: a square output tile and the reduction block.

    Every size is a power of two >= 16 so that ``tl.dot`` compiles on GPUs (the
    interpreter would accept smaller blocks; a GPU does not).
    """

    block_d: int  # output tile is block_d x block_d
    block_k: int  # reduction chunk (rows of X, or eigenpairs for the rebuild)
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_d", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")


# A few fixed configurations, chosen by the matrix size (not autotuned: autotuning
# would re-run an in-place kernel, and is very slow under the interpreter).
# Shared memory per stage of the fp32 pipeline: 2 * block_d * block_k * 4 bytes
# (16 KiB for 64x32, 32 KiB for 128x32), well under sm_80/sm_90 limits.
# TODO(gpu): tune on a GPU with bench/bench_triton.py.
CONFIGS = {
    "small": TileConfig(block_d=32, block_k=32, num_warps=4, num_stages=2),
    "medium": TileConfig(block_d=64, block_k=32, num_warps=4, num_stages=3),
    "large": TileConfig(block_d=128, block_k=32, num_warps=8, num_stages=3),
}


def pick_config(d: int) -> TileConfig:
    """The launch configuration for ``d x d`` outputs."""
    if d <= 32:
        return CONFIGS["small"]
    if d <= 512:
        return CONFIGS["medium"]
    return CONFIGS["large"]


def lower_tiles(d: int, block_d: int) -> int:
    """Number of tiles in the lower triangle (diagonal included) of a ``d x d`` grid."""
    t = triton.cdiv(d, block_d)
    return t * (t + 1) // 2


# CUDA caps grid axis 1 (the batch axis here) at 65535 programs.
MAX_BATCH = 65535


def check_batch(batch: int) -> None:
    """Raise ValueError when the flattened batch does not fit the launch grid."""
    if batch > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} matrices per launch (grid axis 1), got a batch of {batch}")


def fp32_input_precision() -> str:
    """``tl.dot`` precision for fp32 operands, following torch's matmul setting."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# ---------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------


@triton.jit
def lower_tile_coords(tile):
    """Map a linear index over the lower triangle of the tile grid to ``(bi, bj)``, ``bj <= bi``.

    Row-major: tiles 0, 1, 2, 3, ... are (0,0), (1,0), (1,1), (2,0), ...
    ``bi`` is the largest integer with ``bi (bi + 1) / 2 <= tile``; the float
    square root is corrected by one step either way, so it is exact.
    """
    bi = ((tl.sqrt((8 * tile + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    bi = tl.where(bi * (bi + 1) // 2 > tile, bi - 1, bi)
    bi = tl.where((bi + 1) * (bi + 2) // 2 <= tile, bi + 1, bi)
    bj = tile - bi * (bi + 1) // 2
    return bi, bj


@triton.jit
def store_mirrored(out_ptr, rows, cols, value, d, stride_r, stride_c):
    """Store a lower-triangle tile and its mirror image; each element written once.

    ``value[i, j]`` goes to ``(rows[i], cols[j])`` where ``rows[i] >= cols[j]`` and to
    ``(cols[j], rows[i])`` where ``rows[i] > cols[j]``: a diagonal tile writes its
    lower half and the transpose of its strict lower half, an off-diagonal tile
    writes itself and its transpose.
    """
    in_range = (rows[:, None] < d) & (cols[None, :] < d)
    tl.store(
        out_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
        value,
        mask=in_range & (rows[:, None] >= cols[None, :]),
    )
    tl.store(
        out_ptr + rows[:, None] * stride_c + cols[None, :] * stride_r,
        value,
        mask=in_range & (rows[:, None] > cols[None, :]),
    )


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
):
    bi, bj = lower_tile_coords(tl.program_id(0))
    batch = tl.program_id(1).to(tl.int64)

    rows = bi * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) feature indices of the tile rows
    cols = bj * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) feature indices of the tile columns
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
            x_chunk + rows[:, None] * stride_xd + ks[None, :] * stride_xn,
            mask=(rows[:, None] < d) & k_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        # (BLOCK_K, BLOCK_D): X[k, cols]
        b = tl.load(
            x_chunk + ks[:, None] * stride_xn + cols[None, :] * stride_xd,
            mask=k_ok[:, None] & (cols[None, :] < d),
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if HAS_MEAN:
            col_sum += tl.sum(a, axis=1)
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
# Offsets inside one d x d matrix are int32 (batch offsets are int64).
MAX_DIM = 46340  # floor(sqrt(2**31 - 1))


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

    precision = fp32_input_precision() if x.dtype == torch.float32 else "tf32"
    grid = (lower_tiles(d, config.block_d), batch)
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
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if not corr_is_view:
        corr.copy_(corr3.view(corr.shape))
    if not mean_is_view:
        mean.copy_(mean2.view(mean.shape))


def batched_view(t: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, bool]:
    """``t`` viewed as ``shape`` (batch dimensions merged), or a copy when no view exists.

    In-place outputs must be views of the caller's storage; when the batch
    dimensions do not merge into one stride, the caller computes into the copy and
    writes it back (the second item says which case this is).
    """
    try:
        return t.view(shape), True
    except RuntimeError:
        return t.reshape(shape).clone(), False


# ---------------------------------------------------------------------------
# PyTorch operators (compose with torch.compile)
# ---------------------------------------------------------------------------

# True when TRITON_INTERPRET=1 was set before this module was imported: the
# kernels then run on CPU tensors through Triton's NumPy interpreter.
INTERPRETED = isinstance(corr_ema_kernel, InterpretedFunction)


def define_op(name: str, mutates_args, fake: Callable):
    """Register ``fn`` as the operator ``name``: a ``triton_op`` on real GPUs.

    ``torch.library.triton_op`` lets ``torch.compile`` trace into the kernels
    (``fn`` is its own fake kernel: ``wrap_triton`` records the launch). Under the
    interpreter ``wrap_triton`` hands back the interpreted kernel, which would run on
    FakeTensors, so there the operator is an opaque ``custom_op`` with ``fake`` as
    its fake kernel instead: same schema, same eager behaviour.
    """

    def decorate(fn: Callable) -> Callable:
        if not INTERPRETED:
            return triton_op(name, fn, mutates_args=mutates_args)
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        op.register_fake(fake)
        return op

    return decorate


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
