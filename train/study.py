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
from .config import ConfigError, diff, from_dict, from_saved, load_config, old_to_new, to_dict
from .linear_eval import REFERENCES
from .study_report import machine, write_report
from .metrics_log import read_metrics
from .yaml_files import load_yaml, named_yaml, read_text

CHECKOUT = Path(__file__).resolve().parents[1]
GRID_DIR = CHECKOUT / "train" / "configs" / "grids"
EXPECT_KINDS = ("above", "below", "similar_to", "collapses", "learns")
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
            problems.append(f"{key}: {old_to_new(rec['config'], now, changed)}")
    if problems:
        raise ConfigError("the grid changed since these runs were recorded: " + "; ".join(sorted(set(problems)))
                          + " (use another --out, or delete the recorded runs to redo them)")


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
