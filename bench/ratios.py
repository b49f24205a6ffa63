"""The headline: what a training step pays, and the functional update, against their floors.

    python -m bench.ratios [--repeats R]

First table, the module (what users run): ``DirectPredictor``'s step per call (one
training call) and attached (two per-view calls + ``optimizer.step()``), timed
round-robin against the floor (a bare ``torch.linalg.eigh`` + the statistics GEMM +
``V V^T`` + the prediction GEMM; :mod:`bench.module_step`) and, in a second round-robin
group, against the authors' update and prediction (where their B x d x d tensor fits in
2 GiB). Second table, the functional route (``functional.corr_ema_`` +
``directpred_weight``) against a bare eigh and the authors' update, as before.
"""
from __future__ import annotations

import argparse
import os
import platform

import torch

from .harness import authors_update, fastpred_update, inputs, median_ms, time_interleaved
from .module_step import measure

SIZES = [(128, 256), (256, 512), (1024, 2048)]
AUTHORS_MAX_BYTES = 2 * 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60, help="round-robin rounds per size (fewer at 1024)")
    parser.add_argument("--backend", default="auto", help="fastpred backend for the functional update")
    args = parser.parse_args()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"load average {load}")
    print("\nDirectPredictor's step (medians, ms; x floor from the same round-robin rounds)")
    print(f"{'dim':>5} {'N':>5} | {'floor':>8} {'per call':>8} {'attached':>8} | {'per call':>8} {'attached':>8} "
          f"| {'authors':>8} {'vs authors':>10}")
    for dim, n in SIZES:
        repeats = max(5, args.repeats // 10) if dim >= 1024 else args.repeats
        r = measure(dim, n, repeats, authors=2 * (n // 2) * dim * dim * 4 <= AUTHORS_MAX_BYTES)
        authors = (f"{r['authors']:>8.1f} {r['authors'] / r['per call (paired with authors)']:>9.1f}x"
                   if "authors" in r else f"{'(> 2 GiB)':>19}")
        print(f"{dim:>5} {n:>5} | {r['floor']:>8.3f} {r['per call']:>8.3f} {r['attached']:>8.3f} | "
              f"{r['per call'] / r['floor']:>7.2f}x {r['attached'] / r['floor']:>7.2f}x | {authors}")

    print("\nThe functional update (functional.corr_ema_ + directpred_weight)")
    print(f"{'dim':>5} {'N':>5} | {'authors ms':>10} {'fastpred ms':>11} {'eigh ms':>8} | {'vs authors':>10} {'vs eigh':>8}")
    for dim, n in SIZES:
        x, corr0 = inputs(dim, n)
        c_a, c_f, c_e = corr0.clone(), corr0.clone(), corr0.clone()
        repeats = max(5, args.repeats // 10) if dim >= 1024 else args.repeats
        full = lambda: fastpred_update(c_f, x, args.backend)  # noqa: E731
        # Two round-robin groups: the authors' B x d x d tensor evicts every cache and
        # would slow whatever runs after it, so each ratio comes from its own pair.
        vs_eigh = time_interleaved({"fastpred": full, "eigh": lambda: torch.linalg.eigh(c_e)}, repeats)
        vs_authors = time_interleaved({"authors": lambda: authors_update(c_a, x), "fastpred": full}, max(3, repeats // 4))
        f, e = median_ms(vs_eigh["fastpred"]), median_ms(vs_eigh["eigh"])
        a, f2 = median_ms(vs_authors["authors"]), median_ms(vs_authors["fastpred"])
        print(f"{dim:>5} {n:>5} | {a:>10.3f} {f:>11.3f} {e:>8.3f} | {a / f2:>9.1f}x {f / e:>7.2f}x")
    print(f"\nload average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
