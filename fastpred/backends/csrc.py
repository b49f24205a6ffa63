"""The compiled backend (``backend="csrc"``): the operators of ``fastpred._C`` (csrc/).

CPU: ``fold_`` and ``install_`` make the guards of a step one pass each (judging the
step's moments and folding them; judging a rebuilt W_p and installing it);
``corr_ema_`` and ``rebuild`` compute one triangle of each symmetric product
(BLAS on row panels) and mirror it; ``eigh`` calls LAPACK ``syevd`` directly with a
cached workspace. CUDA (when ``_C`` was built with CUDA): ``corr_ema_`` and
``rebuild`` as kernels plus cuBLAS syrk, never reading the device on the host;
``eigh`` through :mod:`fastpred.backends.eigh_driver` with cuSOLVER ``Xsyevd`` and the batched
``XsyevBatched`` (cached workspaces, lazy ``info`` check, no host sync per call);
``fold_`` and ``install_`` are left to the torch reference there (on CUDA the Triton
backend fuses them).

Each operator has a fake (meta) kernel registered next to its wrapper, so the ops
trace under ``torch.compile``. Importing this module loads ``fastpred._C``, which
runs the operator registrations.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (registers torch.ops.fastpred.*)
from . import reference
from ..eig_map import EigMap
from .eigh_driver import EighDriver, Solver, device_driver

__all__ = ["corr_ema_", "fold_", "eigh", "rebuild", "install_", "supports", "eigh_driver", "built_with_cuda"]

_ops = torch.ops.fastpred


def built_with_cuda() -> bool:
    """Whether ``fastpred._C`` holds the CUDA kernels and the cuSOLVER binding."""
    return _C.built_with_cuda()


def supports(device: torch.device) -> bool:
    """CPU always; CUDA when the extension was built with CUDA and a GPU is present."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    return device.type == "cuda" and built_with_cuda() and torch.cuda.is_available()


# ------------------------------------------------------------------ corr_ema_
# Weights as CPU 0-dim tensors, made once per value: the EMA has one or two of them.
_weights: dict[float, Tensor] = {}


def _weight_tensor(weight: float | Tensor) -> Tensor:
    if isinstance(weight, Tensor):
        return weight
    w = _weights.get(weight)
    if w is None:
        if len(_weights) > 64:
            _weights.clear()
        w = _weights[weight] = torch.tensor(float(weight), dtype=torch.float64)
    return w


def corr_ema_(corr: Tensor, x: Tensor, weight: float | Tensor, mean: Tensor | None = None) -> Tensor:
    """Eq. 19 in place, ``corr <- corr + weight * (x^T x / N - corr)``: see :func:`reference.corr_ema_`.

    Only the lower triangle of ``x^T x`` is computed; ``corr`` comes out exactly
    symmetric (its upper triangle mirrors the lower one).

    Args:
        corr: float32 ``(..., d, d)``, updated in place.
        x: ``(..., N, d)``, float32, bfloat16 or float16 (accumulated in float32).
        weight: a float, or a 0-dim tensor on corr's device (read there, no host sync).
        mean: optional float32 ``(..., d)``, the same EMA of the batch mean.

    Returns:
        ``corr``.
    """
    _ops.corr_ema_(corr, x, _weight_tensor(weight), mean)
    return corr


@torch.library.register_fake("fastpred::corr_ema_")
def _corr_ema_fake(corr, x, weight, mean=None):
    torch._check(corr.dim() >= 2 and corr.shape[-1] == corr.shape[-2], lambda: "corr must be (..., d, d)")
    torch._check(x.shape[-1] == corr.shape[-1], lambda: "x must be (..., N, d)")
    torch._check(weight.dim() == 0, lambda: "weight must be a 0-dim tensor")
    return None


# ------------------------------------------------------------- fold_, install_
def fold_(corr: Tensor, gram: Tensor, total: Tensor, count: Tensor, first: Tensor, rho: float,
          mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The fold of a step's moments, judged by them (Eq. 19): see :func:`reference.fold_`.
    One judging read of the moments, then (only when the step is usable) one EMA pass."""
    if corr.device.type != "cpu":
        return reference.fold_(corr, gram, total, count, first, rho, mean)
    return tuple(_ops.fold_(corr, gram, total, count, first, float(rho), mean))


@torch.library.register_fake("fastpred::fold_")
def _fold_fake(corr, gram, total, count, first, rho, mean=None):
    return corr.new_empty(count.shape), corr.new_empty((), dtype=torch.bool)


def install_(weight: Tensor, new: Tensor) -> Tensor:
    """``weight <- new`` where ``new`` is all finite: see :func:`reference.install_`. One
    judging read of ``new`` and a copy; a cast or a strided tensor goes to the reference."""
    if (weight.device.type != "cpu" or new.dtype != weight.dtype or weight.dtype not in (torch.float32, torch.float64)
            or not weight.is_contiguous() or not new.is_contiguous()):
        return reference.install_(weight, new)
    return _ops.install_(weight, new)


@torch.library.register_fake("fastpred::install_")
def _install_fake(weight, new):
    return weight.new_empty((), dtype=torch.bool)


# ---------------------------------------------------------------------- eigh
def eigh_driver(device: torch.device | str) -> EighDriver:
    """The GPU eigensolver driver of ``device`` (its ``check()`` reports pending failures)."""
    return device_driver(device, "csrc", cuda_solvers)


def cuda_solvers() -> list[Solver]:
    """The csrc cuSOLVER routines in order of preference: XsyevBatched, then Xsyevd."""
    solvers = []
    if _C.has_syevd_batched():
        solvers.append(Solver("csrc.XsyevBatched", _ops.syevd_batched_,
                              lambda a, w: tuple(_ops.syevd_workspace_size(a, w, True)), batched=True))
    solvers.append(Solver("csrc.Xsyevd", _ops.syevd_, lambda a, w: tuple(_ops.syevd_workspace_size(a, w, False))))
    return solvers


def eigh(corr: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of the lower triangle of ``corr``.

    CPU: LAPACK syevd; raises ``torch.linalg.LinAlgError`` if it does not converge.
    CUDA: cuSOLVER via :func:`eigh_driver`; a matrix cuSOLVER failed on gets NaN
    eigenvalues (set on the device), and a later call warns about it.
    """
    if corr.device.type == "cuda":
        return eigh_driver(corr.device).eigh(corr)
    return _ops.eigh(corr)


@torch.library.register_fake("fastpred::eigh")
def _eigh_fake(a):
    torch._check(a.dim() >= 2 and a.shape[-1] == a.shape[-2], lambda: "a must be (..., n, n)")
    # Eigenvectors come back column-major, as from torch.linalg.eigh.
    return a.new_empty(a.shape[:-1]), a.new_empty(a.shape).mT


@torch.library.register_fake("fastpred::syevd_")
def _syevd_fake(a, w, info, work_device, work_host):
    return None


@torch.library.register_fake("fastpred::syevd_batched_")
def _syevd_batched_fake(a, w, info, work_device, work_host):
    return None


# ------------------------------------------------------------------- rebuild
def rebuild(s: Tensor, u: Tensor, eig_map: EigMap) -> Tensor:
    """W = U diag(p) U^T with p = eig_map(s) (Eq. 18): see :func:`reference.rebuild`.

    One triangle is multiplied (V V^T with V = U diag(sqrt p) when the map is
    non-negative), the other mirrored: W is exactly symmetric. The operator's schema
    takes the map's settings as scalars (and checks ``eps_mode`` for direct callers).
    """
    return _ops.rebuild(s, u, eig_map.eps, eig_map.power, eig_map.eps_mode, eig_map.min_eig)


@torch.library.register_fake("fastpred::rebuild")
def _rebuild_fake(s, u, eps, power, eps_mode, min_eig):
    torch._check(u.dim() >= 2 and u.shape[-1] == u.shape[-2], lambda: "u must be (..., d, d)")
    torch._check(s.shape == u.shape[:-1], lambda: "s must be (..., d) with u's leading shape")
    return torch.empty(u.shape, dtype=u.dtype, device=u.device)
