"""The core issue's headline: fastpred's full update against the authors' update and a bare eigh.

    python -m bench.ratios [--repeats R]

At (dim, N) = (128, 256), (256, 512), (1024, 2048), three cases are timed
round-robin in one run: (a) the authors' approach, fastpred's full update through
``fastpred.functional`` (statistics + eigh + map + rebuild), and (b) a bare
``torch.linalg.eigh`` of the same matrix. Prints medians and the ratios.
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
        t = time_interleaved(
            {
                "authors": lambda: authors_update(c_a, x),
                "fastpred": lambda: fastpred_update(c_f, x, args.backend),
                "eigh": lambda: torch.linalg.eigh(c_e),
            },
            repeats,
        )
        a, f, e = (median_ms(t[k]) for k in ("authors", "fastpred", "eigh"))
        print(f"{dim:>5} {n:>5} | {a:>10.3f} {f:>11.3f} {e:>8.3f} | {a / f:>9.1f}x {f / e:>7.2f}x")


if __name__ == "__main__":
    main()
