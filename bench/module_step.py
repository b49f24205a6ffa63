"""What a user's training step pays: ``DirectPredictor``'s own step against its floor.

    python -m bench.module_step [--dim 256] [--n 512] [--threads 1 2] [--repeats 60]

Three cases are timed round-robin in one process (medians of the same rounds):

- ``floor``: the library calls no DirectPred step can avoid: the statistics GEMM
  ``x^T x``, a bare ``torch.linalg.eigh`` of F, ``V V^T`` and the prediction GEMM
  ``x W^T``;
- ``per call``: one training call of a ``DirectPredictor`` (it records, folds, re-sets
  W_p and predicts);
- ``attached``: two per-view calls of N/2 rows each and ``optimizer.step()``, after
  ``pred.attach(optimizer)`` (the step folds both views as one batch).

A second group pairs the per-call step with the authors' update (per-sample outer
products, general ``eig``; :func:`bench.harness.authors_update`) and their prediction:
its B x d x d tensor evicts every cache, so it is kept out of the first group.

:func:`cuda_module_steps` times the same module steps on a GPU with CUDA events (fp32
and bf16 features) and counts the host syncs of one step
(``torch.cuda.set_sync_debug_mode``); ``bench/gpu_check.py`` calls it.
"""
from __future__ import annotations

import argparse
import os
import warnings
from typing import Callable

import torch

from fastpred import DirectPredictor

from .harness import authors_update, inputs, median_ms, time_interleaved


def floor_step(x: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
    """The four library calls of a step: x^T x, eigh(F), V V^T (V = U) and x W^T."""
    gram = x.T @ x
    _, u = torch.linalg.eigh(corr)
    weight = u @ u.T
    return x @ weight.T, gram


def module_cases(x: torch.Tensor, corr: torch.Tensor, backend: str = "auto") -> dict[str, Callable[[], object]]:
    """``floor``, ``per call`` and ``attached`` steps on ``x`` (N, d), each with its own state."""
    dim = x.shape[1]
    per_call = DirectPredictor(dim, backend=backend).to(x.device)
    attached = DirectPredictor(dim, backend=backend).to(x.device)
    optimizer = torch.optim.SGD(attached.parameters(), lr=0.0)
    attached.attach(optimizer)
    view1, view2 = x.chunk(2)
    floor_corr = corr.clone()

    def attached_step():
        attached(view1)
        attached(view2)
        optimizer.step()

    return {"floor": lambda: floor_step(x, floor_corr), "per call": lambda: per_call(x), "attached": attached_step}


def measure(dim: int, n: int, repeats: int, authors: bool = True) -> dict[str, float]:
    """Medians in ms of the cases of :func:`module_cases` (and, paired, the authors' update)."""
    x, corr = inputs(dim, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = time_interleaved(module_cases(x, corr), repeats, warmup=3)
        result = {name: median_ms(t) for name, t in times.items()}
        if authors:
            c_auth = corr.clone()
            per_call = module_cases(x, corr)["per call"]
            pair = time_interleaved({"authors": lambda: x @ authors_update(c_auth, x).T, "per call": per_call},
                                    max(3, repeats // 4), warmup=1)
            result["authors"] = median_ms(pair["authors"])
            result["per call (paired with authors)"] = median_ms(pair["per call"])
    return result


def cuda_module_steps(dim: int = 256, n: int = 512, repeats: int = 50,
                      dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)) -> list[dict]:
    """The module's per-call and attached steps on the current CUDA device, per feature dtype.

    Each step is timed with CUDA events (median over ``repeats``, after warm-up), the floor
    with it; ``host_syncs`` counts the synchronizing calls of one step of each mode, as
    ``torch.cuda.set_sync_debug_mode("warn")`` reports them (0: sync-free).

    Returns:
        One dict per (dtype, case): ``dtype``, ``case``, ``median_ms``, ``x_floor`` and,
        for the module's steps, ``host_syncs``.

    Raises:
        RuntimeError: no CUDA device.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_module_steps needs a CUDA device")
    rows = []
    for dtype in dtypes:
        x32, corr = inputs(dim, n)
        x, corr = x32.cuda().to(dtype), corr.cuda()
        cases = module_cases(x, corr)
        cases["floor"] = lambda x=x, c=corr.clone(): floor_step(x.float(), c)  # statistics are float32
        times: dict[str, list[float]] = {name: [] for name in cases}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for fn in cases.values():
                for _ in range(3):
                    fn()
            torch.cuda.synchronize()
            for _ in range(repeats):
                for name, fn in cases.items():
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times[name].append(start.elapsed_time(end) / 1e3)
        floor = median_ms(times["floor"])
        for name, t in times.items():
            row = {"dtype": str(dtype).removeprefix("torch."), "case": name, "median_ms": median_ms(t),
                   "x_floor": median_ms(t) / floor}
            if name != "floor":
                row["host_syncs"] = count_host_syncs(cases[name])
            rows.append(row)
    return rows


def count_host_syncs(fn: Callable[[], object]) -> int:
    """Synchronizing CUDA calls made by one ``fn()``, as the sync debug mode warns of them."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    print(f"torch {torch.__version__}; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'threads':>7} | {'floor ms':>8} {'per call':>8} {'attached':>8} | {'per call':>8} {'attached':>8} "
          f"| {'authors':>8} {'vs authors':>10}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        r = measure(args.dim, args.n, args.repeats)
        print(f"{threads:>7} | {r['floor']:>8.3f} {r['per call']:>8.3f} {r['attached']:>8.3f} | "
              f"{r['per call'] / r['floor']:>7.2f}x {r['attached'] / r['floor']:>7.2f}x | {r['authors']:>8.2f} "
              f"{r['authors'] / r['per call (paired with authors)']:>9.1f}x")
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} (d = {args.dim}, N = {args.n})")


if __name__ == "__main__":
    main()
