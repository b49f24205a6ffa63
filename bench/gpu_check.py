"""`make gpu-check`: on a CUDA machine, the GPU tests and the GPU benchmarks, in one report.

    python -m bench.gpu_check [--out gpu-report] [--quick] [--skip-tests]

1. Environment: GPU, torch/CUDA/cuSOLVER versions, whether fastpred._C holds CUDA
   kernels for this GPU, CuPy and Triton.
2. ``pytest -m gpu``: every GPU test (tests/gpu/ and any other test marked ``gpu``).
3. Benchmarks, timed with CUDA events in interleaved rounds (medians):
   * eigh: ``torch.linalg.eigh`` against fastpred's cuSOLVER paths (csrc ``Xsyevd``,
     CuPy ``Xsyevd``, csrc ``XsyevBatched``, ``Xsyevd`` matrix by matrix,
     ``cupy.linalg.eigh``) at dim 128 ... 4096 and batch 1 ... 64;
   * the statistics (Eq. 19) and the rebuild (Eq. 18) per backend, against the
     reference's ``addmm`` and ``(U p) U^T``;
   * the full update through ``fastpred.functional`` per backend, and its ratio to a
     bare ``torch.linalg.eigh``;
   * host synchronisations per predictor step (``torch.cuda.set_sync_debug_mode``,
     counted) and how long the host is held behind a GPU sleep, per backend.
4. ``report.json`` and ``report.md`` in ``--out``.

Exit status: 2 without a GPU (nothing is measured), 1 when GPU tests failed, else 0.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

import torch

import fastpred.functional as F
from fastpred import backends
from fastpred.backends import reference

FULL = dict(dims=[128, 256, 512, 1024, 2048, 4096], batches=[1, 4, 16, 64], rounds=7)
QUICK = dict(dims=[128, 512], batches=[1, 8], rounds=3)
# Skip (dim, batch) pairs whose work exceeds 64 matrices of 1024 (minutes of GPU time otherwise).
EIGH_BUDGET = 64 * 1024**3
BACKEND_NAMES = ["torch", "csrc", "cupy", "triton", "auto"]


# ------------------------------------------------------------------ timing
def time_cuda(cases: dict[str, Callable[[], object]], rounds: int, inner: int = 3) -> dict[str, dict]:
    """Per case: median GPU ms per call (CUDA events) and host ms per call, interleaved rounds."""
    for fn in cases.values():  # warm-up: workspaces, caches, autotuning
        fn()
        fn()
    torch.cuda.synchronize()
    gpu: dict[str, list[float]] = {k: [] for k in cases}
    host: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            host[name].append((time.perf_counter() - t0) * 1e3 / inner)
            end.record()
            end.synchronize()
            gpu[name].append(start.elapsed_time(end) / inner)
    return {k: {"gpu_ms": statistics.median(gpu[k]), "host_ms": statistics.median(host[k])} for k in cases}


def correlation(dim: int, batch: int = 1, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n = n or 2 * dim
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, n, dim, device="cuda", generator=g)
    x = x @ (torch.randn(dim, dim, device="cuda", generator=g) / dim**0.5 + torch.eye(dim, device="cuda"))
    corr = x.mT @ x / n
    return (x[0], corr[0]) if batch == 1 else (x, corr)


def available_backends() -> list[str]:
    names = []
    for name in BACKEND_NAMES:
        try:
            backends.resolve(name, torch.device("cuda"))
        except RuntimeError:
            continue
        names.append(name)
    return names


# ------------------------------------------------------------ environment
def environment() -> dict:
    info = {
        "gpu": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    try:
        from fastpred import _C

        info.update(csrc_built_with_cuda=_C.built_with_cuda(), cusolver=_C.cusolver_version(),
                    xsyev_batched=_C.has_syevd_batched(),
                    csrc_kernel_image=_C.cuda_kernel_image_error() or "ok")
    except ImportError as err:
        info["csrc"] = f"not importable: {err}"
    for module in ("cupy", "triton"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = "not installed"
    info["backends"] = available_backends()
    return info


# ------------------------------------------------------------------ tests
def run_gpu_tests(out: Path) -> dict:
    junit = out / "pytest-gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "--continue-on-collection-errors",
           f"--junitxml={junit}"]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out / "pytest-gpu.log").write_text(proc.stdout + proc.stderr)
    print(proc.stdout[-3000:], flush=True)
    result = {"returncode": proc.returncode, "counts": {}, "failed": [], "skipped": []}
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            result["counts"][key] = int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            for tag in ("failure", "error"):
                node = case.find(tag)
                if node is not None:
                    result["failed"].append({"test": name, "message": (node.get("message") or "")[:300]})
            node = case.find("skipped")
            if node is not None:
                result["skipped"].append({"test": name, "reason": (node.get("message") or "")[:200]})
    return result


# ------------------------------------------------------------- benchmarks
def bench_eigh(dims, batches, rounds) -> list[dict]:
    from fastpred.eigh_driver import EighDriver, TorchCudaOps

    try:
        from fastpred.backends import csrc
    except ImportError:
        csrc = None
    try:
        import cupy

        from fastpred.backends import cupy as cupy_backend
    except ImportError:
        cupy = cupy_backend = None
    rows = []
    for dim in dims:
        for batch in batches:
            if batch * dim**3 > EIGH_BUDGET:
                continue
            _, corr = correlation(dim, batch)
            cases = {"torch.linalg.eigh": lambda c=corr: torch.linalg.eigh(c)}
            if csrc is not None and csrc.supports(corr.device):
                cases["csrc (Xsyevd / XsyevBatched)"] = lambda c=corr: csrc.eigh(c)
                if batch > 1:
                    loop = EighDriver(TorchCudaOps(corr.device), [s for s in csrc.cuda_solvers() if not s.batched])
                    cases["csrc Xsyevd, matrix by matrix"] = lambda c=corr, d=loop: d.eigh(c)
            if cupy_backend is not None:
                if batch == 1:
                    cases["cupy backend (Xsyevd)"] = lambda c=corr: cupy_backend.eigh(c)
                    cases["cupy.linalg.eigh"] = lambda c=corr: cupy.linalg.eigh(cupy_backend.as_cupy(c))
            print(f"eigh dim={dim} batch={batch}: {', '.join(cases)}", flush=True)
            for name, t in time_cuda(cases, rounds, inner=1 if dim >= 2048 else 3).items():
                rows.append({"dim": dim, "batch": batch, "case": name, **t})
    return rows


def bench_stages(dims, rounds) -> list[dict]:
    rows = []
    names = [n for n in available_backends() if n != "auto"]
    for dim in dims:
        x, corr = correlation(dim)
        s, u = torch.linalg.eigh(corr)
        weight = torch.tensor(0.7, device="cuda")
        n = x.shape[0]
        c_addmm = corr.clone()
        p = reference.eig_map(s, 0.1, 0.5, "relative", 1e-4)
        stats = {"addmm (one GEMM)": lambda c=c_addmm: c.addmm_(x.mT, x, beta=0.3, alpha=0.7 / n)}
        rebuild = {"(U p) U^T": lambda: (u * p.unsqueeze(-2)) @ u.mT}
        for name in names:
            impl = backends.resolve(name, torch.device("cuda"))
            if name == "torch" or impl.corr_ema_ is not reference.corr_ema_:
                c = corr.clone()
                stats[f"{name} corr_ema_"] = lambda f=impl.corr_ema_, c=c: f(c, x, weight)
            if name == "torch" or impl.rebuild is not reference.rebuild:
                rebuild[f"{name} rebuild"] = lambda f=impl.rebuild: f(s, u, 0.1, 0.5, "relative", 1e-4)
        print(f"stages dim={dim}: {', '.join(stats) + ', ' + ', '.join(rebuild)}", flush=True)
        for stage, cases in (("statistics", stats), ("rebuild", rebuild)):
            for name, t in time_cuda(cases, rounds).items():
                rows.append({"stage": stage, "dim": dim, "n": 2 * dim, "case": name, **t})
    return rows


def bench_full(dims, rounds) -> list[dict]:
    rows = []
    for dim in dims:
        x, corr0 = correlation(dim)
        cases = {"bare torch.linalg.eigh": lambda c=corr0: torch.linalg.eigh(c)}
        for name in available_backends():
            c = corr0.clone()
            cases[name] = lambda c=c, name=name: (F.corr_ema_(c, x, 0.3, backend=name),
                                                  F.directpred_weight(c, backend=name))
        print(f"full update dim={dim}: {', '.join(cases)}", flush=True)
        t = time_cuda(cases, rounds, inner=1 if dim >= 2048 else 3)
        bare = t["bare torch.linalg.eigh"]["gpu_ms"]
        for name, r in t.items():
            rows.append({"dim": dim, "case": name, **r, "vs_bare_eigh": r["gpu_ms"] / bare})
    return rows


def count_syncs(dim: int = 256, steps: int = 5) -> list[dict]:
    """Per backend: synchronizing calls per predictor step, and host time held behind a GPU sleep."""
    from fastpred import DirectPredictor

    rows = []
    for name in available_backends():
        pred = DirectPredictor(dim, backend=name).cuda()
        x = torch.randn(2 * dim, dim, device="cuda")
        for _ in range(3):
            pred(x)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    pred(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(200_000_000)
        end.record()
        t0 = time.perf_counter()
        pred(x)
        held_ms = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        rows.append({"backend": name, "syncs_per_step": syncs / steps, "host_ms_behind_sleep": held_ms,
                     "sleep_ms": start.elapsed_time(end)})
        print(f"syncs {name}: {syncs / steps:.1f} per step, host held {held_ms:.1f} ms", flush=True)
    return rows


# ----------------------------------------------------------------- report
def markdown(result: dict) -> str:
    env, lines = result["environment"], ["# fastpred GPU check", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    tests = result.get("tests")
    if tests:
        counts = tests["counts"]
        lines += ["", "## GPU tests (`pytest -m gpu`)", "",
                  f"{counts.get('tests', '?')} tests, {counts.get('failures', '?')} failures, "
                  f"{counts.get('errors', '?')} errors, {counts.get('skipped', '?')} skipped "
                  f"(exit status {tests['returncode']}; log: pytest-gpu.log)"]
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in tests["failed"]]
        reasons = sorted({s["reason"] for s in tests["skipped"]})
        lines += [f"- skipped because: {r}" for r in reasons]
    lines += ["", "## Host synchronisations per predictor step", "",
              "| backend | syncs/step | host ms held behind a GPU sleep (of ms) |", "|---|---:|---:|"]
    lines += [f"| {r['backend']} | {r['syncs_per_step']:.1f} | {r['host_ms_behind_sleep']:.1f} ({r['sleep_ms']:.0f}) |"
              for r in result["syncs"]]
    lines += ["", "## Full update (statistics + eigh + map + rebuild)", "",
              "| dim | backend | GPU ms | host ms | vs bare eigh |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['dim']} | {r['case']} | {r['gpu_ms']:.3f} | {r['host_ms']:.3f} | {r['vs_bare_eigh']:.2f}x |"
              for r in result["full"]]
    lines += ["", "## Statistics and rebuild", "", "| stage | dim | case | GPU ms | host ms |", "|---|---:|---|---:|---:|"]
    lines += [f"| {r['stage']} | {r['dim']} | {r['case']} | {r['gpu_ms']:.3f} | {r['host_ms']:.3f} |"
              for r in result["stages"]]
    lines += ["", "## Eigendecomposition", "", "| dim | batch | case | GPU ms | host ms |", "|---:|---:|---|---:|---:|"]
    lines += [f"| {r['dim']} | {r['batch']} | {r['case']} | {r['gpu_ms']:.3f} | {r['host_ms']:.3f} |"
              for r in result["eigh"]]
    lines += ["", "GPU ms: CUDA-event time per call, median of interleaved rounds. Host ms: time for the call "
              "to return; close to GPU ms means the host waited (a sync)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-report", help="folder for report.md and report.json")
    parser.add_argument("--quick", action="store_true", help="small grid (a smoke run)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible (torch.cuda.is_available() is False). This check runs the "
              "GPU tests and benchmarks and needs a machine with an NVIDIA GPU; nothing was measured.",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = QUICK if args.quick else FULL
    result = {"environment": environment(), "grid": grid}
    print(json.dumps(result["environment"], indent=1), flush=True)
    if result["environment"].get("csrc_kernel_image", "ok") != "ok":
        cap = result["environment"]["capability"]
        print(f"gpu-check: fastpred._C has no kernels for this GPU ({result['environment']['csrc_kernel_image']});"
              f" rebuild it: make clean && TORCH_CUDA_ARCH_LIST={cap} make gpu-check", file=sys.stderr)
    if not args.skip_tests:
        result["tests"] = run_gpu_tests(out)
    result["syncs"] = count_syncs()
    result["full"] = bench_full(grid["dims"], grid["rounds"])
    result["stages"] = bench_stages(grid["dims"], grid["rounds"])
    result["eigh"] = bench_eigh(grid["dims"], grid["batches"], grid["rounds"])
    (out / "report.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(markdown(result))
    print(f"gpu-check: wrote {out / 'report.md'} and {out / 'report.json'}", flush=True)
    return 1 if result.get("tests", {}).get("returncode", 0) != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
