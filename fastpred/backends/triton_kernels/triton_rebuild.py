"""Fused DirectPred rebuild in Triton (Eq. 18): ``W = U diag(p) U^T``, ``p = eig_map(s)``.

The plain-torch reference is :func:`fastpred.backends.reference.rebuild` (the map
itself: :class:`fastpred.eig_map.EigMap`); ``tests/kernels/test_triton_rebuild.py``
holds this kernel against it and ``bench/bench_triton.py`` measures it.

How the kernel works:

- The eigenvalue map is computed inside the kernel, per reduction chunk, from
  ``s``: no ``p`` tensor is written or read. Each program first reduces
  ``max(max_j s_j, 0)`` over its matrix's eigenvalues (``d`` floats, against the
  ``2 d block_d`` of U it reads anyway), so ``s`` need not be sorted.
- Both eps modes of :class:`fastpred.eig_map.EigMap`: ``relative``
  ``p = max((max(s,0)/s_max) ** power + eps, min_eig)`` (divide by 1 when
  ``s_max <= 0``) and ``absolute`` ``p = max(s,0) ** power + eps * s_max``.
  ``power`` 1 and 1/2 are exact (identity, IEEE square root); other powers use
  ``exp2(power * log2(.))``. The division is IEEE (``div_rn``), like torch's.
- W is symmetric: only lower-triangle tiles are computed and each is stored
  with its mirror image (see :func:`fastpred.backends.triton_kernels.triton_common.store_mirrored`),
  so ``W == W^T`` bitwise. ``sum_k U[i,k] p_k U[j,k]`` needs no sign assumption
  on p (``min_eig < 0`` or ``eps < 0`` are allowed).
- ``tl.dot`` accumulates in fp32 with the precision of
  ``torch.get_float32_matmul_precision()`` (``"highest"``: IEEE fp32), like the
  reference's matmul.
- Grid axis 1 is the batch of matrices.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ...eig_map import EigMap
from .triton_common import (
    MAX_DIM,
    TileConfig,
    check_batch,
    define_op,
    fp32_input_precision,
    launch_device,
    lower_tile_coords,
    lower_tiles,
    pick_config,
    store_mirrored,
)

@triton.jit
def eig_map_block(s, s_max, eps, power, min_eig, RELATIVE: tl.constexpr, POWER_KIND: tl.constexpr):
    """Elementwise p = g(s) for a block of eigenvalues ``s`` given ``s_max = max(max_j s_j, 0)``.

    POWER_KIND: 1 for power 1, 2 for power 1/2, 0 for any other power.
    """
    # NaN propagates (as in the reference): a failed eigendecomposition's NaN
    # eigenvalues must give a NaN W, which the caller's finiteness check rejects.
    s = tl.maximum(s, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if RELATIVE:
        base = tl.div_rn(s, tl.where(s_max > 0.0, s_max, 1.0))
    else:
        base = s
    if POWER_KIND == 1:
        powered = base
    elif POWER_KIND == 2:
        powered = tl.sqrt_rn(base)
    else:
        # 0 ** power = 0 for power > 0; log2 of a positive stand-in avoids -inf.
        positive = base > 0.0
        powered = tl.where(positive, tl.exp2(power * tl.log2(tl.where(positive, base, 1.0))), 0.0)
    if RELATIVE:
        p = tl.maximum(powered + eps, min_eig, propagate_nan=tl.PropagateNan.ALL)
    else:
        p = powered + eps * s_max
    return p


@triton.jit
def rebuild_kernel(
    # Pointers
    s_ptr,  # (B, d) float32 eigenvalues
    u_ptr,  # (B, d, d) float32 eigenvectors (columns)
    w_ptr,  # (B, d, d) float32 output
    # Sizes
    d,
    # Strides
    stride_sb,
    stride_sk,
    stride_ub,
    stride_ur,
    stride_uk,
    stride_wb,
    stride_wr,
    stride_wc,
    # Eigenvalue map
    eps,
    power,
    min_eig,
    # Meta-parameters
    RELATIVE: tl.constexpr,
    POWER_KIND: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    bi, bj = lower_tile_coords(tl.program_id(0))
    batch = tl.program_id(1).to(tl.int64)

    rows = bi * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) output rows
    cols = bj * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) output columns
    ks = tl.arange(0, BLOCK_K)
    s_base = s_ptr + batch * stride_sb
    u_base = u_ptr + batch * stride_ub

    # s_max = max(max_j s_j, 0), as the reference's clamp-then-amax.
    running = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        k = k0 + ks
        running = tl.maximum(running, tl.load(s_base + k * stride_sk, mask=k < d, other=0.0))
    s_max = tl.max(running, axis=0)

    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)  # U[rows] diag(p) U[cols]^T
    for k0 in range(0, d, BLOCK_K):
        k = k0 + ks
        k_ok = k < d
        s = tl.load(s_base + k * stride_sk, mask=k_ok, other=0.0)  # (BLOCK_K,)
        p = eig_map_block(s, s_max, eps, power, min_eig, RELATIVE, POWER_KIND)  # finite where masked
        # (BLOCK_D, BLOCK_K): U[rows, k]; masked entries are 0, so padded k adds nothing.
        a = tl.load(
            u_base + rows[:, None] * stride_ur + k[None, :] * stride_uk,
            mask=(rows[:, None] < d) & k_ok[None, :],
            other=0.0,
        )
        # (BLOCK_K, BLOCK_D): U[cols, k]^T, loaded transposed through the strides
        b = tl.load(
            u_base + k[:, None] * stride_uk + cols[None, :] * stride_ur,
            mask=k_ok[:, None] & (cols[None, :] < d),
            other=0.0,
        )
        acc = tl.dot(a * p[None, :], b, acc, input_precision=INPUT_PRECISION)

    store_mirrored(w_ptr + batch * stride_wb, rows, cols, acc, d, stride_wr, stride_wc)


def _power_kind(power: float) -> int:
    if power == 1.0:
        return 1
    if power == 0.5:
        return 2
    return 0


def rebuild_launch(s: Tensor, u: Tensor, eig_map: EigMap, config: TileConfig | None = None) -> Tensor:
    """Check the inputs, allocate W and launch :func:`rebuild_kernel`.

    Args:
        s: float32 eigenvalues ``(..., d)`` (any order).
        u: float32 eigenvectors ``(..., d, d)``, column ``k`` for ``s[..., k]``.
        eig_map: the eigenvalue map (checked when it was made).
        config: launch configuration (default :func:`pick_config`).

    Returns:
        float32 ``(..., d, d)``, exactly symmetric.
    """
    if u.dim() < 2 or u.shape[-1] != u.shape[-2]:
        raise ValueError(f"u must be (..., d, d), got shape {tuple(u.shape)}")
    if u.shape[-1] > MAX_DIM:
        raise ValueError(f"d must be at most {MAX_DIM} (int32 offsets inside a d x d matrix), got {u.shape[-1]}")
    if tuple(s.shape) != tuple(u.shape[:-1]):
        raise ValueError(
            f"s must have shape {tuple(u.shape[:-1])} for u of shape {tuple(u.shape)}, got {tuple(s.shape)}"
        )
    if s.dtype != torch.float32 or u.dtype != torch.float32:
        raise TypeError(f"s and u must be float32, got {s.dtype} and {u.dtype}")
    if s.device != u.device:
        raise ValueError(f"s is on {s.device} but u is on {u.device}")

    d = u.shape[-1]
    batch = math.prod(u.shape[:-2])
    w = torch.empty(u.shape, dtype=torch.float32, device=u.device)
    if d == 0 or batch == 0:
        return w
    check_batch(batch)
    config = config or pick_config(d)
    s2 = s.reshape(batch, d)
    u3 = u.reshape(batch, d, d)  # strides kept when it is a view (eigh's U is column-major)
    w3 = w.view(batch, d, d)
    grid = (lower_tiles(d, config.block_d), batch)
    with launch_device(u):
        wrap_triton(rebuild_kernel)[grid](
            s2,
            u3,
            w3,
            d,
            s2.stride(0),
            s2.stride(1),
            u3.stride(0),
            u3.stride(1),
            u3.stride(2),
            w3.stride(0),
            w3.stride(1),
            w3.stride(2),
            eig_map.eps,
            eig_map.power,
            eig_map.min_eig,
            RELATIVE=eig_map.relative,
            POWER_KIND=_power_kind(eig_map.power),
            BLOCK_D=config.block_d,
            BLOCK_K=config.block_k,
            INPUT_PRECISION=fp32_input_precision(),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    return w


def _rebuild_fake(s: Tensor, u: Tensor, eps: float, power: float, eps_mode: str, min_eig: float) -> Tensor:
    return u.new_empty(u.shape, dtype=torch.float32)


@define_op("fastpred::triton_rebuild", mutates_args=(), fake=_rebuild_fake)
def triton_rebuild(s: Tensor, u: Tensor, eps: float, power: float, eps_mode: str, min_eig: float) -> Tensor:
    """``W = U diag(eig_map(s)) U^T`` (Eq. 18), symmetric, ``(..., d, d)`` float32.

    An operator's schema holds scalars: the map is made, and checked, here."""
    return rebuild_launch(s, u, EigMap(eps=eps, power=power, eps_mode=eps_mode, min_eig=min_eig))
