"""`make gpu-check`: on a CUDA machine, the GPU tests and the GPU benchmarks, in one report.

    make gpu-check PYTHON=python3             # a GPU machine's own interpreter, offline
    make gpu-check PYTHON=python3 DRY_RUN=1   # the same steps on a CPU machine (CI)
    python -m bench.gpu_check [--build] [--dry-run] [--out gpu-report] [--quick] [--skip-tests]

Everything runs with the interpreter that runs this script; nothing is installed.
Within a time budget (``--budget-s``, default 450 s, build included):

0. ``--build``: ``fastpred._C`` built in place against this interpreter's torch
   (``setup.py build_ext --inplace``; CUDA_HOME default /usr/local/cuda,
   TORCH_CUDA_ARCH_LIST default 9.0, MAX_JOBS default the core count), unless the
   module for this interpreter is newer than every source and imports.
1. Environment: GPU, torch/CUDA/cuSOLVER versions, whether fastpred._C holds CUDA
   kernels for this GPU, CuPy and Triton.
2. The fake-CUDA tier first (``tests/test_fake_cuda.py`` and the CPU bodies of
   ``tests/gpu``, seconds): when it fails, the check stops there, so no GPU time is
   spent on code that fails it (dry runs included).
   Then ``pytest tests/gpu tests/kernels -m gpu``: every GPU test, each under a timeout
   (pytest-timeout, ``--test-timeout``).
3. Benchmarks, timed with CUDA events in interleaved rounds (medians); a case that
   would start after the budget is spent is skipped and listed as such:
   * real training steps (:mod:`bench.train_step`), first: the trainer's ``train_step``
     per predictor (``directpred``, ``linear``, ``none``) on ``imagenet_r50_300ep``'s
     network (bf16, channels_last, synthetic 224x224 views, batch 128) and on
     ``cifar10_r18`` with in-memory uint8 data augmented in batch on the GPU: images/s
     and the predictor's share of the step; one failing case (an OOM) is recorded and the
     rest still run;
   * eigh: ``torch.linalg.eigh`` against fastpred's cuSOLVER paths (csrc ``Xsyevd``,
     CuPy ``Xsyevd``, csrc ``XsyevBatched``, ``Xsyevd`` matrix by matrix,
     ``cupy.linalg.eigh``) at dim 128 ... 4096 and batch 1 ... 64;
   * the statistics (Eq. 19) and the rebuild (Eq. 18) per backend, against the
     reference's ``addmm`` and ``(U p) U^T``;
   * the full update through ``fastpred.functional`` per backend, and its ratio to a
     bare ``torch.linalg.eigh``;
   * host synchronisations per predictor step (``torch.cuda.set_sync_debug_mode``,
     counted) and how long the host is held behind a GPU sleep, per backend;
   * DirectCopy (power 1): the closed form ``F / s_max + eps I`` against the eigh path.
4. ``report.json`` and ``report.md`` in ``--out``, written whatever failed.

``--dry-run`` (no GPU needed): the build, the fake-CUDA tier, the collection of the GPU tests, the list of
the training-step benchmarks a run would take, and the report, which says that nothing
was measured.

Exit status: 0 when everything ran and passed; 1 when the build, a GPU test (or, in
a dry run, their collection or the training-step plan) failed; 2 without a GPU (and no
``--dry-run``). A benchmark that fails is recorded in the report, not in the status.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

import torch

import fastpred.functional as F
from fastpred import backends
from fastpred.backends import reference
from fastpred.eig_map import EigMap

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(dims=[128, 256, 512, 1024, 2048], batches=[1, 4, 16, 64], rounds=5)
QUICK = dict(dims=[128, 512], batches=[1, 8], rounds=3)
# Skip (dim, batch) pairs whose work exceeds 64 matrices of 1024 (minutes of GPU time otherwise).
EIGH_BUDGET = 64 * 1024**3
BACKEND_NAMES = ["torch", "csrc", "cupy", "triton", "auto"]
PAPER_MAP = EigMap()  # eps 0.1, power 0.5, relative, min_eig 1e-4
COPY_MAP = EigMap(0.1, 1.0, "relative", 1e-4)  # DirectCopy: power 1
GPU_TEST_PATHS = ["tests/gpu", "tests/kernels"]  # where tests marked `gpu` live
# The fake-CUDA tier and the CPU runs of the device-generic GPU tests: seconds, no GPU needed.
FAKE_TIER_PATHS = ["tests/test_fake_cuda.py", "tests/gpu"]


# ------------------------------------------------------------------ timing
class Budget:
    """Seconds left of the whole check (build included); benchmarks stop when it is spent."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, what: str) -> bool:
        if self.left() > 0:
            return True
        self.skipped.append(what)
        print(f"gpu-check: time budget spent, skipping {what}", flush=True)
        return False


BUDGET = Budget(float("inf"))  # set by main()


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
    gpu = torch.cuda.is_available()
    info = {
        "gpu": torch.cuda.get_device_name() if gpu else "none",
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if gpu else "",
        "interpreter": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    try:
        from fastpred import _C

        info["csrc_built_with_cuda"] = _C.built_with_cuda()
        if gpu and _C.built_with_cuda():
            info.update(cusolver=_C.cusolver_version(), xsyev_batched=_C.has_syevd_batched(),
                        csrc_kernel_image=_C.cuda_kernel_image_error() or "ok")
    except ImportError as err:
        info["csrc"] = f"not importable: {err}"
    for module in ("cupy", "triton"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = "not installed"
    info["backends"] = available_backends() if gpu else []
    return info


# ------------------------------------------------------------------ build
def _sources() -> list[Path]:
    return [ROOT / "setup.py"] + [Path(p) for p in glob.glob(str(ROOT / "csrc" / "**" / "*"), recursive=True)
                                  if Path(p).is_file()]


def _extension_imports() -> tuple[bool, str]:
    proc = subprocess.run([sys.executable, "-c", "import torch, fastpred._C as c; print(c.built_with_cuda())"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 0:
        return True, proc.stdout.strip()
    lines = proc.stderr.strip().splitlines()
    return False, lines[-1] if lines else ""


def build_extension(out: Path, budget: Budget) -> dict:
    """``fastpred._C`` for this interpreter and its torch, in place; reused when it is newer
    than every source and imports (the module another build of the same sources left)."""
    module = ROOT / "fastpred" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    newest = max(p.stat().st_mtime for p in _sources())
    if module.exists() and module.stat().st_mtime >= newest:
        ok, built_with_cuda = _extension_imports()
        if ok:
            print(f"gpu-check: {module.name} is up to date (CUDA: {built_with_cuda})", flush=True)
            return {"ok": True, "reused": True, "module": module.name, "built_with_cuda": built_with_cuda}
    env = dict(os.environ)
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    print(f"$ CUDA_HOME={env['CUDA_HOME']} TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} "
          f"MAX_JOBS={env['MAX_JOBS']} {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(60.0, budget.left()))
        log, returncode = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        log, returncode = f"{err.stdout or ''}{err.stderr or ''}\nbuild timed out", -1
    (out / "build.log").write_text(log)
    ok, built_with_cuda = _extension_imports() if returncode == 0 else (False, "")
    result = {"ok": ok, "reused": False, "seconds": round(time.monotonic() - t0, 1), "module": module.name,
              "built_with_cuda": built_with_cuda, "arch_list": env["TORCH_CUDA_ARCH_LIST"], "log": "build.log"}
    print(f"gpu-check: build {'ok' if ok else 'FAILED (see build.log)'} in {result['seconds']} s", flush=True)
    if not ok:
        print(log[-3000:], flush=True)
    return result


# ------------------------------------------------------------------ tests
def _has_pytest_timeout() -> bool:
    try:
        import pytest_timeout  # noqa: F401
    except ImportError:
        return False
    return True


def run_gpu_tests(out: Path, budget: Budget, test_timeout: float, collect_only: bool = False) -> dict:
    """``pytest -m gpu`` (each test under ``test_timeout`` s with pytest-timeout; the whole
    run under the budget left), or only its collection (a dry run)."""
    junit = out / "pytest-gpu.xml"
    # Only the folders that hold GPU tests: the others need packages (torchvision, ...) a
    # GPU machine may lack, and their collection errors would mask the GPU results.
    cmd = [sys.executable, "-m", "pytest", *GPU_TEST_PATHS, "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    if collect_only:
        cmd.append("--collect-only")
    else:
        cmd.append("--continue-on-collection-errors")
        if _has_pytest_timeout():
            cmd.append(f"--timeout={test_timeout:g}")
    print("$ " + " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(60.0, budget.left() - 120))
        log, returncode = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        log, returncode = f"{err.stdout or ''}{err.stderr or ''}\npytest stopped: the time budget ran out", -1
    if isinstance(log, bytes):
        log = log.decode(errors="replace")
    (out / "pytest-gpu.log").write_text(log)
    print(log[-3000:], flush=True)
    result = {"returncode": returncode, "collect_only": collect_only, "counts": {}, "failed": [], "skipped": []}
    if collect_only:
        collected = [line for line in log.splitlines() if "::" in line]
        result["counts"]["collected"] = len(collected)
        return result
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
def bench_train_step(quick: bool, plan_only: bool = False) -> dict:
    """The training-step benchmarks (:mod:`bench.train_step`): their plan, and unless
    ``plan_only`` their rows. An import failure (train/ needs torchvision) is recorded."""
    try:
        from bench import train_step
    except Exception as err:  # noqa: BLE001 - the other benchmarks still run
        print(f"gpu-check: training-step benchmarks unavailable: {type(err).__name__}: {err}", flush=True)
        return {"error": f"{type(err).__name__}: {err}", "planned": [], "rows": []}
    schedule = train_step.QUICK if quick else train_step.FULL
    section = {"planned": train_step.planned(), "schedule": dataclasses.asdict(schedule)}
    for row in section["planned"]:
        print(f"gpu-check: {'planned' if plan_only else 'will run'}: " + train_step.format_plan(row), flush=True)
    if not plan_only:
        section.update(train_step.run(schedule=schedule, device="cuda", allows=BUDGET.allows))
    return section


def bench_eigh(dims, batches, rounds) -> list[dict]:
    from fastpred.backends.eigh_driver import EighDriver, TorchCudaOps

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
            if batch * dim**3 > EIGH_BUDGET or not BUDGET.allows(f"eigh dim={dim} batch={batch}"):
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
        if not BUDGET.allows(f"stages dim={dim}"):
            continue
        x, corr = correlation(dim)
        s, u = torch.linalg.eigh(corr)
        weight = torch.tensor(0.7, device="cuda")
        n = x.shape[0]
        c_addmm = corr.clone()
        p = PAPER_MAP(s)
        stats = {"addmm (one GEMM)": lambda c=c_addmm: c.addmm_(x.mT, x, beta=0.3, alpha=0.7 / n)}
        rebuild = {"(U p) U^T": lambda: (u * p.unsqueeze(-2)) @ u.mT}
        for name in names:
            impl = backends.resolve(name, torch.device("cuda"))
            if name == "torch" or impl.corr_ema_ is not reference.corr_ema_:
                c = corr.clone()
                stats[f"{name} corr_ema_"] = lambda f=impl.corr_ema_, c=c: f(c, x, weight)
            if name == "torch" or impl.rebuild is not reference.rebuild:
                rebuild[f"{name} rebuild"] = lambda f=impl.rebuild: f(s, u, PAPER_MAP)
        print(f"stages dim={dim}: {', '.join(stats) + ', ' + ', '.join(rebuild)}", flush=True)
        for stage, cases in (("statistics", stats), ("rebuild", rebuild)):
            for name, t in time_cuda(cases, rounds).items():
                rows.append({"stage": stage, "dim": dim, "n": 2 * dim, "case": name, **t})
    return rows


def bench_full(dims, rounds) -> list[dict]:
    rows = []
    for dim in dims:
        if not BUDGET.allows(f"full update dim={dim}"):
            continue
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


def bench_module_steps(rounds: int) -> list[dict]:
    """``DirectPredictor``'s own step on the GPU (per call; attached with per-view calls),
    fp32 and bf16 features, against its floor, with host syncs per step
    (:func:`bench.module_step.cuda_module_steps`: the path users run, issue 26)."""
    from bench.module_step import cuda_module_steps

    return cuda_module_steps(dim=256, n=512, repeats=max(rounds, 10) * 5)


def count_syncs(dim: int = 256, steps: int = 5) -> list[dict]:
    """Per backend: synchronizing calls per predictor step, and host time held behind a GPU sleep."""
    from fastpred import DirectPredictor

    rows = []
    for name in available_backends():
        if not BUDGET.allows(f"syncs {name}"):
            continue
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


def bench_directcopy(dims, rounds) -> list[dict]:
    """power 1: the closed form F / s_max + eps I (warm-started top eigenpair) against the
    eigh path (eigendecomposition + rebuild), per backend; error against float64 eigh."""
    from fastpred import solvers

    rows = []
    for dim in dims:
        if not BUDGET.allows(f"directcopy dim={dim}"):
            continue
        _, corr = correlation(dim)
        s, u = torch.linalg.eigh(corr.double())
        exact = (u * (s / s[-1] + 0.1)) @ u.mT
        cases, errors = {}, {}
        for name in available_backends():
            impl = backends.resolve(name, torch.device("cuda"))
            top = solvers.init_state("closed_form", corr)
            cases[f"{name} closed form"] = lambda c=corr, t=top, n=name: solvers.closed_form_weight(c, t, eps=0.1,
                                                                                                   backend=n)
            cases[f"{name} eigh path"] = lambda c=corr, i=impl, n=name: i.rebuild(
                *F.symmetric_eigh(c, backend=n), COPY_MAP)
            for kind in ("closed form", "eigh path"):
                errors[f"{name} {kind}"] = (cases[f"{name} {kind}"]().double() - exact).abs().max().item()
        print(f"directcopy dim={dim}: {', '.join(cases)}", flush=True)
        for name, t in time_cuda(cases, rounds).items():
            rows.append({"dim": dim, "case": name, **t, "max_abs_err_vs_float64": errors[name]})
    return rows


# ----------------------------------------------------------------- report
def train_step_markdown(section: dict, dry_run: bool) -> list[str]:
    try:
        from bench import train_step
    except Exception as err:  # noqa: BLE001 - recorded by bench_train_step already
        return ["", "## Training step per predictor", "", f"**Not run:** {section.get('error') or err}"]
    return train_step.markdown(section, dry_run)


def run_fake_tier(out: Path) -> dict:
    """The fake-CUDA tier (``tests/test_fake_cuda.py``) and the CPU bodies of ``tests/gpu``
    (``-m "not gpu"``): seconds, and no GPU is spent on code that fails them."""
    cmd = [sys.executable, "-m", "pytest", *FAKE_TIER_PATHS, "-m", "not gpu", "-q", "-x", "-p", "no:cacheprovider"]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    (out / "pytest-fake-cuda.log").write_text(log)
    print(log[-2000:], flush=True)
    summary = next((line for line in reversed(log.splitlines()) if line.strip()), "")
    return {"returncode": proc.returncode, "summary": summary.strip("= "), "seconds": round(time.perf_counter() - start, 1)}


def markdown(result: dict) -> str:
    env, lines = result["environment"], ["# fastpred GPU check", ""]
    if result.get("dry_run"):
        lines += ["**Dry run: no GPU was used and nothing was measured** (build, test collection and this "
                  "report only).", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    build = result.get("build")
    if build:
        lines += ["", "## Build of fastpred._C", "",
                  f"{'reused (up to date)' if build['reused'] else 'built'}: {build['module']}, "
                  f"ok={build['ok']}, CUDA={build.get('built_with_cuda')}"
                  + ("" if build["reused"] else f", {build['seconds']} s, arch {build['arch_list']} (log: build.log)")]
    if result.get("error"):
        lines += ["", f"**Stopped by an error:** {result['error']}"]
    if result.get("budget_skipped"):
        lines += ["", "Skipped when the time budget was spent: " + ", ".join(result["budget_skipped"])]
    fake = result.get("fake_tier")
    if fake:
        lines += ["", "## Fake-CUDA tier (first; no GPU time is spent if it fails)", "",
                  f"{fake['summary']} (exit status {fake['returncode']}, {fake['seconds']} s; log: pytest-fake-cuda.log)"]
    tests = result.get("tests")
    if tests and tests.get("collect_only"):
        lines += ["", "## GPU tests (collected only)", "",
                  f"{tests['counts'].get('collected', 0)} GPU tests collected (exit status {tests['returncode']}; "
                  "log: pytest-gpu.log)"]
    elif tests:
        counts = tests["counts"]
        lines += ["", "## GPU tests (`pytest -m gpu`)", "",
                  f"{counts.get('tests', '?')} tests, {counts.get('failures', '?')} failures, "
                  f"{counts.get('errors', '?')} errors, {counts.get('skipped', '?')} skipped "
                  f"(exit status {tests['returncode']}; log: pytest-gpu.log)"]
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in tests["failed"]]
        reasons = sorted({s["reason"] for s in tests["skipped"]})
        lines += [f"- skipped because: {r}" for r in reasons]
    if "train_step" in result:
        lines += train_step_markdown(result["train_step"], dry_run=bool(result.get("dry_run")))
    if "syncs" not in result:
        return "\n".join(lines) + "\n"
    lines += ["", "## The module's step (d=256, N=512): per call and attached, against its floor", "",
              "| features | case | GPU ms | x floor | host syncs/step |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['dtype']} | {r['case']} | {r['median_ms']:.3f} | {r['x_floor']:.2f}x | {r.get('host_syncs', '')} |"
              for r in result.get("module_steps", [])]
    lines += ["", "## Host synchronisations per predictor step", "",
              "| backend | syncs/step | host ms held behind a GPU sleep (of ms) |", "|---|---:|---:|"]
    lines += [f"| {r['backend']} | {r['syncs_per_step']:.1f} | {r['host_ms_behind_sleep']:.1f} ({r['sleep_ms']:.0f}) |"
              for r in result["syncs"]]
    lines += ["", "## DirectCopy (power 1): closed form vs eigh path", "",
              "| dim | case | GPU ms | host ms | max abs error vs float64 |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['dim']} | {r['case']} | {r['gpu_ms']:.3f} | {r['host_ms']:.3f} | {r['max_abs_err_vs_float64']:.1e} |"
              for r in result.get("directcopy", [])]
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
    global BUDGET
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-report", help="folder for report.md and report.json")
    parser.add_argument("--build", action="store_true", help="build fastpred._C in place first (if out of date)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: build, collect the GPU tests, report")
    parser.add_argument("--quick", action="store_true", help="small grid (a smoke run)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    parser.add_argument("--budget-s", type=float, default=450.0, help="seconds for everything, build included")
    parser.add_argument("--test-timeout", type=float, default=120.0, help="seconds per GPU test")
    args = parser.parse_args(argv)
    BUDGET = Budget(args.budget_s)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible (torch.cuda.is_available() is False). This check runs the "
              "GPU tests and benchmarks and needs a machine with an NVIDIA GPU; nothing was measured "
              "(DRY_RUN=1 runs the build, the test collection and the report without one).", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = QUICK if args.quick else FULL
    result: dict = {"dry_run": args.dry_run, "grid": grid, "budget_s": args.budget_s}
    failed = False
    try:
        if args.build:
            result["build"] = build_extension(out, BUDGET)
            failed |= not result["build"]["ok"]
        result["environment"] = environment()
        print(json.dumps(result["environment"], indent=1), flush=True)
        result["fake_tier"] = run_fake_tier(out)
        if result["fake_tier"]["returncode"] != 0:
            print("gpu-check: the fake-CUDA tier failed (pytest-fake-cuda.log); fix it before spending GPU time",
                  file=sys.stderr)
            return 1
        if args.dry_run:
            result["tests"] = run_gpu_tests(out, BUDGET, args.test_timeout, collect_only=True)
            failed |= result["tests"]["returncode"] != 0
            result["train_step"] = bench_train_step(args.quick, plan_only=True)
            section = result["train_step"]
            failed |= bool(section.get("error")) or any("error" in r for r in section["planned"])
            return 1 if failed else 0
        if result["environment"].get("csrc_kernel_image", "ok") != "ok":
            cap = result["environment"]["capability"]
            print(f"gpu-check: fastpred._C has no kernels for this GPU ({result['environment']['csrc_kernel_image']});"
                  f" rebuild it: TORCH_CUDA_ARCH_LIST={cap} make gpu-check PYTHON=...", file=sys.stderr)
        if not args.skip_tests:
            result["tests"] = run_gpu_tests(out, BUDGET, args.test_timeout)
            failed |= result["tests"]["returncode"] != 0
        result["train_step"] = bench_train_step(args.quick)
        result["module_steps"] = bench_module_steps(grid["rounds"])
        result["syncs"] = count_syncs()
        result["directcopy"] = bench_directcopy([256, 1024], grid["rounds"])
        result["full"] = bench_full(grid["dims"], grid["rounds"])
        result["stages"] = bench_stages(grid["dims"], grid["rounds"])
        result["eigh"] = bench_eigh(grid["dims"], grid["batches"], grid["rounds"])
        return 1 if failed else 0
    except Exception as err:  # noqa: BLE001 - the report is written whatever failed
        result["error"] = f"{type(err).__name__}: {err}"
        print(f"gpu-check: stopped by {result['error']}", file=sys.stderr)
        return 1
    finally:
        result.setdefault("environment", {})
        result["budget_skipped"] = BUDGET.skipped
        result["seconds"] = round(args.budget_s - BUDGET.left(), 1)
        for key in ("full", "stages", "eigh"):
            result.setdefault(key, [])
        (out / "report.json").write_text(json.dumps(result, indent=1))
        (out / "report.md").write_text(markdown(result))
        print(f"gpu-check: wrote {out / 'report.md'} and {out / 'report.json'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
