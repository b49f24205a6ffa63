"""A grid of configurations x seeds through the normal trainer and linear evaluation.

    python -m train.study --grid paper --out docs [--seeds 3]

A grid is a plain YAML file in ``train/configs/grids/`` (or a path): a ``preset``, optional ``set``
overrides of it for every row, a default number of ``seeds`` and a list of ``rows``. A row either
trains (``set``: ``key=value`` overrides of the preset, after the grid's; run as
``python -m train.pretrain`` then ``python -m train.linear_eval``) or is a
``reference`` evaluated without pre-training (``random_init`` or ``raw_pixels``). A row may carry
the paper's number (``paper``) and direction (``expect``), against which each row gets a verdict.

Every (row, seed) runs in its own subprocess, in ``OUT/runs/<row>/seed<k>/`` and in seed-major order
(seed 0 of every row, then seed 1, ...), so that a study stopped part-way holds the same seeds for
every row and each claim can still be compared seed by seed. ``--jobs N`` runs N of them at a time
(taken in that order); a run's result does not depend on N, its recorded wall time does. After each run ``OUT/study.json``,
``OUT/study.md`` and ``OUT/study.png`` are rewritten. The study is resumable: a finished run is never
redone, a run cut short resumes from its own checkpoint, and a grid whose runs would now be configured
differently from the recorded ones is refused, naming the difference. SIGTERM / SIGINT stop after the
current run's checkpoint, recording nothing for it. A run whose process is killed by a signal (an OOM
kill) is not recorded either: the next invocation resumes it. When the study itself dies, even by
``kill -9``, its running trainer gets SIGTERM (it saves and frees its folder). One study at a time
owns an ``--out`` (a lock on ``OUT/.study.lock``); a damaged ``study.json`` is one error line.

Subprocesses get ``OMP_NUM_THREADS=1`` unless it is set: on a shared small machine one intra-op
thread per run was measured faster than two (oversubscription).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint
from .config import ConfigError, diff, from_dict, from_saved, load_config, load_yaml, named_yaml, read_text, to_dict
from .paired import LEVEL, MIN_PAIRS, PairedDiff, directional, equivalent, pair
from .utils import read_metrics

CHECKOUT = Path(__file__).resolve().parents[1]
GRID_DIR = CHECKOUT / "train" / "configs" / "grids"
REFERENCES = ("random_init", "raw_pixels")
EXPECT_KINDS = ("above", "below", "similar_to", "collapses", "learns")
COLLAPSE_ERANK = 2.0  # effective rank below this: the features collapsed (monitor.collapse_erank)
# a `similar_to` claim holds when the paired 95 % interval lies within ± this many points of linear
# top-1: about one row's seed-to-seed std in the `paper` grid, chosen after it ran, before `long` did
SIMILAR_MARGIN = 1.0
CLAIM_SIGN = {"above": 1, "learns": 1, "below": -1, "collapses": -1}  # the sign of (row - compared row) claimed
ROW_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")  # a folder name under OUT/runs/, never a path
# the fields of a run record in study.json and their types; the first four every record carries
RECORD_FIELDS = {"row": str, "seed": int, "config": dict, "wall_s": (int, float), "reference": str, "set": list,
                 "metrics": dict, "error": str, "jobs": int, "resumed": bool, "finished_at": str}
RECORD_KEYS = ("row", "seed", "config", "wall_s")


# ----------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Row:
    name: str
    what: str = ""
    set: tuple[str, ...] = ()  # key=value overrides of the preset
    reference: str = ""  # random_init | raw_pixels: linear evaluation only, no pre-training
    paper: str = ""  # the paper's number, as text
    expect: dict = field(default_factory=dict)  # {above|below|similar_to: ROW} or {collapses|learns: true}


@dataclass(frozen=True)
class Grid:
    name: str
    preset: str
    seeds: int
    rows: tuple[Row, ...]
    notes: str = ""  # free text printed at the top of study.md (e.g. how the preset was calibrated)
    set: tuple[str, ...] = ()  # key=value overrides of the preset for every row, before the row's own

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)


def grid_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a grid in train/configs/grids/ (``paper``)."""
    try:
        return named_yaml(name_or_path, GRID_DIR, "--grid", "grid")
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e


def load_grid(name_or_path: str) -> Grid:
    """Parse and check a grid: unique row names, known keys, references and directions, and every
    row's overrides valid for the preset (so a typo fails before hours of runs, not at row 20).

    Raises:
        ConfigError: naming the row and the problem.
    """
    path = grid_path(name_or_path)
    try:
        d = load_yaml(read_text(path, "--grid"), f"grid {str(path)!r}") or {}
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if not isinstance(d, dict) or not isinstance(d.get("rows"), list) or not d["rows"]:
        raise ConfigError(f"grid {path}: expected a mapping with a non-empty list 'rows'")
    unknown = set(d) - {"preset", "seeds", "set", "rows", "notes"}
    if unknown:
        raise ConfigError(f"grid {path}: unknown keys {sorted(unknown)} (expected preset, seeds, set, rows, notes)")
    rows, names = [], set()
    for i, r in enumerate(d["rows"]):
        if not isinstance(r, dict) or not r.get("name"):
            raise ConfigError(f"grid {path}: row {i} needs a 'name'")
        bad = set(r) - {f for f in Row.__dataclass_fields__}
        if bad:
            raise ConfigError(f"grid {path}: row {r['name']!r} has unknown keys {sorted(bad)}")
        if not ROW_NAME.match(str(r["name"])):
            raise ConfigError(f"grid {path}: row name {str(r['name'])!r} must be letters, digits, '_', '-' or '.' "
                              "(not starting with '.'): it names the run's folder under --out")
        row = Row(name=str(r["name"]), what=str(r.get("what", "")),
                  set=_overrides(r.get("set"), f"grid {path}: row {r['name']!r}"),
                  reference=str(r.get("reference", "")), paper=str(r.get("paper", "")),
                  expect=dict(r.get("expect") or {}))
        if row.name in names:
            raise ConfigError(f"grid {path}: row name {row.name!r} appears twice")
        if row.reference and row.reference not in REFERENCES:
            raise ConfigError(f"grid {path}: row {row.name!r}: reference {row.reference!r} is not one of {REFERENCES}")
        names.add(row.name)
        rows.append(row)
    for row in rows:
        for kind, target in row.expect.items():
            if kind not in EXPECT_KINDS:
                raise ConfigError(f"grid {path}: row {row.name!r}: expect {kind!r} is not one of {EXPECT_KINDS}")
            if kind in ("above", "below", "similar_to") and target not in names:
                raise ConfigError(f"grid {path}: row {row.name!r}: expect {kind}: {target!r} is not a row")
    seeds = d.get("seeds", 3)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"grid {path}: seeds={seeds!r}: expected a whole number >= 1")
    grid = Grid(name=path.stem, preset=str(d.get("preset", "")) or "digits", seeds=seeds,
                rows=tuple(rows), notes=str(d.get("notes", "")).strip(), set=_overrides(d.get("set"), f"grid {path}"))
    for row in rows:
        run_config(grid, row, 0)  # raises ConfigError naming a bad key
    return grid


def _overrides(s: Any, where: str) -> tuple[str, ...]:
    """A ``set`` mapping of dotted keys as ``key=value`` overrides."""
    if not isinstance(s or {}, dict):
        raise ConfigError(f"{where}: 'set' must be a mapping of dotted keys")
    return tuple(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in (s or {}).items())


def run_config(grid: Grid, row: Row, seed: int) -> dict:
    """The full configuration a (row, seed) runs with, as a plain dict."""
    try:
        return to_dict(load_config(grid.preset, [*grid.set, *row.set, f"seed={seed}"]))
    except ConfigError as e:
        raise ConfigError(f"grid {grid.name!r}, row {row.name!r}: {e}") from e


def run_key(row: Row, seed: int) -> str:
    return f"{row.name}/seed{seed}"


def plan(grid: Grid, seeds: int) -> list[tuple[Row, int]]:
    """Seed-major: one seed of every row (in the grid's order) before the next seed, so a partial
    study is paired (every row has the same seeds)."""
    return [(row, s) for s in range(seeds) for row in grid.rows]


# ----------------------------------------------------------------------------- state


def check_unchanged(grid: Grid, state: dict) -> None:
    """Refuse a grid under which a recorded run would now be configured differently.

    Raises:
        ConfigError: naming the rows and keys that differ (or the rows that are gone).
    """
    problems = []
    if state.get("preset") != grid.preset:
        problems.append(f"preset {state.get('preset')!r} -> {grid.preset!r}")
    names = {r.name for r in grid.rows}
    for key, rec in state.get("runs", {}).items():
        if rec["row"] not in names:
            problems.append(f"row {rec['row']!r} was removed")
            continue
        row = grid.row(rec["row"])
        if row.reference != rec.get("reference", ""):
            problems.append(f"row {row.name!r}: reference {rec.get('reference', '')!r} -> {row.reference!r}")
        now = run_config(grid, row, rec["seed"])
        try:
            changed = diff(from_saved(rec["config"]), from_dict(now))
        except (ValueError, TypeError) as e:  # recorded by a trainer with other keys
            problems.append(f"{key}: its recorded configuration no longer loads ({e})")
            continue
        if changed:
            problems.append(f"{key}: " + ", ".join(f"{k} {_get(rec['config'], k)!r} -> {_get(now, k)!r}" for k in changed))
    if problems:
        raise ConfigError("the grid changed since these runs were recorded: " + "; ".join(sorted(set(problems)))
                          + " (use another --out, or delete the recorded runs to redo them)")


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def load_state(out: Path, grid: Grid) -> dict:
    """``OUT/study.json``, checked: a damaged file is one error line naming it, never a traceback.

    Raises:
        ConfigError: the file cannot be read or parsed, is not a study record, or was recorded under
            another grid.
    """
    path = out / "study.json"
    if not path.exists():
        return {"grid": grid.name, "preset": grid.preset, "runs": {}}
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("runs"), dict):
            raise ValueError("not a study record (expected an object with 'runs')")
        for key, rec in state["runs"].items():
            check_record(key, rec)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = " ".join(str(e).split())[:200]
        raise ConfigError(f"{path} is damaged ({reason}): move it aside to record the study anew; the runs' "
                          "folders are kept and finished runs resume from their checkpoints") from None
    check_unchanged(grid, state)
    return state


def check_record(key: str, rec: Any) -> None:
    """A run record of study.json: an object with the :data:`RECORD_KEYS`, each field of its
    :data:`RECORD_FIELDS` type (a bool is no number) and numbers (or null) as metrics.

    Raises:
        ValueError: naming the run and the field."""
    if not isinstance(rec, dict):
        raise ValueError(f"run {key!r} is not a record but {type(rec).__name__}")
    missing = [k for k in RECORD_KEYS if k not in rec]
    if missing:
        raise ValueError(f"run {key!r} lacks {', '.join(missing)}")
    for field_name, kind in RECORD_FIELDS.items():
        value = rec.get(field_name)
        if field_name in rec and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
            raise ValueError(f"run {key!r}: {field_name} is {value!r}, not {_kind_name(kind)}")
    if rec["seed"] < 0:
        raise ValueError(f"run {key!r}: seed is {rec['seed']}, not >= 0")
    for name, value in (rec.get("metrics") or {}).items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"run {key!r}: metric {name} is {value!r}, not a number")


def _kind_name(kind: type | tuple) -> str:
    names = {str: "a string", int: "an integer", dict: "an object", list: "a list", bool: "true or false"}
    return "a number" if isinstance(kind, tuple) else names[kind]


def save_state(out: Path, state: dict) -> None:
    tmp = out / "study.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, out / "study.json")  # a kill never leaves a half-written file


# ----------------------------------------------------------------------------- one run


class Stop(Exception):
    """The study was asked to stop (SIGTERM / SIGINT); the current run is not recorded."""


class Killed(Exception):
    """A run's process was killed by a signal (an OOM kill, say): not a result, so not recorded; the
    next invocation of the study runs it again, resuming from its checkpoint."""


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the study dies, however it dies (``kill -9``
    included), so that the trainer saves its checkpoint and frees its folder (Linux; elsewhere a
    no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def wait_for_folder(run_dir: Path, timeout: float = 120.0) -> None:
    """Wait until no process holds ``run_dir``'s trainer lock (a trainer of an earlier, killed study
    finishing its last checkpoint); the trainer itself refuses a folder in use."""
    lock = run_dir / ".lock"
    if not lock.exists():
        return
    deadline = time.monotonic() + timeout
    with open(lock, "a+") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return  # the trainer reports the folder in use, naming it
                time.sleep(0.2)


class Runner:
    """Runs commands, one per calling thread (several at once under ``--jobs``); forwards SIGTERM /
    SIGINT to the running ones and remembers it."""

    def __init__(self) -> None:
        self.children: set[subprocess.Popen] = set()
        self.stopping = False
        self._lock = threading.RLock()  # re-entrant: the signal handler may interrupt its own thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.stop()

    def stop(self) -> None:
        """Start no new command; SIGTERM the running ones (the trainer saves a checkpoint and exits 0)."""
        self.stopping = True
        with self._lock:
            for child in self.children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)

    def __call__(self, cmd: list[str], log_path: Path) -> None:
        if self.stopping:
            raise Stop()
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        # the subprocesses import this checkout's train/ and fastpred/, whatever the working directory
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            with self._lock:
                child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True,  # Ctrl-C reaches it only through us
                                         preexec_fn=_die_with_parent)
                self.children.add(child)
                if self.stopping:  # the signal came while it was starting
                    child.send_signal(signal.SIGTERM)
            rc = child.wait()
            with self._lock:
                self.children.discard(child)
        if self.stopping:
            raise Stop()
        if rc < 0:
            raise Killed(f"killed by {signal.Signals(-rc).name}: {' '.join(cmd)} (log: {log_path})")
        if rc != 0:
            raise RuntimeError(f"exit status {rc}: {' '.join(cmd)} (log: {log_path})")


def final_metrics(run_dir: Path) -> dict | None:
    """The pre-training's last ``"final": true`` line of metrics.jsonl, or None when unfinished."""
    finals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("final") and "linear_eval" not in r]
    return finals[-1] if finals else None


def make_run_folder(run_dir: Path) -> None:
    """Create a run's folder (``OUT/runs/<row>/seed<n>``).

    Raises:
        ConfigError: it cannot be created, e.g. a regular file is in its place (one line naming it)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocking = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocking} is a file, not a folder" if blocking else (e.strerror or str(e))
        raise ConfigError(f"cannot create the run folder {run_dir}: {why}; move it aside and re-run") from None


def execute(grid: Grid, row: Row, seed: int, run_dir: Path, runner: Runner) -> dict:
    """Pre-train (unless a reference) and linear-evaluate one (row, seed); returns its metrics."""
    run_dir.mkdir(parents=True, exist_ok=True)
    py, log = sys.executable, run_dir / "log.txt"
    seed_arg = f"seed={seed}"
    if row.reference:
        runner([py, "-m", "train.linear_eval", "--config", grid.preset, "--reference", row.reference,
                "--out", str(run_dir), *grid.set, *row.set, seed_arg], log)
        res = json.loads((run_dir / "linear_eval.json").read_text())[row.reference]
        return {"linear_top1": res["top1"], "linear_top5": res["top5"], "linear_lr": res["lr"], "erank": res["erank"]}
    wait_for_folder(run_dir)
    runner([py, "-m", "train.pretrain", "--config", grid.preset, "--out", str(run_dir), *grid.set, *row.set, seed_arg],
           log)
    final = final_metrics(run_dir)
    if final is None:
        raise RuntimeError(f"pre-training in {run_dir} ended without a final evaluation (log: {log})")
    runner([py, "-m", "train.linear_eval", "--ckpt", str(run_dir / "last.pt")], log)
    res = json.loads((run_dir / "linear_eval.json").read_text())["learned"]
    return {"linear_top1": res["top1"], "linear_top5": res["top5"], "linear_lr": res["lr"], "erank": res["erank"],
            "knn_top1": final.get("knn_top1"), "probe_top1": final.get("probe_top1"),
            "pretrain_erank": final.get("erank")}


# ----------------------------------------------------------------------------- summary


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


def write_report(grid: Grid, state: dict, out: Path, seeds: int, command: str) -> None:
    """study.md (table, verdicts, how to reproduce) and study.png (top-1 per row)."""
    total = len(plan(grid, seeds))
    done = [r for r in state["runs"].values()]
    wall = sum(r["wall_s"] for r in done)
    cfg = load_config(grid.preset, grid.set)
    lines = [f"# Study `{grid.name}`: the paper's ablations on `{grid.preset}`", "",
             f"Reproduce: `{command}` (resumable; finished runs are kept).", "",
             f"State: {len(done)} of {total} runs finished ({seeds} seeds per row), "
             f"{wall / 3600:.2f} h of run wall time so far{_concurrency(done)}. "
             f"Machine: {state.get('machine', machine())}.", "",
             f"Recipe (preset `{grid.preset}`" + "".join(f", {o}" for o in grid.set) + ", frozen before the study): "
             f"{cfg.model.arch} backbone, projector "
             f"{cfg.model.proj_hidden} -> {cfg.model.proj_dim}, {cfg.epochs} epochs on "
             f"{cfg.data.train_subset or 'all'} training images, batch {cfg.batch_size}, SGD lr {cfg.optim.lr} "
             f"wd {cfg.optim.weight_decay}, EMA {cfg.model.ema_tau}; DirectPred rho {cfg.predictor.rho}, "
             f"eps {cfg.predictor.eps}. Linear evaluation: frozen backbone, cached centre-crop features, "
             f"{cfg.eval.epochs} epochs, lr chosen from {list(cfg.eval.lr_grid)} on {cfg.eval.val_fraction:.0%} "
             "of the training images held out, test on the 10 000 test images.", "",
             *([grid.notes, ""] if grid.notes else []),
             "Verdicts: the paper's direction (column *paper says*) checked here on the linear top-1, "
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
             "of the means and that spread. *eff. rank*: effective rank (Roy & Vetterli 2007) of the "
             "backbone features of the training images the linear classifier sees; *kNN*: the trainer's "
             "weighted kNN monitor at the end of pre-training. Paper numbers are STL-10, ResNet-18, 100 epochs, "
             "5 seeds unless noted: only their direction is comparable.", "",
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


# ----------------------------------------------------------------------------- main


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s"


def eta(state: dict, todo: list[tuple[Row, int]]) -> float:
    """Seconds left: the mean wall time so far of reference and of trained runs, times what is left."""
    by_kind = {True: [], False: []}
    for r in state["runs"].values():
        by_kind[bool(r.get("reference"))].append(r["wall_s"])
    every = by_kind[True] + by_kind[False]
    if not every:
        return math.nan
    mean = {k: (sum(v) / len(v) if v else sum(every) / len(every)) for k, v in by_kind.items()}
    return sum(mean[bool(row.reference)] for row, _ in todo)


def main(grid_name: str, out: str | Path, seeds: int | None = None, jobs: int = 1) -> dict:
    """Run (or continue) the study, ``jobs`` runs at a time; returns its state (the content of study.json)."""
    grid = load_grid(grid_name)
    seeds = grid.seeds if seeds is None else seeds
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: expected at least 1")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs {jobs}: expected a whole number >= 1")
    out = Path(out)
    lock = lock_study(out)
    try:
        return _run(grid, grid_name, out, seeds, jobs)
    finally:
        lock.close()


def lock_study(out: Path):
    """Create ``out`` and take its study lock (``OUT/.study.lock``) for the life of this process.

    Raises:
        ConfigError: another study holds it, or ``out`` cannot be written.
    """
    return checkpoint.lock_folder(out, ".study.lock", "study")


def _run(grid: Grid, grid_name: str, out: Path, seeds: int, jobs: int = 1) -> dict:
    state = load_state(out, grid)
    state.update(grid=grid.name, preset=grid.preset, machine=machine())
    command = f"python -m train.study --grid {grid_name} --out {out} --seeds {seeds}"
    runner = Runner()
    todo = [(row, s) for row, s in plan(grid, seeds) if run_key(row, s) not in state["runs"]]
    total = len(plan(grid, seeds))
    print(f"study {grid.name}: {total} runs ({len(grid.rows)} rows x {seeds} seeds), "
          f"{total - len(todo)} already done, {jobs} at a time, results in {out}/study.md", flush=True)
    save_state(out, state)
    write_report(grid, state, out, seeds, command)
    queue = iter(todo)  # taken in plan order (seed-major), whatever the number of jobs
    lock = threading.Lock()  # guards queue, state and the report files

    def run_one(row: Row, seed: int) -> bool:
        """Run and record (row, seed); False when the study was asked to stop."""
        key = run_key(row, seed)
        run_dir = out / "runs" / row.name / f"seed{seed}"
        make_run_folder(run_dir)
        spent = run_dir / "wall_s_before_stop.txt"  # time spent by earlier, interrupted attempts
        earlier = float(spent.read_text()) if spent.exists() else 0.0
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"row": row.name, "seed": seed, "reference": row.reference, "set": list(row.set),
                               "config": run_config(grid, row, seed)}
        try:
            rec["metrics"] = execute(grid, row, seed, run_dir, runner)
        except Stop:
            spent.write_text(str(earlier + time.perf_counter() - t0))
            print(f"stopped before finishing {key}; re-run the same command to continue", flush=True)
            return False
        except Killed as e:  # not a result: left unrecorded, the next invocation resumes it
            spent.write_text(str(earlier + time.perf_counter() - t0))
            print(f"[{key}] not recorded, {e}; the next run of the same command resumes it", flush=True)
            return True
        except RuntimeError as e:  # the run itself failed (e.g. diverged): a result, recorded
            rec["error"] = str(e)
        rec["wall_s"] = earlier + time.perf_counter() - t0
        if jobs > 1:
            rec["jobs"] = jobs  # its wall time is that of one of `jobs` concurrent runs
        if earlier:
            rec["resumed"] = True
        rec["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        with lock:
            state["runs"][key] = rec
            save_state(out, state)
            write_report(grid, state, out, seeds, command)
            left = [(r, s) for r, s in todo if run_key(r, s) not in state["runs"]]
            eta_s = eta(state, left) / max(1, min(jobs, len(left)))
        m = rec.get("metrics") or {}
        result = (f"linear top-1 {m['linear_top1']:.2f}%  erank {m['erank']:.1f}" if m
                  else f"FAILED: {rec['error']}")
        print(f"[{total - len(left)}/{total}] {key}: {result}  ({rec['wall_s']:.0f} s)  "
              f"ETA {_duration(eta_s) if math.isfinite(eta_s) else '?'} for {len(left)} runs", flush=True)
        return True

    errors: list[BaseException] = []

    def worker() -> None:
        try:
            while not runner.stopping:
                with lock:
                    item = next(queue, None)
                if item is None or not run_one(*item):
                    return
        except BaseException as e:  # noqa: BLE001 - raised again below, after the other runs stopped
            errors.append(e)
            runner.stop()

    if jobs == 1:
        worker()
    else:
        threads = [threading.Thread(target=worker, name=f"study-job-{i}") for i in range(min(jobs, len(todo)))]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():  # a timed join keeps the main thread free for SIGTERM / SIGINT
                t.join(0.2)
    if errors:
        raise errors[0]
    return state


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run a grid of trainer configurations x seeds (resumable)")
    p.add_argument("--grid", required=True, help="grid name in train/configs/grids/ or a YAML file")
    p.add_argument("--out", required=True, help="folder for study.json, study.md, study.png and runs/")
    p.add_argument("--seeds", type=int, default=None, help="seeds per row (default: the grid's)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each in its own process with one intra-op thread (default 1)")
    return p


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(args.grid, args.out, args.seeds, args.jobs)
    except ConfigError as e:
        sys.exit(f"error: {e}")
