"""Regenerate analogues of the paper's theory figures (Figs. 3, 4, 5; SM Figs. 7, 8, 9, 10).

Usage::

    python -m fastpred.theory.figures --out DIR [--only fig3 fig9 ...]

Every curve is computed here from :mod:`fastpred.theory`; nothing is read from
the paper. Time is shown in ODE units ``t`` or, where the paper counts
iterations, as ``t / alpha`` with the paper's learning rate ``alpha = 0.01``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import analytic, decoupled, linear, reduced  # noqa: E402
from .data_models import isotropic  # noqa: E402

STABLE, UNSTABLE, SADDLE = "tab:red", "tab:green", "black"
LR = 0.01  # the paper's learning rate alpha, to express time in iterations (Fig. 5, SM Fig. 7)


def _save(fig, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def fig3(out: Path) -> Path:
    """Fig. 3: (p, s) phase portraits of Eqs. 11-12 at tau = 1, alpha_p = 1 for eta = 0, 0.01, 1."""
    tau, alpha_p, sigma2 = 1.0, 1.0, 0.0
    P, S = np.meshgrid(np.linspace(-0.6, 1.6, 60), np.linspace(0.0, 1.6, 60))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.3), layout="constrained")
    for ax, eta in zip(axes, (0.0, 0.01, 1.0)):
        dP, dS = decoupled.decoupled_field(P, S, tau, alpha_p=alpha_p, eta=eta, sigma2=sigma2)
        ax.streamplot(P, S, dP, dS, color="tab:blue", density=1.1, linewidth=0.7, arrowsize=0.8)
        pp = np.linspace(-0.6, 1.6, 200)
        ax.plot(pp, pp**2 / alpha_p, "k--", lw=1.2, label=r"$s = p^2/\alpha_p$")
        if eta == 0.0:
            # s = 0 is a line of fixed points, attracting where p (tau - (1+s2) p) < 0
            edge = tau / (1 + sigma2)
            ax.plot([-0.6, 0], [0, 0], color=STABLE, lw=3)
            ax.plot([0, edge], [0, 0], color=UNSTABLE, lw=3)
            ax.plot([edge, 1.6], [0, 0], color=STABLE, lw=3)
            ax.plot([edge, edge], [0, 1.6], color=STABLE, lw=3)       # p = tau/(1+s2), any s
        else:
            ax.plot(0, 0, "o", color=STABLE, ms=9, zorder=5)
            fp = analytic.fixed_points(tau, eta, sigma2)
            if fp is not None:
                ax.plot(fp[0], fp[0] ** 2 / alpha_p, "o", color=UNSTABLE, ms=6, zorder=6)
                if fp[0] < 0.05:   # p*_- sits next to the stable origin: say so
                    ax.annotate(rf"$p^*_- = {fp[0]:.3f}$ (green) beside the stable origin",
                                (fp[0], 0.0), (0.2, 0.3), fontsize=8,
                                bbox=dict(fc="white", ec="none", alpha=0.9),
                                arrowprops=dict(arrowstyle="->", lw=0.8))
                ax.plot(fp[1], fp[1] ** 2 / alpha_p, "o", color=STABLE, ms=9, zorder=5)
        ax.set(xlim=(-0.6, 1.6), ylim=(0, 1.6), xlabel="$p_j$", ylabel="$s_j$",
               title=rf"$\eta = {eta:g}$")
    axes[0].legend(loc="upper left")
    fig.suptitle(r"Fig. 3: Eqs. 11-12 at $\tau = 1, \alpha_p = 1$; red = stable, green = unstable "
                 "fixed points; flows approach the parabola when $\\eta > 0$")
    return _save(fig, out, "fig3_phase_portraits")


def fig4(out: Path) -> Path:
    """Fig. 4: dp/dt of Eq. 16 with its fixed points for eta = 0, 0 < eta < tau^2/4, eta > tau^2/4."""
    tau, sigma2 = 1.0, 0.0
    thr = analytic.collapse_threshold(tau, sigma2)
    p = np.linspace(-0.2, 1.15, 400)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained", sharey=True)
    for ax, eta, name in zip(axes, (0.0, 0.12, 0.35), ("(a)", "(b)", "(c)")):
        dp = p * analytic.delta(p, tau, eta=eta, sigma2=sigma2)
        ax.plot(p, dp, color="tab:blue")
        ax.axhline(0, color="gray", lw=0.8)
        fp = analytic.fixed_points(tau, eta, sigma2)
        if eta == 0.0:
            ax.plot(0, 0, "o", color=SADDLE, ms=9)
            ax.plot(fp[1], 0, "o", color=STABLE, ms=9)
        else:
            ax.plot(0, 0, "o", color=STABLE, ms=9)
            if fp is not None:
                ax.plot(fp[0], 0, "o", color=UNSTABLE, ms=9)
                ax.plot(fp[1], 0, "o", color=STABLE, ms=9)
                ax.axvspan(-0.2, fp[0], color=STABLE, alpha=0.08)
            else:
                ax.axvspan(-0.2, 1.15, color=STABLE, alpha=0.08)
        ax.set(xlabel="$p_j$", title=rf"{name} $\eta = {eta:g}$ (threshold $\tau^2/4(1+\sigma^2) = {thr:g}$)")
    axes[0].set_ylabel(r"$\dot p_j = p_j^2[\tau - (1+\sigma^2)p_j] - \eta p_j$")
    fig.suptitle("Fig. 4: Eq. 16 on the invariant parabola; shaded: basin of the collapsed point")
    return _save(fig, out, "fig4_fixed_points")


def fig5(out: Path) -> Path:
    """Fig. 5: decoupled Eqs. 11-13 with EMA; top: weight decay eta, bottom: EMA rate beta."""
    p0 = np.array([0.1, 0.4])
    rows = ((r"$\eta$", [(0.4, e) for e in (0.0, 0.01, 0.04, 0.1)], lambda b, e: e),
            (r"$\beta$", [(b, 0.04) for b in (0.04, 0.1, 0.4, 4.0)], lambda b, e: b))
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), layout="constrained", sharex=True)
    colors = plt.cm.viridis(np.linspace(0, 0.9, 4))
    for r, (label, runs, value) in enumerate(rows):
        for c, (beta, eta) in zip(colors, runs):
            t, p, s, tau = decoupled.simulate_decoupled(p0, p0**2, tau=0.0, beta=beta, eta=eta,
                                                       t_end=100.0, dt=0.05, save_every=10)
            k = analytic.K_mode(p, s, tau, eta=eta)
            for j, ls in enumerate(("-", "--")):
                lab = rf"{label} = {value(beta, eta):g}" if j == 0 else None
                axes[r, 0].plot(t / LR, p[:, j], ls, color=c, label=lab)
                axes[r, 1].plot(t / LR, s[:, j], ls, color=c)
                axes[r, 2].plot(t / LR, k[:, j], ls, color=c)
        axes[r, 0].legend(title=("fixed β = 0.4" if r == 0 else "fixed η = 0.04"), fontsize=8)
        axes[r, 2].axhline(0, color="gray", lw=0.8)
        for ax, name in zip(axes[r], ("$p_j$", "$s_j$", "eigenvalue of $K(t)$ (Eq. 9)")):
            ax.set_ylabel(name)
    for ax in axes[1]:
        ax.set_xlabel(r"iterations $t/\alpha$ ($\alpha = 0.01$)")
    fig.suptitle(r"Fig. 5: Eqs. 11-13, $\tau(0) = 0$, modes $p_j(0) = 0.1$ (solid), 0.4 (dashed) on "
                 r"$s = p^2$." "\n" r"Larger $\eta$ or smaller $\beta$ raise $K$; $\eta$ lowers the end point "
                 r"(or collapses the mode), small $\beta$ slows training")
    return _save(fig, out, "fig5_decoupled_eta_beta")


def fig7(out: Path, runs: int = 10) -> Path:
    """SM Fig. 7: normalized correlation of W_a and W under Eqs. 2-4 (X = I, X' = 0.03^2 I, W_a(0) = 0)."""
    n = 8
    model = isotropic(n, 0.03**2)
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((runs, n, n)) / np.sqrt(n)
    Wp0 = rng.standard_normal((runs, n, n)) / np.sqrt(n)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained", sharey=True)
    for ax, eta in zip(axes, (0.0, 0.01, 0.1)):
        for gamma, c in zip((0.9, 0.99, 0.996), ("tab:blue", "tab:orange", "tab:green")):
            cfg = linear.LinearConfig(eta=eta, target="ema", beta=(1 - gamma) / LR)
            tr = linear.simulate_linear(W0, model.X, model.X_prime, cfg, Wp0=Wp0, t_end=50.0,
                                        dt=0.02, save_every=10)
            t, corr = tr.t[1:], analytic.normalized_correlation(tr.W[1:], tr.Wa[1:])
            mean, std = corr.mean(1), corr.std(1)
            ax.plot(t / LR, mean, color=c, label=rf"$\gamma_a = {gamma}$")
            ax.fill_between(t / LR, mean - std, mean + std, color=c, alpha=0.25)
        ax.set(xscale="log", ylim=(0.95, 1.002), title=rf"$\eta = {eta:g}$",
               xlabel=r"iterations $t/\alpha$")
    axes[0].set_ylabel(r"corr$(W_a, W)$")
    axes[0].legend()
    fig.suptitle(r"SM Fig. 7: $W_a$ stays nearly proportional to $W$ (Assumption 1); "
                 rf"mean $\pm$ std of {runs} runs")
    return _save(fig, out, "fig7_ema_assumption")


def fig8(out: Path, runs: int = 5) -> Path:
    """SM Fig. 8: symmetric / skew parts of W_p under SM Eq. 60 with F = W_p^T W_p (C = 0)."""
    d = 8
    rng = np.random.default_rng(1)
    Wp0 = rng.standard_normal((runs, d, d)) / np.sqrt(d) * 0.5
    taus = (0.2, 0.5, 0.8, 1.0)
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(taus)))
    fig, axes = plt.subplots(3, 2, figsize=(11, 9), layout="constrained", sharex=True)
    for r, eta in enumerate((0.001, 0.01, 0.05)):
        for tau, c in zip(taus, colors):
            tr = reduced.simulate_reduced(Wp0, Wp0.mT @ Wp0, tau=tau, eta=eta, symmetric=False,
                                          t_end=200.0, dt=0.05, save_every=10)
            A, B = 0.5 * (tr.Wp + tr.Wp.mT), 0.5 * (tr.Wp - tr.Wp.mT)
            axes[r, 0].plot(tr.t, np.linalg.norm(A, axis=(-2, -1)).mean(1), color=c,
                            label=rf"$\tau = {tau}$")
            axes[r, 1].semilogy(tr.t, np.linalg.norm(B, axis=(-2, -1)).mean(1), color=c)
        axes[r, 0].set_ylabel(rf"$\eta = {eta}$" + "\n" + r"$\|A\|_F$, $A = (W_p + W_p^T)/2$")
        axes[r, 1].set_ylabel(r"$\|B\|_F$, $B = (W_p - W_p^T)/2$")
        axes[r, 1].set_ylim(1e-10, 2)
    axes[0, 0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("t")
    fig.suptitle(rf"SM Fig. 8: SM Eq. 60 ($\sigma^2 = 0$, mean of {runs} runs): the skew part decays in "
                 r"every run (slowly for small $\eta$); large $\eta$ / small $\tau$ also drag $A$ to 0 (Obs #4-5)")
    return _save(fig, out, "fig8_asymmetric_predictor")


def fig9(out: Path) -> Path:
    """SM Fig. 9: ||[F, W_p]|| under the symmetrized Eq. 7 for several fixed tau and eta."""
    d = 6
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    E = rng.standard_normal((d, d))
    Wp0 = Q * np.linspace(0.05, 0.5, d) @ Q.T + 1e-4 * (E + E.T)      # nearly aligned start
    F0 = Q * np.linspace(2e-4, 2e-3, d) @ Q.T
    taus = (0.3, 0.6, 1.0)
    colors = ("tab:blue", "tab:orange", "tab:red")
    fig, axes = plt.subplots(2, 3, figsize=(14, 6.5), layout="constrained", sharex=True)
    for col, eta in enumerate((0.0, 0.01, 0.05)):
        for tau, c in zip(taus, colors):
            tr = reduced.simulate_reduced(Wp0, F0, tau=tau, eta=eta, t_end=100.0, dt=0.02,
                                          save_every=10)
            L = np.linalg.norm(analytic.commutator(tr.F, tr.Wp), axis=(-2, -1))
            lam = np.linalg.eigvalsh(analytic.K_matrix(tr.F, tr.Wp, tau, eta=eta))[:, 0]
            axes[0, col].semilogy(tr.t, L / L[0], color=c, label=rf"$\tau = {tau}$")
            axes[1, col].plot(tr.t, lam, color=c)
        axes[0, col].axhline(1, color="gray", lw=0.8)
        axes[1, col].axhline(0, color="gray", lw=0.8)
        axes[0, col].set_title(rf"$\eta = {eta:g}$")
        axes[1, col].set_xlabel("t")
    axes[0, 0].set_ylabel(r"$\|[F, W_p](t)\|_F / \|[F, W_p](0)\|_F$")
    axes[1, 0].set_ylabel(r"$\lambda_{\min}(K(t))$ (Eq. 9)")
    axes[0, 0].legend()
    fig.suptitle("SM Fig. 9: Eq. 7 from a nearly aligned start: the commutator grows while "
                 r"$\lambda_{\min}(K) < 0$ (small $\eta$, large $\tau$) and decays once $K \succ 0$ (Thm. 3)")
    return _save(fig, out, "fig9_commutator")


def fig10(out: Path) -> Path:
    """SM Fig. 10: flows of SM Eqs. 102-104 (lambda_s = 1, lambda_d = 1/2, alpha_p = beta = 1)."""
    ls, ld = 1.0, 0.5
    kw = dict(lambda_s=ls, lambda_d=ld, alpha_p=1.0, beta=1.0)
    g = np.linspace(-1.5, 1.5, 21)
    A, B = np.meshgrid(g, g)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), layout="constrained")

    def quiver(ax, u, v):
        norm = np.hypot(u, v)
        norm[norm == 0] = 1
        ax.quiver(A, B, u / norm, v / norm, angles="xy", scale=30, width=0.003, color="k")

    # Left: fixed target w_a = 1, field on (w, w_p)
    dw, dwp, _ = decoupled.scalar_field(A, B, 1.0, **kw)
    quiver(axes[0], dw, dwp)
    for sign in (1, -1):
        w = sign * np.linspace(0.3, 1.5, 100)
        axes[0].plot(w, ld / ls / w, color=STABLE, lw=2)
    axes[0].plot(0, 0, "o", color=UNSTABLE, ms=8)
    tr = decoupled.simulate_scalar(np.array([0.05, -0.1, 0.08]), np.array([0.1, 0.05, -0.12]), 1.0,
                                   **{**kw, "beta": 0.0}, t_end=30.0, dt=0.02, save_every=5)
    axes[0].plot(tr.w, tr.wp, color="tab:blue", lw=1.5)
    axes[0].set(xlabel="$w$", ylabel="$w_p$", title=r"target fixed, $w_a = 1$")

    # Middle: tied w = w_p, field on (w, w_a)
    dw, _, dwa = decoupled.scalar_field(A, A, B, **kw)
    quiver(axes[1], dw, dwa)
    axes[1].plot(g, g, color="tab:green", lw=2, label=r"$\dot w_a = 0$: $w_a = w$")
    ww = np.linspace(-1.5, 1.5, 200)
    axes[1].plot(ww, ww**2 * ls / ld, color="tab:blue", lw=2,
                 label=r"$\dot w = 0$: $w^2 = w_a\lambda_d/\lambda_s$")
    axes[1].plot(0, 0, "o", color=UNSTABLE, ms=8)
    axes[1].plot(ld / ls, ld / ls, "o", color=STABLE, ms=8)
    tr = decoupled.simulate_scalar(np.array([0.05, 1.2, 0.3]), np.array([0.05, 1.2, 0.3]),
                                   np.array([0.02, -0.5, 1.3]), **kw, t_end=40.0, dt=0.02,
                                   save_every=5)
    axes[1].plot(tr.w, tr.wa, color="tab:purple", lw=1.5)
    axes[1].set(xlabel="$w = w_p$", ylabel="$w_a$", ylim=(-1.5, 1.5),
                title="online and predictor tied")
    axes[1].legend(fontsize=8, loc="lower right")

    # Right: no predictor, w_p = 1, field on (w, w_a)
    dw, _, dwa = decoupled.scalar_field(A, 1.0, B, **kw, predictor=False)
    quiver(axes[2], dw, dwa)
    axes[2].plot(g, g, color="tab:green", lw=2, label=r"$\dot w_a = 0$: $w = w_a$")
    axes[2].plot(g * ld / ls, g, color="tab:blue", lw=2, label=r"$\dot w = 0$: $w = w_a\lambda_d/\lambda_s$")
    axes[2].plot(0, 0, "o", color=STABLE, ms=8)
    tr = decoupled.simulate_scalar(np.array([1.2, -1.0, 0.4]), 1.0, np.array([1.4, 0.6, -1.3]),
                                   **kw, predictor=False, t_end=40.0, dt=0.02, save_every=5)
    axes[2].plot(tr.w, tr.wa, color="tab:purple", lw=1.5)
    axes[2].set(xlabel="$w$", ylabel="$w_a$", title="no predictor ($w_p = 1$)")
    axes[2].legend(fontsize=8, loc="lower right")
    for ax in axes:
        ax.set(xlim=(-1.5, 1.5), ylim=(-1.5, 1.5), aspect="equal")
    fig.suptitle(r"SM Fig. 10: SM Eqs. 102-104, $\lambda_s = 1$, $\lambda_d = 1/2$; arrows: flow direction, "
                 "red / green: stable / unstable fixed points;" "\n"
                 "blue (left) and purple: trajectories integrated with simulate_scalar")
    return _save(fig, out, "fig10_sm_d_low_dim")


FIGURES: dict[str, Callable[[Path], Path]] = {
    "fig3": fig3, "fig4": fig4, "fig5": fig5, "fig7": fig7, "fig8": fig8, "fig9": fig9,
    "fig10": fig10,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     prog="python -m fastpred.theory.figures")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the PNGs")
    parser.add_argument("--only", nargs="+", choices=sorted(FIGURES), default=None,
                        help="make only these figures")
    return parser


def main(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in args.only or FIGURES:
        start = time.perf_counter()
        paths.append(FIGURES[name](args.out))
        print(f"{paths[-1]}  ({time.perf_counter() - start:.1f} s)")
    return paths


if __name__ == "__main__":
    main()
