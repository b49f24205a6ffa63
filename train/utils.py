"""Helpers written once for every script: distributed set-up, rank-0 logging, meters,
RNG state and preemption signals (torchvision references' ``utils.py`` role). The metrics log is
:mod:`train.metrics_log`."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, NoReturn, TextIO

import numpy as np
import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set), else single process.

    ``device``: ``auto`` picks CUDA when available. CUDA uses NCCL, CPU uses gloo.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected auto, cpu or cuda")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device=cuda: no CUDA device is available (use device=auto or device=cpu)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum plain numbers over ranks (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- logging


def write_line(text: str, stream: TextIO) -> None:
    """``text`` and its newline in one write, so that the lines of processes sharing a terminal or
    pipe never run together: torchrun starts its ranks with ``python -u``, where ``print`` (and the
    interpreter's report of ``sys.exit("...")``) write the text and the newline separately.
    A stream without a file descriptor (a test's capture) gets one ``write`` call instead."""
    data = text + "\n"
    stream.flush()  # what is buffered comes first
    try:
        fd = stream.fileno()
    except (AttributeError, io.UnsupportedOperation):
        stream.write(data)
        stream.flush()
        return
    raw = data.encode(getattr(stream, "encoding", None) or "utf-8", errors="backslashreplace")
    while raw:  # one write unless the line is longer than the pipe's buffer
        raw = raw[os.write(fd, raw):]


def log(msg: str, rank: int | None = None) -> None:
    """Print on rank 0 only (or everywhere when ``rank`` is given), one whole line."""
    r = rank if rank is not None else (dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
    if rank is not None or r == 0:
        write_line(msg if rank is None else f"[rank {r}] {msg}", sys.stdout)


def warn(msg: str) -> None:
    """``WARNING: msg`` on stderr, one whole line."""
    write_line(f"WARNING: {msg}", sys.stderr)


def exit_with_error(msg: str, report: bool = True) -> NoReturn:
    """End the process with status 1 after the one line ``error: msg`` on stderr.

    ``report=False``: end it silently, where another process reports the same line (the ranks of
    one torchrun job given different settings all stop; rank 0 alone says why)."""
    if report:
        write_line(f"error: {msg}", sys.stderr)
    raise SystemExit(1)


# ----------------------------------------------------------------------------- RNG


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as ``weights_only``-loadable objects."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a one-element list when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def differences_across_ranks(values: dict[str, Any]) -> list[str]:
    """The keys of ``values`` (a flat dict of plain values) that differ between ranks, each as
    ``key (rank 0: a, rank 1: b)``; empty when they agree or when not distributed.

    One all-gather of a digest; only when the digests differ are the values themselves gathered
    (every rank sees the same digests, so every rank takes part in that second collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return []
    digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=repr).encode()).hexdigest()
    if len(set(gather_objects(digest))) == 1:
        return []
    every = gather_objects(values)
    out = []
    for key in sorted(set().union(*every)):
        seen = [v.get(key) for v in every]
        if any(x != seen[0] for x in seen[1:]):
            out.append(f"{key} ({', '.join(f'rank {r}: {x!r}' for r, x in enumerate(seen))})")
    return out


# ----------------------------------------------------------------------------- preemption


class Preemption:
    """SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) set a flag; the loop checks it after each step, saves and exits.

    A second SIGINT interrupts at once (KeyboardInterrupt), without saving: the way out of a step
    that never ends. ``requested()`` agrees over ranks (one tiny all-reduce), so every rank stops at
    the same step.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None),
                                signal.SIGINT) if s)

    def __init__(self, device: torch.device):
        self.flag = False
        self.device = device
        self.previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.flag:
                raise KeyboardInterrupt
            log("Ctrl-C: saving a checkpoint after this step (Ctrl-C again to stop without saving)")
        self.flag = True

    def requested(self) -> bool:
        if dist.is_available() and dist.is_initialized():
            return all_reduce_sum([float(self.flag)], self.device)[0] > 0
        return self.flag

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
