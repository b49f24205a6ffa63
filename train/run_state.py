"""What a pre-training run holds, in two parts: the :class:`Learner`, everything one optimizer step
(``train.pretrain.train_step``) updates, and the :class:`Run` around it, what the loop tracks (the
configuration, data, diagnostics, and the position and running sums that travel in the checkpoint);
and the loop's helpers on them (the autocast dtype, the diagnostics files, the replica check)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fastpred

from . import data, monitor
from .config import Config
from .metrics_log import MetricsLog
from .model import BYOL
from .utils import DistInfo, gather_objects, log, warn


@dataclass
class EpochSums:
    """This rank's running sums over the current epoch, for its mean losses."""

    loss: float = 0.0
    steps: int = 0
    probe_loss: float = 0.0
    probe_steps: int = 0

    def add(self, loss: float, probe_loss: float | None) -> None:
        self.loss += loss
        self.steps += 1
        if probe_loss is not None:
            self.probe_loss += probe_loss
            self.probe_steps += 1


@dataclass(kw_only=True)
class Learner:
    """What one optimizer step updates (``train.pretrain.train_step``). Made once per run, at setup,
    where a DirectPred predictor is attached to the optimizer: each optimizer step is one DirectPred
    step (F's update and W_p's rebuild when due), whatever the number of forward calls in it."""

    bare: BYOL  # the network before any DDP wrap: saved, evaluated, EMA-updated
    model: nn.Module  # what the step calls (DDP(bare) under torchrun)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None  # autocast dtype, None for float32
    probe: nn.Module | None = None  # online linear probe on detached features
    probe_opt: torch.optim.Optimizer | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bare.predictor, fastpred.DirectPredictor):
            self.bare.predictor.attach(self.optimizer)


@dataclass(kw_only=True)
class Run:
    """What the loop holds around the :class:`Learner`: the configuration, data, diagnostics and the
    position; ``step``...``last_eval`` travel in the checkpoint."""

    cfg: Config
    info: DistInfo
    out: Path
    learner: Learner  # what train_step updates
    sampler: data.ResumableSampler
    train_loader: Any
    bank_loader: Any
    test_loader: Any
    num_classes: int
    total_steps: int
    diag: monitor.Diagnostics
    diag_corr: torch.Tensor | None  # F̂ for predictors that keep none (linear, mlp, none)
    mlog: MetricsLog | None = None
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of `epoch` already trained
    skipped: int = 0  # unreadable images met by this rank
    # per-step losses not yet logged and the epoch's running sums (per rank), checkpointed and always
    # summed in step order, so a resumed run logs exactly what an uninterrupted one does
    pending: list = field(default_factory=list)  # [(loss, probe loss or None)] since the last log line
    sums: EpochSums = field(default_factory=EpochSums)
    last_eval: dict = field(default_factory=dict)
    saved_at: tuple = ()
    foreign: tuple[Path, ...] = ()  # checkpoints not the run's own: retention neither counts nor deletes them


def bare_module(m: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (itself when not wrapped)."""
    return m.module if isinstance(m, DDP) else m


def host_losses(pending: list, device: torch.device) -> list[tuple[float, float | None]]:
    """The pending (loss, probe loss or None) pairs as Python floats, with one device-to-host copy.

    An entry is a device tensor, or already a float when it came back from a checkpoint."""
    if not pending:
        return []
    flat = [v for pair in pending for v in pair if v is not None]
    values = torch.stack([v.double() if isinstance(v, torch.Tensor)
                          else torch.tensor(v, dtype=torch.float64, device=device) for v in flat]).tolist()
    out, i = [], 0
    for _, probe_loss in pending:
        if probe_loss is None:
            out.append((values[i], None))
            i += 1
        else:
            out.append((values[i], values[i + 1]))
            i += 2
    return out


# ----------------------------------------------------------------------------- the loop's helpers


AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    if cfg.amp not in AMP:
        raise ValueError(f"amp={cfg.amp!r}: expected none, bf16 or fp16")
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device (use bf16 on CPU)")
    return AMP[cfg.amp]


def own_corr(predictor: nn.Module) -> torch.Tensor | None:
    """The predictor's own single F̂ (d x d), if it keeps one."""
    corr = getattr(predictor, "corr", None)
    return corr if isinstance(predictor, fastpred.DirectPredictor) and corr.ndim == 2 else None


def write_plots(run: Run) -> None:
    """``diagnostics.json`` and ``diagnostics.png``, each written whole or not at all (temp file, rename).

    Raises:
        OSError: naming the file that could not be written (a full disk, a file size limit).
    """
    if not run.info.is_main:
        return
    cfg = run.cfg
    title = f"{cfg.data.name} {cfg.model.arch} predictor={cfg.predictor.name} loss={cfg.loss.name} ({cfg.loss.form})"
    for name, write in (("diagnostics.json", run.diag.to_json),
                        ("diagnostics.png", lambda p: run.diag.plot(p, cfg.monitor.collapse_erank, title))):
        path = run.out / name
        tmp = path.with_name(f".tmp-{name}")  # the suffix tells matplotlib the format
        try:
            write(tmp)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e


def check_replicas(run: Run) -> None:
    """Under DDP every rank must end with the same parameters and predictor state (F̂, W_p)."""
    if not run.info.distributed:
        return
    with torch.no_grad():
        sums = [float(p.double().sum()) for p in run.learner.bare.parameters()]
        sums += [float(b.double().sum()) for b in run.learner.bare.predictor.buffers()]
    every = gather_objects(sums)
    if any(s != every[0] for s in every[1:]):
        warn("ranks ended with different weights or predictor state")
    else:
        log(f"replicas consistent across {run.info.world_size} ranks")
