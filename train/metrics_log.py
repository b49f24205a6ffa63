"""A run's metrics log: ``metrics.jsonl`` (one JSON object per line, rank 0 appends) and, when
tensorboard is installed, the same scalars as TensorBoard events; and reading it back tolerantly.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from .utils import warn


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line) and, when tensorboard is installed, its events.

    Only rank 0 writes, and only by appending, except once at start: the training records after
    the first ``keep_lines`` (those written after the checkpoint being resumed, which the resumed
    run writes again) are dropped, so an interrupted-and-resumed run has the same log as an
    uninterrupted one. Records of other tools (a ``"linear_eval"`` key) are never dropped; that
    one rewrite goes through a temp file and a rename.
    """

    def __init__(self, out_dir: Path, enabled: bool, keep_lines: int = 0, purge_step: int | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.lines = keep_lines
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            old = self.path.read_text(errors="replace").splitlines(keepends=True)
            cut = bool(old) and not old[-1].endswith("\n")
            if cut:  # a crash mid-write: the next record must not be glued onto it
                warn(f"{self.path}: dropped its last line, cut off mid-write: {old[-1][:80]!r}")
                old = old[:-1]
            keep_lines = min(keep_lines, len(old))
            later = [line for line in old[keep_lines:] if _kept_on_resume(line)]
            if cut or len(later) < len(old) - keep_lines:
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(old[:keep_lines] + later))
                os.replace(tmp, self.path)
            self.lines = keep_lines + len(later)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self.tb = TensorBoard(SummaryWriter(str(Path(out_dir) / "tb"), purge_step=purge_step), Path(out_dir) / "tb")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
        self.lines += 1
        if self.tb is not None and "step" in record and not record.get("final"):  # final: the last epoch's again
            prefix = "epoch/" if "epoch_time" in record else "train/"
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                    self.tb.add_scalar(prefix + k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class TensorBoard:
    """A ``SummaryWriter`` whose failures never stop a run: TensorBoard events are an optional copy of
    ``metrics.jsonl``. The first write that fails (a full disk, a file size limit) is one warning
    naming the folder; no more events are written after it. The writer's own thread, which writes
    the file, fails silently here and its error is reported by the next call in the loop."""

    def __init__(self, writer: Any, folder: Path):
        self.writer, self.folder, self.failed = writer, folder, False
        _quiet_tensorboard_threads()

    def _call(self, name: str, *args: Any) -> None:
        if self.failed:
            return
        try:
            getattr(self.writer, name)(*args)
        except OSError as e:
            self.failed = True
            warn(f"TensorBoard events in {self.folder} cannot be written ({e.strerror or e}): no more are "
                 "written in this run; metrics.jsonl has every record")

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._call("add_scalar", tag, value, step)

    def add_histogram(self, tag: str, values: Any, step: int) -> None:
        self._call("add_histogram", tag, values, step)

    def close(self) -> None:
        self._call("close")


_thread_hook_installed = False


def _quiet_tensorboard_threads() -> None:
    """Keep an OSError in TensorBoard's writer thread from printing a traceback (its writer re-raises
    it in the loop's next call, where :class:`TensorBoard` reports it in one line)."""
    global _thread_hook_installed
    if _thread_hook_installed:
        return
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__module__.startswith("tensorboard.") and issubclass(args.exc_type, OSError):
            return
        previous(args)

    threading.excepthook = hook
    _thread_hook_installed = True


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, skipping (with a warning) lines that are not a JSON object,
    such as a last line cut off by a crash. An absent file has none."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        else:
            warn(f"{path}, line {n}: not a JSON record, skipped: {line[:80]!r}")
    return records


def _kept_on_resume(line: str) -> bool:
    """A metrics line another tool wrote (linear evaluation), or one that is not a JSON object (``5``,
    a string, a line that does not parse): never ours to drop; :func:`read_metrics` skips it with a warning."""
    try:
        rec = json.loads(line)
    except ValueError:
        return True
    return not isinstance(rec, dict) or "linear_eval" in rec
