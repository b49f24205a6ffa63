"""The ``"triton"`` backend: fused Triton kernels for the statistics update and the rebuild.

Same signatures and mathematics as :mod:`fastpred.backends.reference`; ``eigh``
is not defined here, so the dispatch point uses the reference's. The kernels
(:mod:`fastpred.backends.triton_kernels.triton_corr`, :mod:`fastpred.backends.triton_kernels.triton_rebuild`,
:mod:`fastpred.backends.triton_kernels.triton_fold`) are exposed as PyTorch operators
(``torch.ops.fastpred.triton_corr_ema_``, ``triton_gram``, ``triton_rebuild``,
``triton_fold_``, ``triton_install_``) through ``torch.library.triton_op``, so they
compose with ``torch.compile``.

Runs on CUDA tensors, and on CPU tensors through the Triton interpreter when
``TRITON_INTERPRET=1`` was set before this module was imported (slow: for tests).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ..eig_map import EigMap
from .triton_kernels import triton_common, triton_corr, triton_fold, triton_rebuild  # noqa: F401  (registers the ops)
from . import reference

__all__ = ["supports", "prefers", "corr_ema_", "gram", "fold_", "rebuild", "install_"]


def _interpreting() -> bool:
    # The variable must have been set before the kernels were defined (at import):
    # only then are they interpreted functions that accept CPU tensors.
    return os.environ.get("TRITON_INTERPRET") == "1" and triton_common.INTERPRETED


def supports(device: torch.device | str) -> bool:
    """True on CUDA devices; on CPU only under ``TRITON_INTERPRET=1``."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _interpreting()


def prefers(step: str, *args) -> bool:
    """Under ``backend="auto"``: whether a step's call is faster here than in cuBLAS,
    by construction (no GPU measurement yet): where tensor cores apply, i.e. 16-bit
    features for ``gram``/``corr_ema_`` (native fp16/bf16 dot), or any fp32 product
    when TF32 is allowed (``torch.set_float32_matmul_precision("high")`` or
    ``torch.backends.cuda.matmul.allow_tf32 = True``). At the default fp32 precision
    both sides do plain FMA work and cuBLAS is the safer bet. The fold and the install
    guard are elementwise passes that the kernels fuse: always preferred.
    """
    if step in ("fold_", "install_"):
        return True
    if torch.get_float32_matmul_precision() != "highest":
        return True
    if step in ("gram", "corr_ema_"):
        x = args[0] if step == "gram" else args[1]
        return x.dtype in (torch.float16, torch.bfloat16)
    return False


def corr_ema_(corr: Tensor, x: Tensor, weight: float | Tensor, mean: Tensor | None = None) -> Tensor:
    """Eq. 19 in place, as :func:`fastpred.backends.reference.corr_ema_`.

    ``corr <- corr + weight * (x^T x / N - corr)`` from one fused kernel that
    computes each lower-triangle tile once and mirrors it; ``weight == 1``
    overwrites (old values never read). Only the lower triangle of ``corr`` is
    read, and the result is exactly symmetric.

    Args:
        corr: float32 ``(..., d, d)``, symmetric, updated in place.
        x: ``(..., N, d)`` float32, float16 or bfloat16 (accumulated in float32).
        weight: a float in [0, 1], or a 0-dim tensor on ``corr``'s device (read by
            the kernel: no host sync).
        mean: optional float32 ``(..., d)``, gets the same EMA of the batch mean.

    Returns:
        ``corr``.

    Raises:
        TypeError, ValueError: dtypes, shapes or devices that do not match.
    """
    if isinstance(weight, Tensor):
        torch.ops.fastpred.triton_corr_ema_(corr, x, weight, 0.0, mean)
    else:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"weight must be a float or a 0-dim tensor, got {weight!r}")
        torch.ops.fastpred.triton_corr_ema_(corr, x, None, float(weight), mean)
    return corr


def gram(x: Tensor) -> Tensor:
    """``x^T x`` in float32, ``(..., d, d)``, as :func:`fastpred.backends.reference.gram`."""
    return torch.ops.fastpred.triton_gram(x)


def rebuild(s: Tensor, u: Tensor, eig_map: EigMap) -> Tensor:
    """``W = U diag(p) U^T``, ``p = eig_map(s)`` computed in the kernel (Eq. 18).

    As :func:`fastpred.backends.reference.rebuild`; the output is exactly symmetric.
    The operator's schema takes the map's settings as scalars.
    """
    return torch.ops.fastpred.triton_rebuild(s, u, eig_map.eps, eig_map.power, eig_map.eps_mode, eig_map.min_eig)


def fold_(corr: Tensor, gram: Tensor, total: Tensor, count: Tensor, first: Tensor, rho: float,
          mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The fold of a step's moments, judged by them (Eq. 19), as
    :func:`fastpred.backends.reference.fold_`: one judging launch per sum, then one fused
    EMA launch that reads the judgement on the device (no host sync)."""
    return tuple(torch.ops.fastpred.triton_fold_(corr, gram, total, count, first, float(rho), mean))


def install_(weight: Tensor, new: Tensor) -> Tensor:
    """``weight <- new`` where ``new`` is all finite, as :func:`fastpred.backends.reference.install_`:
    a judging launch and a guarded copy. A cast or a strided tensor goes to the reference."""
    if new.dtype != torch.float32 or weight.dtype != torch.float32 or not (weight.is_contiguous() and new.is_contiguous()):
        return reference.install_(weight, new)
    return torch.ops.fastpred.triton_install_(weight, new)
