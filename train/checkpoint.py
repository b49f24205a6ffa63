"""Checkpoints: atomic writes (temp file + rename), the last k kept, ``last.pt`` the newest,
``weights_only=True`` loading, and fallback to an older file when the newest is corrupt."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .utils import warn

PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half


def _point_last(path: Path) -> None:
    """Make ``last.pt`` the newest checkpoint: a hard link (no second write) renamed into place."""
    last = path.with_name("last.pt")
    tmp = path.with_name(f".last.pt.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, last)


def checkpoints(out_dir: str | Path) -> list[Path]:
    """``ckpt_<step>.pt`` files, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("ckpt_*.pt") if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def save(state: dict, out_dir: str | Path, step: int, keep: int) -> Path:
    """Write ``ckpt_<step>.pt`` atomically, point ``last.pt`` at it, delete all but the newest ``keep``."""
    out = Path(out_dir)
    path = out / f"ckpt_{step:09d}.pt"
    _atomic_save(state, path)
    _point_last(path)
    for old in checkpoints(out)[:-max(1, keep)]:
        old.unlink(missing_ok=True)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load with ``weights_only=True``: tensors and plain containers only, no code execution."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_latest(out_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict | None, Path | None]:
    """The newest loadable checkpoint in ``out_dir``: ``last.pt``, then ``ckpt_*.pt`` newest first.

    A file that fails to load is reported with a warning and the next older one is tried.
    Returns (None, None) when there is none.
    """
    out = Path(out_dir)
    candidates = [out / "last.pt"] if (out / "last.pt").exists() else []
    for p in reversed(checkpoints(out)):
        if not any(c.exists() and os.path.samefile(c, p) for c in candidates):
            candidates.append(p)
    for p in candidates:
        try:
            return load(p, map_location), p
        except Exception as e:  # truncated zip, bad pickle, I/O error: fall back to an older one
            warn(f"checkpoint {p} is unreadable ({type(e).__name__}: {e}); trying the previous one")
    return None, None
