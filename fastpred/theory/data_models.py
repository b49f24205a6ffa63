"""Data and augmentation models of SM D.2 and their second moments.

A model gives the population matrices of Lemma 1 / SM D,
``X = Sigma^d = E[x_1 x_2^T]`` and ``X + X' = Sigma^s = E[x_1 x_1^T]``, the
operator ``Sigma^d [Sigma^s]^{-1}`` whose top eigenmodes the non-collapsed
fixed points learn (SM Eq. 101), and a sampler of pairs of augmented views for
finite-batch SGD (:mod:`fastpred.theory.sgd`). Data are zero-mean Gaussian
with correlation ``Sigma^x``.

Multiplicative scrambling: the paper states ``Sigma^s = Sigma^x``. For the
stated augmentation ``x' = (P^c + U B U^T) x`` with i.i.d. unit Gaussian ``B``
the exact value is ``Sigma^s = P^c Sigma^x P^c + tr(U^T Sigma^x U) U U^T``
(``E[B M B^T] = tr(M) I``), which the tests confirm by Monte Carlo. With it,
``Sigma^d [Sigma^s]^{-1} = P^c`` for every ``Sigma^x`` (whenever
``P^c Sigma^x P^c`` is invertible on the conserved subspace), which is the
paper's conclusion for the commuting case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import count, nonneg

__all__ = [
    "AdditiveScrambling",
    "MultiplicativeScrambling",
    "isotropic",
    "target_operator",
    "top_left_eigenvectors",
]


def _sym_psd(name: str, A: np.ndarray) -> np.ndarray:
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {A.shape}")
    if not np.allclose(A, A.T, rtol=0, atol=1e-12):
        raise ValueError(f"{name} must be symmetric")
    if np.linalg.eigvalsh(A).min() < -1e-12:
        raise ValueError(f"{name} must be positive semi-definite")
    return A


def _gaussian(cov: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of ``N(0, cov)`` as rows ``(n, d)``; ``cov`` may be singular."""
    evals, evecs = np.linalg.eigh(cov)
    root = evecs * np.sqrt(np.clip(evals, 0.0, None))       # (d, d), root @ root.T = cov
    return rng.standard_normal((n, cov.shape[0])) @ root.T


@dataclass(frozen=True)
class AdditiveScrambling:
    """SM D.2 additive scrambling: ``x' = x + n`` with ``n ~ N(0, Sigma^n)``.

    ``Sigma^d = Sigma^x`` and ``Sigma^s = Sigma^x + Sigma^n``; in Lemma 1's terms
    ``X = Sigma^x``, ``X' = Sigma^n``. ``Sigma^x = I, Sigma^n = sigma2 I`` is
    Assumption 2 (see :func:`isotropic`).
    """

    sigma_x: np.ndarray
    sigma_n: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma_x", _sym_psd("sigma_x", self.sigma_x))
        object.__setattr__(self, "sigma_n", _sym_psd("sigma_n", self.sigma_n))
        if self.sigma_x.shape != self.sigma_n.shape:
            raise ValueError(f"sigma_x and sigma_n shapes differ: "
                             f"{self.sigma_x.shape} vs {self.sigma_n.shape}")

    @property
    def X(self) -> np.ndarray:
        return self.sigma_x

    @property
    def X_prime(self) -> np.ndarray:
        return self.sigma_n

    @property
    def sigma_d(self) -> np.ndarray:
        return self.sigma_x

    @property
    def sigma_s(self) -> np.ndarray:
        return self.sigma_x + self.sigma_n

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Two augmented views of ``n`` data points, each ``(n, d)``."""
        x = _gaussian(self.sigma_x, n, rng)
        return x + _gaussian(self.sigma_n, n, rng), x + _gaussian(self.sigma_n, n, rng)


@dataclass(frozen=True)
class MultiplicativeScrambling:
    """SM D.2 multiplicative subspace scrambling: ``x' = (P^c + U B U^T) x``.

    ``U`` (``n0 x k``, orthonormal columns) spans the scrambled (nuisance)
    subspace, ``P^c = I - U U^T`` projects on the conserved one and ``B`` is a
    fresh ``k x k`` matrix of i.i.d. standard normals for every view.
    ``Sigma^d = P^c Sigma^x P^c`` and
    ``Sigma^s = P^c Sigma^x P^c + tr(U^T Sigma^x U) U U^T`` (module docstring).
    """

    sigma_x: np.ndarray
    U: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma_x", _sym_psd("sigma_x", self.sigma_x))
        U = np.asarray(self.U, dtype=np.float64)
        if U.ndim != 2 or U.shape[0] != self.sigma_x.shape[0] or U.shape[1] > U.shape[0]:
            raise ValueError(f"U must be (n0, k) with k <= n0 = {self.sigma_x.shape[0]}, "
                             f"got shape {U.shape}")
        if not np.allclose(U.T @ U, np.eye(U.shape[1]), rtol=0, atol=1e-10):
            raise ValueError("U must have orthonormal columns")
        object.__setattr__(self, "U", U)

    @property
    def P_c(self) -> np.ndarray:
        """Projector on the conserved subspace, ``I - U U^T``."""
        return np.eye(self.U.shape[0]) - self.U @ self.U.T

    @property
    def X(self) -> np.ndarray:
        return self.P_c @ self.sigma_x @ self.P_c

    @property
    def X_prime(self) -> np.ndarray:
        return np.trace(self.U.T @ self.sigma_x @ self.U) * (self.U @ self.U.T)

    @property
    def sigma_d(self) -> np.ndarray:
        return self.X

    @property
    def sigma_s(self) -> np.ndarray:
        return self.X + self.X_prime

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Two augmented views of ``n`` data points, each ``(n, n0)``."""
        x = _gaussian(self.sigma_x, n, rng)                 # (n, n0)
        z = x @ self.U                                      # (n, k)
        kept = x - z @ self.U.T                             # (n, n0) = x P^c
        k = self.U.shape[1]
        views = []
        for _ in range(2):
            B = rng.standard_normal((n, k, k))
            views.append(kept + np.einsum("nij,nj->ni", B, z) @ self.U.T)
        return views[0], views[1]


def isotropic(n: int, sigma2: float) -> AdditiveScrambling:
    """Assumption 2: ``X = I``, ``X' = sigma2 I`` in ``n`` dimensions.

    Raises:
        ValueError / TypeError: ``n`` is not an integer >= 1, or ``sigma2`` not a finite number >= 0.
    """
    n, sigma2 = count("n", n, 1), nonneg("sigma2", sigma2)
    return AdditiveScrambling(np.eye(n), sigma2 * np.eye(n))


def target_operator(model) -> np.ndarray:
    """``Sigma^d [Sigma^s]^{-1}`` (SM Eq. 101); ``Sigma^s`` must be invertible."""
    # M = Sd Ss^{-1}  <=>  Ss^T M^T = Sd^T
    return np.linalg.solve(model.sigma_s.T, model.sigma_d.T).T


def top_left_eigenvectors(M: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` left eigenvectors of ``M`` with the largest (real) eigenvalues.

    Rows of ``W`` at a non-collapsed fixed point are left eigenvectors of
    ``Sigma^d [Sigma^s]^{-1}`` (SM D.1): ``r M = lambda r``.

    Returns:
        ``(eigenvalues (k,), orthonormal basis (k, n) of their span)``.

    Raises:
        ValueError: ``M`` is not square, or ``k`` is not in ``[0, n]``.
        TypeError: ``k`` is not an integer.
    """
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be a square matrix, got shape {M.shape}")
    k = count("k", k, 0, M.shape[0])
    evals, evecs = np.linalg.eig(M.T)
    order = np.argsort(-evals.real)[:k]
    basis, _ = np.linalg.qr(evecs[:, order].real)
    return evals.real[order], basis.T
