"""DirectCopy's closed form (power 1) against the eigendecomposition path, on CPU.

    OMP_NUM_THREADS=1 python -m bench.directcopy [--dims 256] [--steps 200] [--threads 1]

With power 1 in relative mode and eps >= min_eig, W_p = F / s_max + eps I exactly
(docs/design.md, "DirectCopy's closed form"). Along a training-like trajectory (F an
EMA, rho = 0.99, of batch correlations of N = 256 features), each step times, side by
side in one process: the closed form warm-started from the previous top eigenvector
(``directpred_weight(corr, power=1.0, solver_state=top)``, what a module does), the
closed form cold (no state: what a functional user gets by default), and the eigh
path they replace (``symmetric_eigh`` + ``rebuild``, backend "auto").
Both are also held against W_p from a float64 ``torch.linalg.eigh``. Prints a
markdown table and, with ``--json``, writes the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import fastpred.functional as F
from fastpred import backends, solvers
from fastpred.eig_map import EigMap

EPS, MIN_EIG = 0.1, 1e-4
COPY_MAP = EigMap(EPS, 1.0, "relative", MIN_EIG)  # DirectCopy: power 1


def float64_weight(corr: torch.Tensor) -> torch.Tensor:
    """W_p = U diag(max(s, 0) / s_max + eps) U^T from a float64 eigendecomposition."""
    s, u = torch.linalg.eigh(corr.double())
    return (u * (s.clamp(min=0) / s[-1] + EPS)) @ u.mT


def eigh_path(corr: torch.Tensor) -> torch.Tensor:
    s, u = F.symmetric_eigh(corr)
    return backends.resolve("auto", corr.device).rebuild(s, u, COPY_MAP)


def run(dim: int, steps: int, n: int = 256, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5 + torch.eye(dim)
    corr = torch.zeros(dim, dim)
    top = None
    times = {"closed form": [], "cold closed form": [], "eigh path": []}
    errors = {"closed form": 0.0, "cold closed form": 0.0, "eigh path": 0.0}
    s_max_error = 0.0
    for step in range(steps):
        x = torch.randn(n, dim, generator=g) @ mix + 0.1
        F.corr_ema_(corr, x, 0.99, first=step == 0)
        if top is None:
            top = solvers.init_state("closed_form", corr)  # once, as a module primes its buffer
        order = list(times) if step % 2 else list(reversed(times))
        results = {}
        for name in order:
            t0 = time.perf_counter()
            if name == "closed form":
                results[name] = F.directpred_weight(corr, power=1.0, eps=EPS, min_eig=MIN_EIG, solver_state=top)
            elif name == "cold closed form":
                results[name] = F.directpred_weight(corr, power=1.0, eps=EPS, min_eig=MIN_EIG)
            else:
                results[name] = eigh_path(corr)
            times[name].append(time.perf_counter() - t0)
        exact = float64_weight(corr)
        for name, w in results.items():
            errors[name] = max(errors[name], (w.double() - exact).abs().max().item())
        s_exact = torch.linalg.eigvalsh(corr.double())[-1]
        s_max_error = max(s_max_error, abs(solvers.top_eigenvalue(corr, top.clone()).item() / s_exact.item() - 1))
    skip = min(10, steps // 4)  # warm-up steps
    median = {k: statistics.median(v[skip:]) * 1e3 for k, v in times.items()}
    return {"dim": dim, "steps": steps, "n": n, "median_ms": median,
            "speedup": median["eigh path"] / median["closed form"],
            "cold_speedup": median["eigh path"] / median["cold closed form"],
            "max_abs_err_vs_float64": errors, "s_max_max_rel_err": s_max_error}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[256])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [run(dim, args.steps) for dim in args.dims]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} EMA steps (medians after warm-up)\n")
    print("| d | warm closed form ms | cold closed form ms | eigh path ms | speedup warm / cold | "
          "max abs err warm / cold / eigh vs float64 | s_max rel err |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        e, m = r["max_abs_err_vs_float64"], r["median_ms"]
        print(f"| {r['dim']} | {m['closed form']:.3f} | {m['cold closed form']:.3f} | {m['eigh path']:.3f} | "
              f"{r['speedup']:.1f}x / {r['cold_speedup']:.2f}x | {e['closed form']:.1e} / {e['cold closed form']:.1e} "
              f"/ {e['eigh path']:.1e} | {r['s_max_max_rel_err']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
