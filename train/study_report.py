"""The report of a study (:mod:`train.study`): ``study.md`` (a table of every row, the verdict of each
claim, paired by seed where enough seeds finished) and ``study.png``, written from ``study.json``'s
records after every run.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from .config import MonitorConfig, load_config
from .paired import LEVEL, MIN_PAIRS, PairedDiff, directional, equivalent, pair

if TYPE_CHECKING:  # the runner imports this report
    from .study import Grid, Row

# a `similar_to` claim holds when the paired 95 % interval lies within ± this many points of linear
# top-1: about one row's seed-to-seed std in the `paper` grid, chosen after it ran, before `long` did
SIMILAR_MARGIN = 1.0
CLAIM_SIGN = {"above": 1, "learns": 1, "below": -1, "collapses": -1}  # the sign of (row - compared row) claimed
COLLAPSE_ERANK = MonitorConfig.collapse_erank  # effective rank below this: the features collapsed


def stats(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, n


def row_values(state: dict, row: Row, metric: str = "linear_top1") -> list[float]:
    return list(seed_values(state, row, metric).values())


def seed_values(state: dict, row: Row, metric: str = "linear_top1") -> dict[int, float]:
    """The row's finished runs: seed -> metric (failed runs and runs without the metric left out)."""
    return {r["seed"]: r["metrics"][metric] for r in state["runs"].values()
            if r["row"] == row.name and r.get("metrics") and r["metrics"].get(metric) is not None}


def compared_row(grid: Grid, row: Row) -> str | None:
    """The row a claim compares with: its ``expect`` target, or the ``random_init`` reference row for
    ``collapses`` / ``learns`` (None when the grid has none, or the row makes no claim)."""
    if not row.expect:
        return None
    kind, target = next(iter(row.expect.items()))
    if kind in ("collapses", "learns"):
        return next((r.name for r in grid.rows if r.reference == "random_init"), None)
    return target


def paired_diff(grid: Grid, state: dict, row: Row) -> PairedDiff | None:
    """Per-seed differences of the row's linear top-1 against its compared row (None without a claim)."""
    target = compared_row(grid, row)
    if target is None:
        return None
    return pair(seed_values(state, row), seed_values(state, grid.row(target)))


def verdict(grid: Grid, state: dict, row: Row) -> tuple[str, str]:
    """(what was compared, verdict) for the row's ``expect``, on the linear top-1.

    With at least ``MIN_PAIRS`` seeds finished in both rows the verdict is paired (``train.paired``):
    *holds* when the 95 % t interval of the mean per-seed difference excludes 0 in the claimed
    direction, *contradicted* when it excludes 0 the other way, *undecided* otherwise; a
    ``similar_to`` claim holds when the interval lies within ±``SIMILAR_MARGIN``, is contradicted
    when it lies wholly outside, undecided otherwise. With fewer paired seeds, the unpaired rule:
    holds / does not / within noise, where a difference of the means no larger than the larger of
    the two rows' standard deviations is within noise (and a ``similar_to`` claim holds); with one
    seed in either row there is no spread to compare with, and no verdict.
    ``collapses`` / ``learns`` compare with the ``random_init`` reference row (a network that learned
    nothing useful reads like one at random init) and count an effective rank below 2 as collapse.
    The first element shows the unpaired difference of the means; the paired one is in
    ``paired_diff``."""
    if not row.expect:
        return "", "" if row.reference else "no claim in the paper"
    kind = next(iter(row.expect))
    mean, std, n = stats(row_values(state, row))
    if n == 0:
        failed = sum(1 for r in state["runs"].values() if r["row"] == row.name and r.get("error"))
        return "", f"no finished run ({failed} failed)" if failed else "pending"
    target = compared_row(grid, row)
    if target is None:
        return "", "no random_init row"
    rmean, rstd, rn = stats(row_values(state, grid.row(target)))
    if rn == 0:
        return "", f"pending ({target})"
    d, spread = mean - rmean, max(std, rstd)
    shown = f"{d:+.2f} vs {target} (spread {spread:.2f})"
    p = paired_diff(grid, state, row)
    is_paired = p is not None and p.n >= MIN_PAIRS
    erank = stats(row_values(state, row, "erank"))[0]
    if kind in ("collapses", "learns") and erank < COLLAPSE_ERANK:
        failed_claim = "contradicted" if is_paired else "does not"
        return shown + f", erank {erank:.1f}", "holds" if kind == "collapses" else failed_claim
    if is_paired:
        return shown, equivalent(p, SIMILAR_MARGIN) if kind == "similar_to" else directional(p, CLAIM_SIGN[kind])
    if min(n, rn) < 2:  # one seed has no spread: any difference would "hold"
        return shown, "one seed: no verdict"
    if kind == "similar_to":
        return shown, "holds" if abs(d) <= spread else "does not"
    if abs(d) <= spread:
        return shown, "within noise"
    positive = d > 0
    return shown, "holds" if positive == (CLAIM_SIGN[kind] > 0) else "does not"


def paired_table(grid: Grid, state: dict) -> list[str]:
    """study.md's table of the claims' paired per-seed differences, and the seeds left unpaired."""
    lines = ["| row | paper says | paired seeds | difference (points), mean ± 95 % | 95 % interval | "
             "seeds in the claimed direction | verdict |", "|---|---|---|---|---|---|---|"]
    unpaired = []
    for row in grid.rows:
        p = paired_diff(grid, state, row)
        if p is None:
            continue
        target = compared_row(grid, row)
        v = verdict(grid, state, row)[1]
        if v and p.n < MIN_PAIRS and not v.startswith(("pending", "no ")):
            v += f" (unpaired rule: {p.n} paired seed{'s' * (p.n != 1)})"
        kind = next(iter(row.expect))
        if p.n == 0:
            diff_text = interval = agree = "—"
        else:
            h = p.half_width()
            diff_text = f"{p.mean:+.2f}" + (f" ± {h:.2f}" if p.n >= 2 else " (one seed)")
            interval = f"[{p.mean - h:+.2f}, {p.mean + h:+.2f}]" if p.n >= 2 else "—"
            agree = (f"{p.within(SIMILAR_MARGIN)} of {p.n} within ±{SIMILAR_MARGIN:g}" if kind == "similar_to"
                     else f"{p.agreeing(CLAIM_SIGN[kind])} of {p.n}")
        lines.append(f"| {row.name} | {direction_text(row)} | {p.n} | {diff_text} | {interval} | {agree} | {v} |")
        for name, seeds in ((row.name, p.only_a), (target, p.only_b)):
            if seeds:
                unpaired.append(f"- {row.name} vs {target}: seed{'s' * (len(seeds) > 1)} "
                                f"{', '.join(map(str, seeds))} finished in {name} only: left out of the pairing.")
    if len(lines) == 2:
        return []
    return lines + (["", *unpaired] if unpaired else [])


def direction_text(row: Row) -> str:
    if not row.expect:
        return "reference" if row.reference else ""
    kind, target = next(iter(row.expect.items()))
    return {"above": f"> {target}", "below": f"< {target}", "similar_to": f"≈ {target}",
            "collapses": "collapses", "learns": "learns"}[kind]


def machine() -> str:
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        tv = torch.__version__
    except Exception:  # pragma: no cover - torch is a dependency
        gpu, tv = "?", "?"
    return f"{os.cpu_count()} CPU cores ({cpu or platform.machine()}), {gpu}, torch {tv}, Python {platform.python_version()}"


def _fmt(mean: float, std: float, n: int, digits: int = 2) -> str:
    if n == 0:
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def recipe(grid: Grid) -> str:
    """What every row of the grid starts from: its preset and overrides, as the runs are configured."""
    cfg = load_config(grid.preset, grid.set)
    d, m, o, p, ev = cfg.data, cfg.model, cfg.optim, cfg.predictor, cfg.eval
    target = f"EMA target {m.ema_tau}" if m.ema else "no EMA target"
    predictor = f"DirectPred rho {p.rho}, eps {p.eps}" if p.name == "directpred" else f"predictor {p.name}"
    features = "random-resized-crop and flip each epoch" if ev.augment else "cached centre-crop features"
    return (f"Recipe (preset `{grid.preset}`" + "".join(f", {s}" for s in grid.set) + ", frozen before the study; "
            f"a row's *setting* changes it): {m.arch} backbone{f' at {m.width}x its width' if m.width != 1 else ''}, projector {m.proj_hidden} -> {m.proj_dim}, "
            f"{cfg.epochs} epochs on {d.train_subset or 'all'} `{d.name}` training images, batch {cfg.batch_size}, "
            f"{o.name.upper()} lr {o.lr} wd {o.weight_decay}, {target}; {predictor}; {cfg.loss.name} loss "
            f"({cfg.loss.form}). Linear evaluation: frozen backbone, {features}, {ev.epochs} epochs, lr chosen from "
            f"{list(ev.lr_grid)} on {ev.val_fraction:.0%} of the training images held out, test on the `{d.name}` "
            "test split.")


def how_verdicts_read() -> str:
    """How study.md's verdicts are read (for a grid whose rows make claims)."""
    return ("Verdicts: the direction each row claims (column *paper says*) checked here on the linear top-1, "
            "*collapses* / *learns* against the random-init network (an effective rank below "
            f"{COLLAPSE_ERANK:g} counts as collapse). A seed fixes the initial network, the data order and "
            "the linear evaluation's split in every row, so with at least "
            f"{MIN_PAIRS} seeds finished in both rows the verdict is read on the **paired** per-seed "
            f"differences (table *Claims, paired by seed*): *holds* when their {LEVEL * 100:g} % Student-t "
            "interval excludes 0 in the claimed direction, *contradicted* when it excludes 0 the other way, "
            "*undecided* otherwise; a ≈ claim holds when the interval lies within "
            f"±{SIMILAR_MARGIN:g} point of top-1 (the equivalence margin: about one row's seed-to-seed std in "
            "the `paper` grid, chosen after that grid ran and before the `long` grid did), "
            "is contradicted when it lies wholly outside, undecided otherwise. With fewer paired seeds, "
            "the unpaired rule on the means: *within noise* when the difference is no larger than the "
            "larger standard deviation of the two rows, else holds / does not. *here*: the difference "
            "of the means and that spread.")


def write_report(grid: Grid, state: dict, out: Path, seeds: int, command: str) -> None:
    """study.md (table, verdicts, how to reproduce) and study.png (top-1 per row)."""
    total = len(grid.rows) * seeds  # train.study.plan's length
    done = [r for r in state["runs"].values()]
    wall = sum(r["wall_s"] for r in done)
    claims = any(row.expect for row in grid.rows)
    lines = [f"# Study `{grid.name}`" + (": the paper's ablations" if any(r.paper for r in grid.rows) else "")
             + f" on `{grid.preset}`", "",
             f"Reproduce: `{command}` (resumable; finished runs are kept).", "",
             f"State: {len(done)} of {total} runs finished ({seeds} seeds per row), "
             f"{wall / 3600:.2f} h of run wall time so far{_concurrency(done)}. "
             f"Machine: {state.get('machine', machine())}.", "",
             recipe(grid), "",
             *([grid.notes, ""] if grid.notes else []),
             *([how_verdicts_read()] if claims else []),
             "*eff. rank*: effective rank (Roy & Vetterli 2007) of the backbone features of the training images "
             "the linear classifier sees; *kNN*: the trainer's weighted kNN monitor at the end of pre-training."
             + (" Paper numbers are STL-10, ResNet-18, 100 epochs, 5 seeds unless noted: only their direction is "
                "comparable." if any(r.paper for r in grid.rows) else ""), "",
             "| row | setting | n | linear top-1 (%) | eff. rank | kNN top-1 (%) | paper | paper says | here | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in grid.rows:
        top = stats(row_values(state, row))
        er = stats(row_values(state, row, "erank"))
        knn = stats(row_values(state, row, "knn_top1"))
        failed = sum(1 for r in state["runs"].values() if r["row"] == row.name and r.get("error"))
        shown, v = verdict(grid, state, row)
        n = f"{top[2]}" + (f" (+{failed} failed)" if failed else "")
        lines.append(f"| {row.name} | {row.what} | {n} | {_fmt(*top)} | {_fmt(*er, digits=1)} | "
                     f"{_fmt(*knn) if knn[2] else '—'} | {row.paper} | {direction_text(row)} | {shown} | {v} |")
    paired = paired_table(grid, state)
    if paired:
        lines += ["", "## Claims, paired by seed", "",
                  f"Per seed, the row's linear top-1 minus the compared row's (*paper says*), over the seeds "
                  f"finished in both; mean ± half-width of the two-sided {LEVEL * 100:g} % Student-t interval "
                  "(n - 1 degrees of freedom), and how many seeds differ in the claimed direction.", "", *paired]
    counts: dict[str, int] = {}
    for row in grid.rows:
        v = verdict(grid, state, row)[1].split(" (")[0]
        if v:
            counts[v] = counts.get(v, 0) + 1
    lines += ["", "Verdicts so far: " + ", ".join(f"{v} {n}" for v, n in counts.items()) + "."]
    errors = [(k, r["error"]) for k, r in state["runs"].items() if r.get("error")]
    if errors:
        lines += ["", "Failed runs (recorded, not retried):", ""] + [f"- `{k}`: {e}" for k, e in errors]
    lines += ["", "![linear top-1 per row](study.png)", "",
              "Per-run figures (config, seed, every metric, wall time): `study.json`."]
    (out / "study.md").write_text("\n".join(lines) + "\n")
    plot(grid, state, out / "study.png")


def _concurrency(done: list[dict]) -> str:
    """How many runs shared the machine (``--jobs``), when some did: their wall times are longer."""
    shared = sorted({r["jobs"] for r in done if r.get("jobs", 1) > 1})
    if not shared:
        return ""
    n = sum(r.get("jobs", 1) > 1 for r in done)
    return f" ({n} of these runs ran {' or '.join(map(str, shared))} at a time, `--jobs`: each one's wall time is that of a shared machine)"


def plot(grid: Grid, state: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in grid.rows if row_values(state, r)]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2))
    for i, row in enumerate(rows):
        vals = row_values(state, row)
        mean, std, _ = stats(vals)
        color = "0.6" if row.reference else "C0"
        ax.barh(i, mean, xerr=std, color=color, alpha=0.6, capsize=2)
        ax.plot(vals, [i] * len(vals), "k.", ms=3)
    for row in rows:
        if row.reference:
            ax.axvline(stats(row_values(state, row))[0], ls="--", lw=0.8, color="0.4")
    lo = min(min(row_values(state, r)) for r in rows)
    hi = max(max(row_values(state, r)) for r in rows)
    ax.set_xlim(max(0.0, lo - 5), min(100.0, hi + 3))
    ax.set_yticks(range(len(rows)), [r.name for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("linear top-1 (%) on the test set, mean ± std over seeds (dots: seeds)")
    ax.set_title(f"study {grid.name} on {grid.preset} (dashed: reference rows)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
