"""The core issue's headline: fastpred's full update against the authors' update and a bare eigh.

    python -m bench.ratios [--repeats R]

At (dim, N) = (128, 256), (256, 512), (1024, 2048), fastpred's full update through
``fastpred.functional`` (statistics + eigh + map + rebuild) is timed round-robin
against (b) a bare ``torch.linalg.eigh`` of the same matrix, and, in a second
round-robin group, against (a) the authors' approach. Prints medians and the ratios.
"""
from __future__ import annotations

import argparse
import platform

import torch

from .harness import authors_update, fastpred_update, inputs, median_ms, time_interleaved

SIZES = [(128, 256), (256, 512), (1024, 2048)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60, help="round-robin rounds per size (fewer at 1024)")
    parser.add_argument("--backend", default="auto", help="fastpred backend for the full update")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
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


if __name__ == "__main__":
    main()
