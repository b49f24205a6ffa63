"""Compile the Triton kernels' launch specializations for sm_90 without a GPU.

The launchers (``corr_ema_launch``, ``rebuild_launch``, ``fold_launch``, ``install_launch``) run on CPU tensors with
``wrap_triton`` replaced by a recorder, over a grid of inputs (sizes, dtypes, layouts,
matmul precisions, mean/weight options, eigenvalue maps): each launch they would make
is recorded with its real arguments. Each distinct specialization (the constexprs, the
launch options and Triton's integer/pointer specialization of the arguments) is then
compiled by Triton's own ``kernel.warmup`` with a fake driver that reports an H100/H200
(``GPUTarget("cuda", 90, 32)``), and its PTX is assembled by ``ptxas -v`` for
``sm_90a``, which reports registers and spills.

Run as a script (``python -m tests.kernels.aot_sm90 --shard 0/2``), never under
``TRITON_INTERPRET=1``; prints one JSON object per compiled specialization. Used by
``tests/kernels/test_aot_sm90.py``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

def find_ptxas() -> str | None:
    """CUDA's ptxas (CUDA_HOME, /usr/local/cuda, PATH), else the one Triton bundles."""
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ptxas"),
                  shutil.which("ptxas") or ""]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


# ---------------------------------------------------------------- recording
@dataclass
class Launch:
    kernel: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, launches: list[Launch]) -> None:
        self.launches = launches

    def __call__(self, kernel):
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.launches.append(Launch(kernel, grid, args, kwargs))

        return _Grid()


def record_launches() -> list[Launch]:
    """Every launch the two launchers make over the input grid (nothing runs)."""
    from fastpred.eig_map import EigMap
    from fastpred.backends.triton_kernels import triton_corr, triton_fold, triton_rebuild

    launches: list[Launch] = []
    recorder = _Recorder(launches)
    saved = (triton_corr.wrap_triton, triton_rebuild.wrap_triton, triton_fold.wrap_triton,
             torch.get_float32_matmul_precision())
    triton_corr.wrap_triton = triton_rebuild.wrap_triton = triton_fold.wrap_triton = recorder
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            for d, n, dtype, layout, batch, mean, weight in itertools.product(
                (20, 200, 256, 1024), (77, 512), (torch.float32, torch.float16, torch.bfloat16),
                ("rows", "columns"), ((), (2,)), (False, True), ("float", "tensor"),
            ):
                x = torch.zeros(*batch, n, d, dtype=dtype)
                if layout == "columns":
                    x = x.mT.contiguous().mT  # stride_xd = N
                corr = torch.zeros(*batch, d, d)
                triton_corr.corr_ema_launch(corr, x, torch.tensor(0.5) if weight == "tensor" else None, 0.5,
                                            torch.zeros(*batch, d) if mean else None)
            for d, batch, mode, power, layout in itertools.product(
                (20, 200, 256, 1024), ((), (3,)), ("relative", "absolute"), (1.0, 0.5, 0.3), ("rows", "columns"),
            ):
                u = torch.zeros(*batch, d, d)
                if layout == "columns":
                    u = u.mT  # eigh's eigenvectors are column-major
                triton_rebuild.rebuild_launch(torch.zeros(*batch, d), u, EigMap(0.1, power, mode, 1e-4))
        for d, batch, mean in itertools.product((20, 256, 1024), ((), (4,)), (False, True)):
            triton_fold.fold_launch(torch.zeros(*batch, d, d), torch.zeros(*batch, d, d), torch.zeros(*batch, d),
                                    torch.ones(batch), torch.zeros(batch, dtype=torch.bool), 0.3,
                                    torch.zeros(*batch, d) if mean else None)
            triton_fold.install_launch(torch.zeros(*batch, d, d), torch.zeros(*batch, d, d))
    finally:
        triton_corr.wrap_triton, triton_rebuild.wrap_triton, triton_fold.wrap_triton, precision = saved
        torch.set_float32_matmul_precision(precision)
    return launches


def _arg_class(value) -> str:
    """What Triton specializes an argument on (dtype; ==1 and divisibility by 16 for ints)."""
    if isinstance(value, torch.Tensor):
        return f"*{value.dtype}:{'D' if value.data_ptr() % 16 == 0 else ''}"
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return repr(value)
    if isinstance(value, int):
        return "1" if value == 1 else ("D" if value % 16 == 0 else "i")
    return type(value).__name__


def specialization(launch: Launch) -> tuple:
    """A key that two launches share exactly when Triton compiles them the same way."""
    return (launch.kernel.__name__, tuple(_arg_class(a) for a in launch.args),
            tuple(sorted((k, v) for k, v in launch.kwargs.items())))


def constexpr_key(launch: Launch) -> tuple:
    """The launch options, constexprs and pointer dtypes (what decides registers and
    shared memory; the integer specializations change addressing only)."""
    dtypes = tuple(str(a.dtype) for a in launch.args if isinstance(a, torch.Tensor))
    return launch.kernel.__name__, dtypes, tuple(sorted((k, v) for k, v in launch.kwargs.items()))


def sample(launches: list[Launch], extra: int, seed: int) -> list[Launch]:
    """One launch per distinct constexpr combination, plus ``extra`` random others
    among the remaining distinct specializations."""
    unique = {}
    for launch in launches:
        unique.setdefault(specialization(launch), launch)
    chosen, rest = {}, []
    for key, launch in sorted(unique.items(), key=lambda kv: repr(kv[0])):
        if constexpr_key(launch) not in chosen:
            chosen[constexpr_key(launch)] = launch
        else:
            rest.append(launch)
    random.Random(seed).shuffle(rest)
    return list(chosen.values()) + rest[:extra]


# ---------------------------------------------------------------- compiling
class _FakeDriver:
    """Enough of a Triton driver for compiling: device 0, stream 0, an sm_90 target."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


def compile_one(launch: Launch, ptxas: str, workdir: str) -> dict:
    """Compile one launch for sm_90 and assemble its PTX with ``ptxas -v``."""
    kernel = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    ptx_path = os.path.join(workdir, f"{launch.kernel.__name__}.ptx")
    with open(ptx_path, "w") as f:
        f.write(kernel.asm["ptx"])
    proc = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx_path, "-o", os.devnull],
                          capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{log}")
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "kernel": launch.kernel.__name__,
        "constexprs": {k: v for k, v in launch.kwargs.items()},
        "args": [_arg_class(a) for a in launch.args],
        "shared_bytes": int(kernel.metadata.shared),
        "registers": int(registers.group(1)) if registers else None,
        "spill_store_bytes": int(spills.group(1)) if spills else 0,
        "spill_load_bytes": int(spills.group(2)) if spills else 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th sampled specialization from i")
    parser.add_argument("--extra", type=int, default=16, help="random extra specializations beyond one per "
                        "constexpr combination")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="only print the counts")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    import triton

    ptxas = find_ptxas()
    if ptxas is None:
        print(json.dumps({"skip": "no ptxas (CUDA_HOME/bin, PATH or Triton's bundled copy)"}))
        return 0
    launches = record_launches()
    chosen = sample(launches, args.extra, args.seed)
    if args.list:
        print(json.dumps({"launches": len(launches), "distinct": len({specialization(x) for x in launches}),
                          "constexpr_combinations": len({constexpr_key(x) for x in launches}),
                          "sampled": len(chosen)}))
        return 0
    index, count = (int(v) for v in args.shard.split("/"))
    triton.runtime.driver.set_active(_FakeDriver())
    with tempfile.TemporaryDirectory() as workdir:
        for launch in chosen[index::count]:
            try:
                result = compile_one(launch, ptxas, workdir)
            except Exception as err:  # noqa: BLE001 - reported, the test fails on it
                result = {"kernel": launch.kernel.__name__, "constexprs": dict(launch.kwargs),
                          "error": f"{type(err).__name__}: {err}"}
            print(json.dumps(result), flush=True)
    print(json.dumps({"triton": triton.__version__, "ptxas": ptxas}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
