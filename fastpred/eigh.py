"""The eigendecomposition of F with the fallbacks a long run needs, and its one error.

The one retry chain of fastpred: every eigendecomposition (the eigh path of
:func:`fastpred.functional.directpred_weight`, the closed form's top eigenpair in
:mod:`fastpred.solvers`, the experimental warm solver) goes through
:func:`symmetric_eigh`, and only :func:`_with_fallbacks` retries a failed one. Below it
a GPU backend's driver (:mod:`fastpred.backends.eigh_driver`) reports and routes: it
chooses which cuSOLVER routine runs a call (a routine that refuses a size is not asked
again; a size cuSOLVER failed on runs in float64 from then on), raises when no routine
could run the call, and marks a failed matrix with NaN eigenvalues; it retries nothing.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import backends
from .backends import reference


class EighError(RuntimeError):
    """The eigendecomposition failed, in float32 and in every float64 retry (jitter included)."""


def symmetric_eigh(
    corr: Tensor, *, backend: "str | backends.Backend" = "auto", dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric matrix with the fallbacks a long run needs.

    The backend's solver first; if it fails (or, on CPU, returns non-finite
    eigenvalues), the backend's solver in float64 (where it is not the reference: on a
    GPU, cuSOLVER in float64, still without a host sync); then the reference in
    float64; then float64 again with a jitter of 1e-6 * (|trace| / d + 1e-12) on the
    diagonal. Results are in ``dtype`` (float32 unless asked otherwise).

    Raises:
        EighError: every attempt failed.
    """
    impl = backends.resolve(backend, corr.device)
    s, u = _with_fallbacks(corr, impl.eigh, reference.eigh)
    return s.to(dtype), u.to(dtype)


def symmetric_eigvalsh(corr: Tensor, *, backend: "str | backends.Backend" = "auto") -> Tensor:
    """The eigenvalues alone (ascending, float32), with the same fallbacks as
    :func:`symmetric_eigh`. On CPU LAPACK without eigenvectors (several times cheaper);
    on CUDA the backend's eigensolver, which needs no host sync.

    Raises:
        EighError: every attempt failed.
    """
    if corr.device.type == "cuda":
        return symmetric_eigh(corr, backend=backend)[0]

    def eigvalsh(a: Tensor) -> tuple[Tensor, None]:
        return torch.linalg.eigvalsh(a), None

    s, _ = _with_fallbacks(corr, eigvalsh, eigvalsh)
    return s.float()


def _with_fallbacks(corr: Tensor, solve: Callable, reference_solve: Callable) -> tuple[Tensor, Tensor | None]:
    """``solve(corr)``, else ``solve`` in float64 (a backend's own), else ``reference_solve`` in
    float64, else in float64 with jitter: the one place a failed eigendecomposition is retried."""

    def jittered():
        c = corr.double()
        d = c.shape[-1]
        scale = c.diagonal(dim1=-2, dim2=-1).abs().sum(-1) / d + 1e-12  # (...)
        eye = torch.eye(d, dtype=c.dtype, device=c.device)
        return reference_solve(c + 1e-6 * scale[..., None, None] * eye)

    attempts = [lambda: solve(corr)]
    if solve is not reference_solve and corr.dtype != torch.float64:
        attempts.append(lambda: solve(corr.double()))
    attempts += [lambda: reference_solve(corr.double()), jittered]
    errors = []
    for attempt in attempts:
        try:
            s, u = attempt()
        except (RuntimeError, torch.linalg.LinAlgError) as err:  # LinAlgError, cuSOLVER errors
            errors.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
            continue
        # A host check is free on CPU; GPU solvers report failures themselves. A
        # solver that went wrong leaves NaN in the eigenvalues too: checking the d of
        # them costs far less than the d^2 eigenvector entries.
        if s.device.type == "cpu" and not torch.isfinite(s).all():
            errors.append("non-finite eigenvalues")
            continue
        return s, u
    raise EighError("eigendecomposition failed: " + "; ".join(errors))
