"""What a pre-training run holds, in two parts: the :class:`Learner`, everything one optimizer step
(``train.pretrain.train_step``) updates, and the :class:`Run` around it, what the loop tracks (the
configuration, data, diagnostics, and the position and running sums that travel in the checkpoint)."""

from __future__ import annotations

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
from .utils import DistInfo


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
