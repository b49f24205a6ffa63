"""A study's rows over training: the effective rank (or kNN / online-probe top-1) at each epoch's
evaluation, read from every run's ``metrics.jsonl``, as a figure. Collapse is a trajectory, not only
an end point: a row whose effective rank falls during training collapses even if it ends above 2.

    python -m train.trajectory docs/fm_wide [--metric erank] [--rows directpred no_predictor ...]

Runs evaluate every ``monitor.knn_every`` epochs (the ``fashion_mnist_wide`` preset: every epoch);
runs still in progress contribute the epochs they have reached.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .metrics_log import read_metrics

METRICS = ("erank", "knn_top1", "probe_top1")


def trajectories(out: str | Path, metric: str = "erank") -> dict[str, dict[int, list[tuple[int, float]]]]:
    """``row -> seed -> [(epoch, value), ...]`` from ``OUT/runs/<row>/seed<k>/metrics.jsonl``: the
    per-epoch records carrying ``metric`` (the closing ``"final"`` record repeats the last one)."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {METRICS}")
    curves: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for path in sorted(Path(out).glob("runs/*/seed*/metrics.jsonl")):
        row, seed = path.parent.parent.name, int(path.parent.name[len("seed"):])
        points = sorted({r["epoch"]: float(r[metric]) for r in read_metrics(path)
                         if not r.get("final") and "epoch" in r and r.get(metric) is not None}.items())
        if points:
            curves.setdefault(row, {})[seed] = points
    return curves


def mean_curve(seeds: dict[int, list[tuple[int, float]]]) -> list[tuple[int, float, int]]:
    """``[(epoch, mean over the seeds that reached it, how many seeds), ...]``."""
    by_epoch: dict[int, list[float]] = {}
    for points in seeds.values():
        for epoch, value in points:
            by_epoch.setdefault(epoch, []).append(value)
    return [(e, math.fsum(v) / len(v), len(v)) for e, v in sorted(by_epoch.items())]


def plot(curves: dict[str, dict[int, list[tuple[int, float]]]], metric: str, path: str | Path) -> None:
    """One line per row (the mean over its seeds), each seed faint behind it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (row, seeds) in enumerate(sorted(curves.items())):
        color = f"C{i % 10}"
        for points in seeds.values():
            ax.plot(*zip(*points), color=color, alpha=0.25, lw=0.8)
        mean = mean_curve(seeds)
        ax.plot([e for e, _, _ in mean], [m for _, m, _ in mean], color=color, lw=2, label=f"{row} (n={len(seeds)})")
    if metric == "erank":
        ax.axhline(2.0, color="k", ls=":", lw=1, label="collapse (effective rank 2)")
    ax.set_xlabel("epoch")
    ax.set_ylabel({"erank": "effective rank of the backbone features", "knn_top1": "kNN top-1 (%)",
                   "probe_top1": "online linear probe top-1 (%)"}[metric])
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out: str | Path, metric: str = "erank", rows: list[str] | None = None, path: str | Path | None = None) -> Path:
    curves = trajectories(out, metric)
    if rows:
        curves = {r: c for r, c in curves.items() if r in rows}
    if not curves:
        raise SystemExit(f"{out}: no run has a per-epoch {metric} yet (runs/<row>/seed<k>/metrics.jsonl)")
    path = Path(path) if path else Path(out) / f"trajectory_{metric}.png"
    plot(curves, metric, path)
    return path


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="A study's rows over training (effective rank, kNN or probe top-1)")
    p.add_argument("out", help="the study's --out folder")
    p.add_argument("--metric", default="erank", choices=METRICS)
    p.add_argument("--rows", nargs="*", help="only these rows (default: all)")
    p.add_argument("--png", help="figure path (default: OUT/trajectory_<metric>.png)")
    return p


if __name__ == "__main__":
    a = get_args_parser().parse_args()
    print(main(a.out, a.metric, a.rows, a.png))
