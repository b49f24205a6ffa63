"""Checkpoints and the run folder that holds them.

A checkpoint file is what ``torch.save`` writes, followed by a trailer: ``DIGEST_MAGIC`` and the
SHA-256 of everything before it (``torch.load`` ignores bytes after the zip archive, so the file
still loads with plain ``torch.load``; a file without the trailer, from an older version, loads
with a warning). Writes are atomic (a temp file renamed into place), the run's own last k are kept
(a file that is not the run's own, which the resume refused as damaged or not fitting, or that
is numbered past the step the run resumed from, is neither counted nor deleted) and
``last.pt`` links the newest. Loading verifies the digest before unpickling, unpickles with
``weights_only=True`` (tensors and plain containers only: a pickle that would run code is
refused) and checks the keys the caller needs; :func:`load_latest` falls back to the next older
file with a warning naming the file and the reason.

A run folder belongs to one trainer at a time: :func:`lock_folder` takes an advisory lock on
``DIR/.lock`` for the life of the process (the kernel drops it when the process dies, so a killed
run never blocks its resume).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import shutil
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import IO

import torch

from .config import ConfigError
from .utils import warn

PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")
TEMP = re.compile(r"^\.(ckpt_\d+|last)\.pt\.tmp\d+$")  # what an interrupted save leaves behind
DIGEST_MAGIC = b"\nfastpred-sha256\n"
DIGEST_SIZE = 32


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used or written: the message names the file and why."""


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _atomic_write(payload: bytes, path: Path) -> None:
    """``payload`` and its digest trailer into ``path``, all or nothing."""
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.write(DIGEST_MAGIC + hashlib.sha256(payload).digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not stay full of our partial file
        raise


def _point_last(path: Path) -> None:
    """Make ``last.pt`` the newest checkpoint: a hard link (no second write) renamed into place."""
    last = path.with_name("last.pt")
    tmp = _temp_name(last)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(path, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(path, tmp)
        os.replace(tmp, last)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def checkpoints(out_dir: str | Path) -> list[Path]:
    """``ckpt_<step>.pt`` files, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("ckpt_*.pt") if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def save(state: dict, out_dir: str | Path, step: int, keep: int, foreign: Collection[Path] = ()) -> Path:
    """Write ``ckpt_<step>.pt`` atomically, point ``last.pt`` at it, delete all but the newest ``keep``.

    ``foreign``: checkpoints that are not the run's own (:func:`foreign_files`); retention neither
    counts them nor deletes them, so a foreign file never pushes out the run's own (the one this
    save replaces, at the same step, is the run's own from now on).

    Raises:
        CheckpointError: the file could not be written (full disk, read-only folder); the previous
            checkpoints are untouched and no temp file is left. Or ``last.pt`` could not be replaced
            (a folder in its place, say): the message names it.
    """
    out = Path(out_dir)
    path = out / f"ckpt_{step:09d}.pt"
    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        _atomic_write(buf.getbuffer(), path)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; "
                              "the previous checkpoints are intact") from e
    try:
        _point_last(path)
    except OSError as e:
        raise CheckpointError(f"cannot point {out / 'last.pt'} at the new checkpoint: {e.strerror or e} "
                              f"({path} was written; a resume finds it)") from e
    for old in own(out, [p for p in foreign if p != path])[:-max(1, keep)]:
        old.unlink(missing_ok=True)
    return path


def own(out_dir: str | Path, foreign: Collection[Path] = ()) -> list[Path]:
    """The ``ckpt_<step>.pt`` files but the ``foreign`` ones, oldest first."""
    return [p for p in checkpoints(out_dir) if p not in foreign]


def foreign_files(out_dir: str | Path, chosen: Path | None, step: int) -> list[Path]:
    """The ``ckpt_<step>.pt`` files that are not the run's own once it resumes from ``chosen`` (at
    ``step``): those :func:`load_latest` tried and refused before it took ``chosen`` (a refused
    ``last.pt`` stands for the file it links), and those numbered past ``step``, which the run
    did not write on its way there. With ``chosen`` None, every file."""
    tried = candidates(out_dir)
    tried = tried[:tried.index(chosen)] if chosen in tried else tried
    return [p for p in checkpoints(out_dir)
            if chosen is None or int(PATTERN.match(p.name).group(1)) > step
            or any(os.path.samefile(p, t) for t in tried)]


def _payload(data: bytes, path: Path) -> memoryview | None:
    """The bytes ``torch.save`` wrote, after checking the digest trailer; None without a trailer."""
    cut = len(data) - DIGEST_SIZE - len(DIGEST_MAGIC)
    if cut < 0 or data[cut:cut + len(DIGEST_MAGIC)] != DIGEST_MAGIC:
        return None
    payload = memoryview(data)[:cut]
    if hashlib.sha256(payload).digest() != data[-DIGEST_SIZE:]:
        raise CheckpointError(f"checkpoint {path} does not match its digest (corrupted on disk)")
    return payload


def load(path: str | Path, map_location: str | torch.device = "cpu", required: Iterable[str] = ()) -> dict:
    """Verify the digest, unpickle with ``weights_only=True``, check the ``required`` keys.

    Raises:
        CheckpointError: naming the file and why it cannot be used (unreadable, digest mismatch,
            truncated, not a checkpoint, objects other than tensors and plain containers, missing keys).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e.strerror or e}") from e
    payload = _payload(data, path)
    try:
        state = torch.load(io.BytesIO(data if payload is None else payload), map_location=map_location,
                           weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or a pickle that would run code
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is refused or unreadable: {reason}") from e
    if payload is None:  # written before checkpoints carried digests
        warn(f"checkpoint {path} has no digest: loaded without verifying it")
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(map(repr, missing))}")
    return state


def candidates(out_dir: str | Path) -> list[Path]:
    """``last.pt``, then the ``ckpt_*.pt`` files it is not a link of, newest first."""
    out = Path(out_dir)
    found = [out / "last.pt"] if (out / "last.pt").exists() else []
    for p in reversed(checkpoints(out)):
        if not any(os.path.samefile(c, p) for c in found):
            found.append(p)
    return found


def load_latest(out_dir: str | Path, map_location: str | torch.device = "cpu", required: Iterable[str] = (),
                fits: Callable[[dict], str | None] | None = None) -> tuple[dict | None, Path | None]:
    """The newest usable checkpoint in ``out_dir``, trying :func:`candidates` in order.

    ``fits(state)``: None when the caller can use ``state``, else why not (its weights do not fit
    the caller's model, say); such a file is skipped like an unreadable one.
    Each file that cannot be used is reported with a warning naming it and why.
    Returns (None, None) when the folder holds no checkpoint at all.

    Raises:
        CheckpointError: there are checkpoints and none of them is usable.
    """
    tried = candidates(out_dir)
    for p in tried:
        try:
            state = load(p, map_location, required)
            if fits is not None and (reason := fits(state)) is not None:
                raise CheckpointError(f"checkpoint {p} does not fit this run: {reason}")
            return state, p
        except CheckpointError as e:
            warn(f"{e}; trying the previous one")
    if tried:
        raise CheckpointError(f"no usable checkpoint in {out_dir} ({len(tried)} tried, see the warnings above); "
                              "--fresh starts over there, moving its contents into old-<n>/")
    return None, None


# ----------------------------------------------------------------------------- the run folder


def lock_folder(out_dir: str | Path, lock_name: str = ".lock", holder: str = "trainer") -> IO:
    """Create ``out_dir`` if needed and take its advisory lock (``out_dir/lock_name``); close the
    returned file to release it. ``holder`` names the kind of process that owns such a folder.

    Raises:
        ConfigError: another process holds the lock, or the folder cannot be written.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / lock_name, "a+")
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from e
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"--out {out} is in use by another {holder} (it holds {out / lock_name}); "
                          "wait for it to finish or choose another --out") from None
    return f


def remove_temp_files(out_dir: str | Path) -> list[Path]:
    """Delete the temp files of saves that were interrupted (call with the folder's lock held)."""
    stale = [p for p in Path(out_dir).iterdir() if TEMP.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def set_aside(out_dir: str | Path) -> Path | None:
    """Move everything in ``out_dir`` (but its lock and earlier set-aside folders) into
    ``out_dir/old-<n>/`` for a fresh start that destroys nothing. Returns that folder, if any."""
    out = Path(out_dir)
    items = [p for p in out.iterdir() if p.name != ".lock" and not p.name.startswith("old-")]
    if not items:
        return None
    n = 1 + max((int(p.name[4:]) for p in out.glob("old-*") if p.name[4:].isdigit()), default=0)
    dest = out / f"old-{n}"
    dest.mkdir()
    for p in items:
        p.rename(dest / p.name)
    return dest
