"""`make bench`: the module's step, per-stage and full-update timings, peak memory, solvers;
report.md + JSON + plots.

    python -m bench.report [--out bench] [--quick]

The first table is what a training step pays: ``DirectPredictor``'s step per call and
attached (two per-view calls + ``optimizer.step()``) against its floor (a bare eigh, the
statistics GEMM, V V^T and the prediction GEMM; :mod:`bench.module_step`). Every comparison is measured round-robin in one run (see ``harness.time_interleaved``)
and reported as the median with the interquartile range. Stages: statistics (Eq. 19),
eigendecomposition, eigenvalue map, rebuild (Eq. 18); the full update is the three
through ``fastpred.functional``. Backends: every one that runs on this machine's CPU
(the Triton interpreter is a correctness tool, not timed). The authors' update
(per-sample outer products, general ``eig``) is timed where its B x d x d tensor fits.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import fastpred.functional as F
from fastpred import backends, experimental, solvers
from fastpred.backends import reference
from fastpred.eig_map import EigMap

from .harness import authors_update, inputs, median_ms, spread_ms, time_interleaved
from .module_step import module_cases

PAPER_MAP = EigMap()  # eps 0.1, power 0.5, relative, min_eig 1e-4

FULL = dict(dims=[64, 128, 256, 512, 1024, 2048], ns=[256, 1024, 4096])
QUICK = dict(dims=[16, 32], ns=[32, 64])
MODULE_SIZES = [(128, 256), (256, 512), (1024, 2048)]  # (dim, N) of the module's step
QUICK_MODULE_SIZES = [(16, 32)]
AUTHORS_MAX_BYTES = 2 * 2**30  # their B x d x d float32 tensor must stay under 2 GiB here


def cpu_backends() -> list[str]:
    """Backends that run on this CPU, besides the interpreter-only Triton."""
    names = []
    for name in backends.BACKEND_NAMES:
        if name in ("auto", "triton"):
            continue
        try:
            backends.resolve(name, "cpu")
        except RuntimeError:
            continue
        names.append(name)
    return names


def repeats_for(dim: int, quick: bool) -> int:
    if quick:
        return 2
    return 30 if dim <= 256 else 10 if dim <= 512 else 4 if dim <= 1024 else 3


def peak_rss_growth_mb(fn) -> float | None:
    """Peak resident-memory growth of one call, in MiB (Linux: VmHWM reset via clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - before) / 1024
    except OSError:
        return None


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(key)


def summarize(samples: list[float]) -> dict:
    lo, hi = spread_ms(samples) if len(samples) >= 2 else (median_ms(samples),) * 2
    return {"median_ms": median_ms(samples), "q1_ms": lo, "q3_ms": hi, "repeats": len(samples)}


def bench_module(sizes, quick) -> list[dict]:
    """DirectPredictor's step per call and attached, round-robin with its floor (see bench.module_step)."""
    import warnings

    rows = []
    for dim, n in sizes:
        x, corr = inputs(dim, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times = time_interleaved(module_cases(x, corr), repeats_for(dim, quick) * 2, warmup=3)
        for case, t in times.items():
            rows.append({"case": case, "dim": dim, "n": n, **summarize(t)})
    return rows


def bench_stages(dims, ns, names, quick) -> list[dict]:
    """Each stage per backend, interleaved; statistics over (dim, N), the rest over dim."""
    rows = []
    for dim in dims:
        _, corr = inputs(dim, max(ns))
        s, u = reference.eigh(corr)
        cases = {}
        for name in names:
            impl = backends.resolve(name, "cpu")
            cases[("eigh", name)] = lambda impl=impl: impl.eigh(corr)
            cases[("rebuild", name)] = lambda impl=impl: impl.rebuild(s, u, PAPER_MAP)
        cases[("eig_map", "torch")] = lambda: F.eig_map(s)
        for (stage, name), t in time_interleaved(cases, repeats_for(dim, quick)).items():
            rows.append({"stage": stage, "backend": name, "dim": dim, "n": None, **summarize(t)})
        for n in ns:
            x, corr = inputs(dim, n)
            stats = {}
            for name in names:
                impl = backends.resolve(name, "cpu")
                c = corr.clone()
                stats[("statistics", name)] = lambda impl=impl, c=c: impl.corr_ema_(c, x, 0.7, None)
            for (stage, name), t in time_interleaved(stats, repeats_for(dim, quick)).items():
                rows.append({"stage": stage, "backend": name, "dim": dim, "n": n, **summarize(t)})
    return rows


def bench_full(dims, ns, names, quick) -> list[dict]:
    """The whole update per backend, next to a bare eigh and (where it fits) the authors' update."""
    rows = []
    for dim in dims:
        for n in ns:
            x, corr = inputs(dim, n)
            cases = {}
            for name in names:
                c = corr.clone()
                cases[name] = lambda name=name, c=c: (F.corr_ema_(c, x, 0.3, backend=name), F.directpred_weight(c, backend=name))
            c_eigh = corr.clone()
            cases["bare eigh"] = lambda: torch.linalg.eigh(c_eigh)
            times = time_interleaved(cases, repeats_for(dim, quick), warmup=1)
            authors_bytes = 4 * n * dim * dim
            fits = authors_bytes <= AUTHORS_MAX_BYTES and dim <= (256 if quick else 1024)
            if fits:
                # Its own round-robin with the default path: its B x d x d tensor evicts
                # every cache and would slow whatever ran after it in the group above.
                c_auth, c_auto = corr.clone(), corr.clone()
                cases["authors"] = lambda: authors_update(c_auth, x)
                pair = {"authors": cases["authors"],
                        "auto": lambda: (F.corr_ema_(c_auto, x, 0.3), F.directpred_weight(c_auto))}
                pair_times = time_interleaved(pair, repeats_for(dim, quick) if dim <= 512 else 2, warmup=1)
                times["authors"] = pair_times["authors"]
                times["auto (paired with authors)"] = pair_times["auto"]
                cases["auto (paired with authors)"] = pair["auto"]
            for name, t in times.items():
                memory = peak_rss_growth_mb(cases[name])
                rows.append({"case": name, "dim": dim, "n": n, "peak_mb": memory, **summarize(t)})
            if not fits:
                rows.append({"case": "authors", "dim": dim, "n": n, "skipped": f"needs {authors_bytes / 2**30:.1f} GiB"})
    return rows


PAPER_SOLVERS = ("eigh", *solvers.EXPERIMENTAL)  # those that serve the paper's map (power 0.5)


def bench_solvers(quick) -> list[dict]:
    """Solvers on a stream of batches (dim 256, N 512): time per full update, error vs float64 eigh."""
    dim, n = (32, 64) if quick else (256, 512)
    rows = []
    for rho in (0.3, 0.99):
        g = torch.Generator().manual_seed(0)
        mix = torch.randn(dim, dim, generator=g) / dim**0.5 + torch.diag(torch.logspace(0, -2, dim))
        stream = [torch.randn(n, dim, generator=g) @ mix for _ in range(6 if quick else 40)]
        corr = {k: torch.zeros(dim, dim) for k in PAPER_SOLVERS}
        state = {k: None for k in PAPER_SOLVERS}
        times = {k: [] for k in PAPER_SOLVERS}
        errors = {k: [] for k in PAPER_SOLVERS}
        refreshes = 0
        eigh_times = []
        for step, x in enumerate(stream):
            for k in PAPER_SOLVERS:  # round-robin within each step
                start = time.perf_counter()
                F.corr_ema_(corr[k], x, rho, first=step == 0)
                if state[k] is None and k != "eigh":
                    state[k] = solvers.init_state(k, corr[k])
                if k == "warm":
                    w, refreshed = experimental.warm_eigh_weight(corr[k], state[k], PAPER_MAP)
                    refreshes += refreshed
                else:
                    w = F.directpred_weight(corr[k], solver=k, solver_state=state[k])
                times[k].append(time.perf_counter() - start)
                exact = F.directpred_weight(corr[k].double()).double()
                errors[k].append(((w.double() - exact).norm() / exact.norm()).item())
            c = corr["eigh"].clone()
            start = time.perf_counter()
            torch.linalg.eigh(c)
            eigh_times.append(time.perf_counter() - start)
        skip = 2  # the first steps prime the solvers' state
        for k in PAPER_SOLVERS:
            rows.append({"rho": rho, "solver": k, "dim": dim, "n": n, **summarize(times[k][skip:]),
                         "max_rel_err": max(errors[k][skip:]),
                         **({"fallbacks": f"{refreshes}/{len(stream)}"} if k == "warm" else {})})
        rows.append({"rho": rho, "solver": "bare eigh", "dim": dim, "n": n, **summarize(eigh_times[skip:])})
    return rows


def plot(stage_rows, full_rows, out: Path) -> list[str]:
    try:
        import matplotlib
    except ImportError:  # the tables are the report; the plots are a view of them
        print("matplotlib is not installed: no plots", flush=True)
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (stage, name) in sorted({(r["stage"], r["backend"]) for r in stage_rows}):
        rows = [r for r in stage_rows if r["stage"] == stage and r["backend"] == name and r["n"] in (None, max(r2["n"] or 0 for r2 in stage_rows))]
        rows.sort(key=lambda r: r["dim"])
        ax.loglog([r["dim"] for r in rows], [r["median_ms"] for r in rows], "o-", label=f"{stage} ({name})")
    dims = sorted({r["dim"] for r in stage_rows})
    ref = next(r["median_ms"] for r in stage_rows if r["stage"] == "eigh" and r["dim"] == dims[-1])
    ax.loglog(dims, [ref * (d / dims[-1]) ** 3 for d in dims], "k--", lw=0.8, label="slope d^3")
    n_max = max(r["n"] or 0 for r in stage_rows)
    ref = next(r["median_ms"] for r in stage_rows if r["stage"] == "statistics" and r["dim"] == dims[-1] and r["n"] == n_max)
    ax.loglog(dims, [ref * (d / dims[-1]) ** 2 for d in dims], "k:", lw=0.8, label=f"slope N d^2 (N={n_max})")
    ax.set_xlabel("dim d"); ax.set_ylabel("ms (median)"); ax.set_title("Stages of the DirectPred update (CPU)")
    ax.legend(fontsize=7); fig.tight_layout()
    fig.savefig(out / "stages.png", dpi=120); plt.close(fig)
    files.append("stages.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    n_sel = max(r["n"] for r in full_rows)
    for case in sorted({r["case"] for r in full_rows if "median_ms" in r}):
        rows = sorted((r for r in full_rows if r["case"] == case and r["n"] == n_sel and "median_ms" in r), key=lambda r: r["dim"])
        if rows:
            ax.loglog([r["dim"] for r in rows], [r["median_ms"] for r in rows], "o-", label=case)
    dims = sorted({r["dim"] for r in full_rows})
    ax.loglog(dims, [1e-6 * d**3 for d in dims], "k--", lw=0.8, label="slope d^3")
    ax.set_xlabel("dim d"); ax.set_ylabel("ms (median)"); ax.set_title(f"Full update, N = {n_sel} (CPU)")
    ax.legend(fontsize=7); fig.tight_layout()
    fig.savefig(out / "full_update.png", dpi=120); plt.close(fig)
    files.append("full_update.png")
    return files


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}; {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads)"


def fmt(r: dict) -> str:
    return f"{r['median_ms']:.3f} [{r['q1_ms']:.3f}, {r['q3_ms']:.3f}]"


def summary(result: dict) -> list[str]:
    """A few sentences saying what the tables below show, each computed from them."""
    full = [r for r in result["full"] if "skipped" not in r]
    out = []
    module = {(r["dim"], r["n"], r["case"]): r["median_ms"] for r in result.get("module", [])}
    for dim, n in sorted({(d, nn) for d, nn, _ in module}):
        floor = module[(dim, n, "floor")]
        out.append(f"- **The module's step** (d = {dim}, N = {n}): per call {module[(dim, n, 'per call')] / floor:.2f}x "
                   f"its floor, attached (two per-view calls + `optimizer.step()`) "
                   f"{module[(dim, n, 'attached')] / floor:.2f}x.")

    def by_case(case):
        return {(r["dim"], r["n"]): r for r in full if r["case"] == case}

    eigh, authors, paired = by_case("bare eigh"), by_case("authors"), by_case("auto (paired with authors)")
    default = next((c for c in ("csrc", "torch") if by_case(c)), None)
    if default and eigh:
        ratios = {k: r["median_ms"] / eigh[k]["median_ms"] for k, r in by_case(default).items() if k in eigh}
        lo, hi = min(ratios.values()), max(ratios.values())
        dims = sorted({d for d, _ in ratios})
        out.append(f"- **Full update**: the default CPU path (`{default}`) costs {lo:.2f}-{hi:.2f}x a bare "
                   f"`torch.linalg.eigh` of the same matrix (d = {dims[0]}-{dims[-1]}): the eigendecomposition "
                   "is the floor, and the statistics and the rebuild add the rest.")
    speedups = {k: authors[k]["median_ms"] / r["median_ms"] for k, r in paired.items() if k in authors}
    if speedups:
        (d_lo, n_lo), (d_hi, n_hi) = min(speedups, key=speedups.get), max(speedups, key=speedups.get)
        peak = max(authors.values(), key=lambda r: r.get("peak_mb") or 0)
        skipped = sum(1 for r in result["full"] if r["case"] == "authors" and "skipped" in r)
        out.append(f"- **Against the authors' update** (per-sample outer products, general `eig`): "
                   f"{speedups[(d_lo, n_lo)]:.1f}x faster at d = {d_lo}, N = {n_lo} up to "
                   f"{speedups[(d_hi, n_hi)]:.0f}x at d = {d_hi}, N = {n_hi}; their B x d x d tensor grew the "
                   f"process by up to {peak.get('peak_mb') or 0:.0f} MiB (d = {peak['dim']}, N = {peak['n']})"
                   + (f" and was skipped in {skipped} cases where it needs more than 2 GiB." if skipped else "."))
    stage = {(r["stage"], r["backend"], r["dim"], r["n"]): r["median_ms"] for r in result["stages"]}
    dim = max((d for (st, b, d, _) in stage if st == "eigh" and b == default), default=None)
    if dim is not None:
        n = max(nn for (st, b, d, nn) in stage if st == "statistics" and b == default and d == dim)
        parts = {st: stage.get((st, default, dim, n if st == "statistics" else None)) for st in
                 ("statistics", "eigh", "rebuild")}
        if all(v is not None for v in parts.values()):
            total = sum(parts.values())
            out.append(f"- **Stages** (`{default}`, d = {dim}, statistics at N = {n}): eigh "
                       f"{parts['eigh']:.1f} ms of {total:.1f} ms ({100 * parts['eigh'] / total:.0f} %), "
                       f"statistics {parts['statistics']:.1f} ms, rebuild {parts['rebuild']:.1f} ms.")
    for rho in sorted({r["rho"] for r in result["solvers"]}):
        rows = {r["solver"]: r for r in result["solvers"] if r["rho"] == rho and r["solver"] != "bare eigh"}
        if "eigh" not in rows:
            continue
        faster = [k for k, r in rows.items() if k != "eigh" and r["median_ms"] < rows["eigh"]["median_ms"]]
        times = ", ".join(f"`{k}` {r['median_ms']:.2f} ms" + (f" (fell back {r['fallbacks']})" if r.get("fallbacks") else "")
                          for k, r in rows.items())
        verdict = f"faster than eigh: {', '.join(faster)}" if faster else "none is faster than eigh"
        out.append(f"- **Solvers at rho = {rho}** (d = {rows['eigh']['dim']}): {times}; {verdict}.")
    return out


def write_markdown(result: dict, out: Path) -> None:
    full, stages, solver_rows = result["full"], result["stages"], result["solvers"]
    lines = [
        "# fastpred benchmark report", "",
        f"Machine: {result['machine']}. Generated by `make bench` in {result['seconds']:.0f} s"
        + (f" (load average at the start {result['load_average'][0]:.2f})." if "load_average" in result else "."),
        "Times are medians over round-robin repeats, [first, third quartile], in ms.", "",
        "## Summary", "", *summary(result), "",
        "## The module's step against its floor", "",
        "What a training step pays: `DirectPredictor`'s step per call (one training call: record, fold, rebuild,",
        "predict) and attached (two per-view calls of N/2 rows + `optimizer.step()`), one round-robin group with",
        "the floor: a bare `torch.linalg.eigh` of F + the statistics GEMM x^T x + V V^T + the prediction GEMM x W^T.", "",
        "| dim | N | case | time ms | x floor |", "|---:|---:|---|---|---:|",
        *[f"| {r['dim']} | {r['n']} | {r['case']} | {fmt(r)} | "
          f"{r['median_ms'] / next(f['median_ms'] for f in result['module'] if f['case'] == 'floor' and f['dim'] == r['dim'] and f['n'] == r['n']):.2f} |"
          for r in result.get("module", [])],
        "",
        "## Full update through `fastpred.functional` (statistics + eigh + map + rebuild) against a bare eigh and "
        "the authors' update", "",
        "Rows `torch`, `csrc` and `bare eigh` are one round-robin group; `authors` and `auto (paired with authors)`",
        "another (the authors' B x d x d tensor evicts the caches of whatever runs after it). Peak RSS growth",
        "counts only memory the process had to add (0: served from memory the allocator already held).", "",
        "| dim | N | case | time ms | x bare eigh | authors / this | peak RSS growth MiB |",
        "|---:|---:|---|---|---:|---:|---:|",
    ]
    for dim in sorted({r["dim"] for r in full}):
        for n in sorted({r["n"] for r in full if r["dim"] == dim}):
            group = {r["case"]: r for r in full if r["dim"] == dim and r["n"] == n}
            eigh = group["bare eigh"]["median_ms"]
            authors = group.get("authors", {}).get("median_ms")
            for case, r in group.items():
                if "skipped" in r:
                    lines.append(f"| {dim} | {n} | {case} | skipped: {r['skipped']} | | | |")
                    continue
                paired = group.get("auto (paired with authors)")
                speedup = f"{authors / paired['median_ms']:.1f}x" if authors and case == "auto (paired with authors)" else ""
                mem = f"{r['peak_mb']:.1f}" if r.get("peak_mb") is not None else ""
                lines.append(f"| {dim} | {n} | {case} | {fmt(r)} | {r['median_ms'] / eigh:.2f} | {speedup} | {mem} |")
    lines += ["", "## Stages", "", "| stage | backend | dim | N | time ms |", "|---|---|---:|---:|---|"]
    for r in sorted(stages, key=lambda r: (r["stage"], r["backend"], r["dim"], r["n"] or 0)):
        lines.append(f"| {r['stage']} | {r['backend']} | {r['dim']} | {r['n'] or ''} | {fmt(r)} |")
    lines += ["", "## Solvers on a stream of batches (EMA rho as given)", "",
              "| rho | solver | dim | N | full update ms | max rel. error of W vs float64 eigh | eigh fallbacks |",
              "|---:|---|---:|---:|---|---:|---|"]
    for r in solver_rows:
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else ""
        lines.append(f"| {r['rho']} | {r['solver']} | {r['dim']} | {r['n']} | {fmt(r)} | {err} | {r.get('fallbacks', '')} |")
    lines += ["", ("Plots: " + ", ".join(f"![{p}]({p})" for p in result["plots"])) if result["plots"]
              else "No plots (matplotlib was not installed where this report was made).", ""]
    (out / "report.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench", help="folder for report.md, report.json and the plots")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = QUICK if args.quick else FULL
    names = cpu_backends()
    start = time.perf_counter()
    print(f"backends: {names}; dims {grid['dims']}; N {grid['ns']}", flush=True)
    module = bench_module(QUICK_MODULE_SIZES if args.quick else MODULE_SIZES, args.quick)
    print("module step done", flush=True)
    stages = bench_stages(grid["dims"], grid["ns"], names, args.quick)
    print("stages done", flush=True)
    full = bench_full(grid["dims"], grid["ns"], names, args.quick)
    print("full update done", flush=True)
    solver_rows = bench_solvers(args.quick)
    result = {"machine": machine(), "load_average": list(os.getloadavg()), "backends": names, "module": module,
              "stages": stages, "full": full, "solvers": solver_rows}
    result["plots"] = plot(stages, full, out)
    result["seconds"] = time.perf_counter() - start
    (out / "report.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'} and {', '.join(result['plots'])} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
