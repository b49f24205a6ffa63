"""BYOL / DirectPred pre-training.

    python -m train.pretrain [--config PRESET_OR_YAML] [--out DIR] [--fresh] [--print-config] [key=value ...]
    torchrun --nproc_per_node=G -m train.pretrain --config imagenet_r50_300ep data.root=/imagenet

Every value is checked before anything runs. Re-running with the same ``--out`` resumes from the
newest usable checkpoint there (each one carries a digest verified on load; a bad one is reported
and the previous one tried; when none is usable the run stops unless ``--fresh`` is given). One
trainer at a time owns a folder (a lock on ``DIR/.lock``). SIGTERM or SIGUSR1 saves a checkpoint
after the current step and exits with status 0. On CPU a resumed run ends bit-identical to an
uninterrupted one: augmentations are seeded per sample from (seed, epoch, index) and the sampler
restarts inside the epoch where the run stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import fastpred.functional

from . import checkpoint, data, monitor
from .augment import eval_transform, two_view_transforms
from .batch_augment import BatchAugment
from .config import (Config, ConfigError, diff, from_saved, key_summary, load_config, presets, save_yaml, to_dict,
                     to_yaml, validate)
from .model import BYOL, build_model, predictor_matrix
from .optim import build_optimizer, build_scheduler, ema_tau
from .utils import (DistInfo, MetricsLog, Preemption, Timer, all_reduce_sum, cleanup_distributed,
                    gather_objects, init_distributed, log, rng_state, seed_all, set_rng_state, warn)

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    if cfg.amp not in AMP:
        raise ValueError(f"amp={cfg.amp!r}: expected none, bf16 or fp16")
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device (use bf16 on CPU)")
    return AMP[cfg.amp]


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
    """What one optimizer step updates (:func:`train_step`)."""

    bare: BYOL  # the network before any DDP wrap: saved, evaluated, EMA-updated
    model: nn.Module  # what the step calls (DDP(bare) under torchrun)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None  # autocast dtype, None for float32
    probe: nn.Module | None = None  # online linear probe on detached features
    probe_opt: torch.optim.Optimizer | None = None


@dataclass(kw_only=True)
class Run(Learner):
    """Everything one pre-training run holds; ``step``...``last_eval`` travel in the checkpoint."""

    cfg: Config
    info: DistInfo
    out: Path
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


# ----------------------------------------------------------------------------- helpers


def _bare(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, DDP) else m


def own_corr(predictor: nn.Module) -> torch.Tensor | None:
    """The predictor's own single F̂ (d x d), if it keeps one."""
    corr = getattr(predictor, "corr", None)
    return corr if isinstance(predictor, fastpred.DirectPredictor) and corr.ndim == 2 else None


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


def write_plots(run: Run) -> None:
    if not run.info.is_main:
        return
    cfg = run.cfg
    run.diag.to_json(run.out / "diagnostics.json")
    run.diag.plot(run.out / "diagnostics.png", cfg.monitor.collapse_erank,
                  f"{cfg.data.name} {cfg.model.arch} predictor={cfg.predictor.name}")


def check_replicas(run: Run) -> None:
    """Under DDP every rank must end with the same parameters and predictor state (F̂, W_p)."""
    if not run.info.distributed:
        return
    with torch.no_grad():
        sums = [float(p.double().sum()) for p in run.bare.parameters()]
        sums += [float(b.double().sum()) for b in run.bare.predictor.buffers()]
    every = gather_objects(sums)
    if any(s != every[0] for s in every[1:]):
        warn("ranks ended with different weights or predictor state")
    else:
        log(f"replicas consistent across {run.info.world_size} ranks")


# ----------------------------------------------------------------------------- training and evaluation


def train_step(learner: Learner, v1: torch.Tensor, v2: torch.Tensor, labels: torch.Tensor | None, tau: float):
    """One optimizer step: forward both views, backward, step, LR schedule, target EMA update.

    ``labels`` (-1 for unlabeled images) train the probe, if there is one.
    Returns (loss, probe loss or None, the projector outputs the predictor saw), all detached.
    """
    with torch.autocast(v1.device.type, dtype=learner.dtype or torch.float32, enabled=learner.dtype is not None):
        loss, h1, z = learner.model(v1, v2)
    total, probe_loss = loss, None
    if learner.probe is not None:  # labels -1 are ignored; no host sync for the count
        n = (labels >= 0).sum().clamp_min(1)
        logits = learner.probe(h1.float())
        probe_loss = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / n
        total = total + probe_loss
    learner.optimizer.zero_grad(set_to_none=True)
    if learner.probe_opt is not None:
        learner.probe_opt.zero_grad(set_to_none=True)
    learner.scaler.scale(total).backward()
    learner.scaler.step(learner.optimizer)
    if learner.probe_opt is not None:
        learner.scaler.step(learner.probe_opt)
    learner.scaler.update()
    learner.scheduler.step()
    learner.bare.update_target(tau)
    return loss.detach(), None if probe_loss is None else probe_loss.detach(), z


def train_one_epoch(run: Run, preempt: Preemption) -> bool:
    """Train ``run.epoch`` from batch ``run.batch``. Returns True when stopped by a signal
    (after writing the checkpoint)."""
    cfg, info = run.cfg, run.info
    run.model.train()
    n_batches = run.sampler.batches_per_epoch()
    if run.batch == 0:
        run.sums = EpochSums()
    t_log = time.perf_counter()
    bar = tqdm(run.train_loader, total=n_batches - run.batch, disable=not info.is_main, leave=False,
               desc=f"epoch {run.epoch + 1}/{cfg.epochs}", mininterval=1.0, dynamic_ncols=True)
    for v1, v2, labels, skipped in bar:
        v1, v2, labels = (t.to(info.device, non_blocking=True) for t in (v1, v2, labels))
        if cfg.model.channels_last:
            v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
        tau = ema_tau(run.step, run.total_steps, cfg.model.ema_tau, cfg.model.ema_schedule)
        lr = run.optimizer.param_groups[0]["lr"]
        loss, probe_loss, z = train_step(run, v1, v2, labels, tau)
        if run.diag_corr is not None:
            fastpred.functional.corr_ema_(run.diag_corr, z.float(), cfg.predictor.rho, first=run.step == 0)
        run.step += 1
        run.batch += 1
        run.skipped += int(skipped.sum())
        run.pending.append((loss, probe_loss))  # device tensors: no host sync until the log line
        if run.step % cfg.log_every == 0 or run.batch == n_batches:
            losses = host_losses(run.pending, info.device)
            avg = sum(l for l, _ in losses) / len(losses)
            if not math.isfinite(avg):
                raise FloatingPointError(f"loss is {avg} at step {run.step}: training diverged")
            for l, p in losses:  # in step order, whatever interruptions happened in between
                run.sums.add(l, p)
            dt = time.perf_counter() - t_log
            run.mlog.write({"step": run.step, "epoch": run.epoch + run.batch / n_batches, "loss": avg, "lr": lr,
                            "tau": tau, "images_per_s": len(losses) * cfg.batch_size / max(dt, 1e-9)})
            bar.set_postfix(loss=f"{avg:.3f}", lr=f"{lr:.3g}")
            run.pending = []
            t_log = time.perf_counter()
        if cfg.ckpt.every_steps and run.step % cfg.ckpt.every_steps == 0:
            save_checkpoint(run)
        if preempt.requested():
            bar.close()
            save_checkpoint(run)
            return True
    bar.close()
    return False


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """kNN top-1 (%) of the backbone features, online-probe top-1 (%) on the test set, effective rank."""
    cfg, info, backbone = run.cfg, run.info, run.bare.backbone
    cl = cfg.model.channels_last
    train_f, train_y = monitor.extract_features(backbone, run.bank_loader, info.device, run.dtype, cl)
    res = {}
    if run.test_loader is not None:  # None: unlabeled data, nothing to vote with
        test_f, test_y = monitor.extract_features(backbone, run.test_loader, info.device, run.dtype, cl)
        res["knn_top1"] = monitor.knn_top1(train_f, train_y, test_f, test_y, cfg.monitor.knn_k, cfg.monitor.knn_t,
                                           run.num_classes)
    res["erank"] = monitor.effective_rank(train_f)
    if run.probe is not None:
        res["probe_top1"] = 100.0 * float((_bare(run.probe)(test_f).argmax(1) == test_y).float().mean())
    return res


def end_of_epoch(run: Run, timer: Timer) -> None:
    """Evaluate (when due), record diagnostics, log one line, checkpoint."""
    cfg, info = run.cfg, run.info
    res = {}
    if (run.epoch + 1) % cfg.monitor.knn_every == 0 or run.epoch + 1 == cfg.epochs:
        res = evaluate(run)
        run.last_eval = res
    corr = own_corr(run.bare.predictor)
    corr = run.diag_corr if corr is None else corr
    run.diag.record(run.epoch + 1, corr, predictor_matrix(run.bare.predictor), res.get("erank", math.nan))
    monitor.write_tensorboard(run.mlog.tb, run.step, run.diag, run.bare.predictor)
    s = run.sums
    skipped, loss_sum, n, probe_sum, n_probe = all_reduce_sum(
        [run.skipped, s.loss, s.steps, s.probe_loss, s.probe_steps], info.device)
    skipped = int(skipped)
    epoch_loss = loss_sum / max(n, 1)
    rec = {"step": run.step, "epoch": run.epoch + 1, "loss": epoch_loss, **res, "skipped_images": skipped,
           "epoch_time": timer()}
    if run.probe is not None:
        rec["probe_loss"] = probe_sum / max(n_probe, 1)
    run.mlog.write(rec)
    log(f"epoch {run.epoch + 1}/{cfg.epochs}  step {run.step}  loss {epoch_loss:.4f}"
        + (f"  knn {res['knn_top1']:.2f}%" if "knn_top1" in res else "")
        + (f"  probe {res['probe_top1']:.2f}%" if "probe_top1" in res else "")
        + (f"  erank {res['erank']:.1f}" if "erank" in res else "")
        + f"  lr {run.optimizer.param_groups[0]['lr']:.4g}  {timer():.1f}s"
        + (f"  skipped images {skipped}" if skipped else ""))
    if res and (msg := monitor.collapse_message(res["erank"], cfg.monitor.collapse_erank)):
        warn(msg)
    run.epoch, run.batch = run.epoch + 1, 0
    save_checkpoint(run)


# ----------------------------------------------------------------------------- setup, checkpoints, fit


def load_data(cfg: Config, info: DistInfo):
    """Two-view pre-training loader on a resumable sampler, and the kNN bank / test loaders."""
    spec = data.spec(cfg.data)
    pre = data.raw_dataset(cfg.data, "pretrain")
    bank, test, n_classes = data.monitor_datasets(cfg)
    local_batch = cfg.batch_size // info.world_size
    size = cfg.data.image_size
    views = data.Views(pre, two_view_transforms(cfg.aug, size, spec.mean, spec.std), seed=cfg.seed)
    sampler = data.ResumableSampler(views, local_batch, info.world_size, info.rank, cfg.seed)
    if sampler.batches_per_epoch() == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {len(pre)} pre-training images")
    pin = info.device.type == "cuda"
    if cfg.aug.batched and data.in_memory(pre):
        augment = BatchAugment(cfg.aug, size, spec.mean, spec.std, cfg.seed)
        train_loader = data.BatchedViews(pre, sampler, local_batch, augment, info.device)
    else:
        train_loader = data.loader(views, local_batch, cfg.data.workers, sampler, drop_last=True, pin_memory=pin)
    ev = eval_transform(size, round(size * spec.resize_ratio), spec.mean, spec.std, cfg.aug.normalize)
    eval_loaders = []
    for ds in (bank, test):
        if ds is None:  # no labelled test set
            eval_loaders.append(None)
            continue
        v = data.Views(ds, [ev])
        s = DistributedSampler(v, info.world_size, info.rank, shuffle=False) if info.distributed else None
        eval_loaders.append(data.loader(v, max(local_batch, 64), cfg.data.workers, s, pin_memory=pin))
    return train_loader, sampler, eval_loaders[0], eval_loaders[1], n_classes, spec.channels


def setup(cfg: Config, out: Path, info: DistInfo) -> Run:
    """Data, model, optimizer and schedules. Writes nothing.

    Raises ConfigError naming the key or path for every user mistake found here."""
    try:
        data.check_data(cfg.data)  # a wrong path fails before anything heavy
        if cfg.batch_size % info.world_size:
            raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {info.world_size} processes")
        dtype = amp_dtype(cfg, info.device)
        seed_all(cfg.seed + info.rank)  # per-rank streams; the model is initialised from cfg.seed alone
        train_loader, sampler, bank_loader, test_loader, n_classes, channels = load_data(cfg, info)
        bare = build_model(cfg, channels, cfg.seed).to(info.device)
        if cfg.model.channels_last:
            bare = bare.to(memory_format=torch.channels_last)
        if info.distributed and cfg.model.sync_bn:
            if info.device.type == "cuda":
                bare = nn.SyncBatchNorm.convert_sync_batchnorm(bare)
            else:
                warn("model.sync_bn=true is ignored on CPU (SyncBatchNorm needs GPUs): per-process BatchNorm")
        steps_per_epoch = sampler.batches_per_epoch()
        total_steps = cfg.epochs * steps_per_epoch
        optimizer = build_optimizer(cfg.optim, bare, cfg.batch_size)
        scheduler = build_scheduler(cfg.optim, optimizer, total_steps, steps_per_epoch)
        ema_tau(0, total_steps, cfg.model.ema_tau, cfg.model.ema_schedule)  # validates the schedule name
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.amp == "fp16")
    probe = probe_opt = None
    if cfg.monitor.probe and not data.unlabeled(cfg.data):
        probe = nn.Linear(bare.feat_dim, n_classes).to(info.device)
        probe_opt = torch.optim.SGD(probe.parameters(), lr=cfg.monitor.probe_lr, momentum=0.9)
    diag_corr = None  # a single-F̂ DirectPredictor keeps its own (predictor.corr)
    if own_corr(bare.predictor) is None:
        diag_corr = torch.zeros(cfg.model.proj_dim, cfg.model.proj_dim, device=info.device)
    return Run(cfg=cfg, info=info, out=out, bare=bare, model=bare, optimizer=optimizer, scheduler=scheduler,
               scaler=scaler, probe=probe, probe_opt=probe_opt, sampler=sampler, train_loader=train_loader,
               bank_loader=bank_loader, test_loader=test_loader, num_classes=n_classes, dtype=dtype,
               total_steps=total_steps, diag=monitor.Diagnostics(), diag_corr=diag_corr)


STATE_KEYS = ("config", "step", "epoch", "batch", "world_size", "per_rank", "last_eval", "model", "optimizer",
              "scheduler", "scaler", "probe", "probe_optimizer", "diag_corr", "diagnostics", "metrics_lines")


def save_checkpoint(run: Run) -> None:
    """Everything needed to continue exactly. Collective (gathers every rank's RNG state and
    skip count); rank 0 writes."""
    run.pending = host_losses(run.pending, run.info.device)  # floats: weights_only-safe
    per_rank = gather_objects({"rng": rng_state(), "skipped": run.skipped, "pending": run.pending,
                               "epoch_sums": dataclasses.asdict(run.sums)})
    if not run.info.is_main or run.saved_at == (run.step, run.epoch, run.batch):
        return
    state = {
        "config": to_dict(run.cfg), "step": run.step, "epoch": run.epoch, "batch": run.batch,
        "world_size": run.info.world_size, "per_rank": per_rank, "last_eval": run.last_eval,
        "model": run.bare.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
        "probe": _bare(run.probe).state_dict() if run.probe is not None else None,
        "probe_optimizer": run.probe_opt.state_dict() if run.probe_opt is not None else None,
        "diag_corr": run.diag_corr, "diagnostics": run.diag.state_dict(), "metrics_lines": run.mlog.lines,
    }
    checkpoint.save(state, run.out, run.step, run.cfg.ckpt.keep)
    run.saved_at = (run.step, run.epoch, run.batch)


def claim_folder(run: Run, fresh: bool) -> tuple[IO | None, dict | None, Path | None]:
    """Rank 0 locks ``run.out``, removes temp files of interrupted saves, sets the folder's contents
    aside when ``fresh``, and picks the newest usable checkpoint; every rank loads that same one.

    Returns (the lock on rank 0, else None; the checkpoint's state or None; its path).
    Raises ConfigError on every rank when rank 0 found a problem (folder in use, none usable).
    """
    lock = state = path = error = None
    if run.info.is_main:
        try:
            lock, state, path = _claim_on_main(run.out, fresh)
        except ConfigError as e:
            if not run.info.distributed:
                raise
            error = str(e)
    error, path = gather_objects((error, path))[0]
    if error is not None:
        raise ConfigError(error)
    if path is not None and state is None:  # the other ranks load what rank 0 chose
        state = checkpoint.load(path, required=STATE_KEYS)
    return lock, state, path


def _claim_on_main(out: Path, fresh: bool) -> tuple[IO, dict | None, Path | None]:
    lock = checkpoint.lock_folder(out)
    try:
        for p in checkpoint.remove_temp_files(out):
            log(f"removed {p.name}, left by an interrupted checkpoint save")
        if fresh and (old := checkpoint.set_aside(out)):
            log(f"--fresh: the earlier contents of {out} are now in {old}")
        state, path = checkpoint.load_latest(out, required=STATE_KEYS)
    except BaseException:
        lock.close()
        raise
    return lock, state, path


def config_changes(state: dict, cfg: Config) -> list[str]:
    """The configuration keys whose values in ``cfg`` differ from the checkpoint's."""
    try:
        return diff(from_saved(state["config"]), cfg)
    except ValueError as e:  # written by a version with other keys
        return [f"(saved configuration not comparable: {e})"]


def restore(run: Run, state: dict, path: Path) -> list[str]:
    """Continue from a checkpoint: weights, predictor state, optimizer, schedules, position, RNG.

    Returns the configuration keys whose values differ from the checkpoint's."""
    changed = config_changes(state, run.cfg)
    if changed:  # the command line decides; said first, in case the weights no longer fit
        warn(f"resuming {path} with a different configuration for: {', '.join(changed)}")
    run.bare.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    if run.probe is not None and state["probe"] is not None:
        _bare(run.probe).load_state_dict(state["probe"])
        run.probe_opt.load_state_dict(state["probe_optimizer"])
    if run.diag_corr is not None and state["diag_corr"] is not None:
        run.diag_corr.copy_(state["diag_corr"])
    run.diag.load_state_dict(state["diagnostics"])
    if state["world_size"] != run.info.world_size:
        warn(f"{path} was written by {state['world_size']} processes, now {run.info.world_size}: "
             "the order inside the interrupted epoch and the RNG streams will differ")
    mine = state["per_rank"][run.info.rank % len(state["per_rank"])]
    set_rng_state(mine["rng"])
    sums = mine["epoch_sums"]  # a list in checkpoints written before EpochSums
    run.sums = EpochSums(*sums) if isinstance(sums, list) else EpochSums(**sums)
    run.skipped, run.pending = mine["skipped"], [tuple(p) for p in mine["pending"]]
    run.step, run.epoch, run.batch, run.last_eval = state["step"], state["epoch"], state["batch"], state["last_eval"]
    log(f"resumed from {path}: step {run.step}, epoch {run.epoch + 1}, batch {run.batch}")
    return changed


def start(run: Run, state: dict | None, path: Path | None) -> None:
    """Restore ``state`` if any, open the metrics log, record the configuration, wrap in DDP.

    ``config.yaml`` is written once, when the run starts (or from the checkpoint, when missing),
    and never rewritten: a resume with values other than the checkpoint's saves them beside it as
    ``config_from_step_<step>.yaml``."""
    changed = restore(run, state, path) if state is not None else []
    run.mlog = MetricsLog(run.out, run.info.is_main, keep_lines=state["metrics_lines"] if state else 0,
                          purge_step=run.step)
    if run.info.is_main:
        if not (run.out / "config.yaml").exists():
            save_yaml(state["config"] if state is not None else run.cfg, run.out / "config.yaml")
        if changed:
            beside = run.out / f"config_from_step_{run.step}.yaml"
            save_yaml(run.cfg, beside)
            log(f"config.yaml keeps the configuration of the checkpoint; this run's is in {beside.name}")
    if run.info.distributed:  # wrap after restoring; DDP broadcasts rank 0's weights
        ids = [run.info.device.index] if run.info.device.type == "cuda" else None
        run.model = DDP(run.bare, device_ids=ids)
        if run.probe is not None:
            run.probe = DDP(run.probe, device_ids=ids)


def fit(run: Run) -> dict:
    """Train to ``cfg.epochs`` (or a signal), evaluating every ``monitor.knn_every`` epochs.
    Returns the last evaluation."""
    cfg, info = run.cfg, run.info
    n_params = sum(p.numel() for p in run.bare.parameters() if p.requires_grad)
    log(f"pre-training {cfg.model.arch} + {cfg.predictor.name} predictor on {cfg.data.name}: "
        f"{len(run.sampler.dataset)} images, {run.sampler.batches_per_epoch()} steps/epoch x {cfg.epochs} epochs, "
        f"global batch {cfg.batch_size} on {info.world_size} x {info.device.type}, "
        f"{n_params / 1e6:.2f}M trainable parameters -> {run.out}")
    preempt = Preemption(info.device)
    try:
        while run.epoch < cfg.epochs:
            timer = Timer()
            run.sampler.set_epoch(run.epoch, run.batch)
            if train_one_epoch(run, preempt):
                write_plots(run)
                log(f"stopped by signal at step {run.step}; checkpoint saved in {run.out}: "
                    "re-run the same command to resume")
                return run.last_eval
            end_of_epoch(run, timer)  # writes the epoch's checkpoint
            if run.epoch < cfg.epochs and preempt.requested():  # the signal came during evaluation
                write_plots(run)
                log(f"stopped by signal after epoch {run.epoch}; checkpoint saved in {run.out}")
                return run.last_eval
    finally:
        preempt.restore()
    skipped = int(all_reduce_sum([run.skipped], info.device)[0])
    run.mlog.write({"final": True, "step": run.step, "epoch": cfg.epochs, **run.last_eval, "skipped_images": skipped})
    run.mlog.close()
    write_plots(run)
    check_replicas(run)
    log("final: " + "  ".join(f"{k} {v:.2f}" for k, v in run.last_eval.items()))
    return run.last_eval


def main(cfg: Config, out_dir: str | Path, fresh: bool = False) -> dict:
    """Pre-train (or resume) into ``out_dir``; returns the final evaluation.

    ``fresh``: start over even where ``out_dir`` holds checkpoints (its contents are moved into
    ``out_dir/old-<n>/``, nothing is deleted).

    Raises:
        ConfigError: a value out of range, ``device=cuda`` without a GPU, data not found, the folder
            in use by another trainer or not writable, no usable checkpoint (all before anything is
            written), or a checkpoint that cannot be written (the previous ones intact).
    """
    try:
        validate(cfg)
        info = init_distributed(cfg.device)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    try:
        run = setup(cfg, Path(out_dir), info)
        lock, state, path = claim_folder(run, fresh)
        try:
            if state is not None and state["epoch"] >= cfg.epochs and state["batch"] == 0:
                changed = config_changes(state, cfg)
                log(f"{path} finished its {state['epoch']} epochs (step {state['step']}): nothing to train, "
                    "nothing written" + (f" (ignored: new values for {', '.join(changed)})" if changed else ""))
                return state["last_eval"]
            start(run, state, path)
            return fit(run)
        finally:
            if lock is not None:
                lock.close()
    finally:
        cleanup_distributed()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="BYOL / DirectPred pre-training",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets: {', '.join(presets())} (train/configs/)\n\n"
               f"configuration keys (set any as key=value; --print-config shows every value):\n{key_summary()}")
    p.add_argument("--config", default=None, help="preset name in train/configs/ or a YAML file (default: digits)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<preset>); the same folder resumes")
    p.add_argument("--fresh", action="store_true",
                   help="start over even if --out holds checkpoints (its contents move to --out/old-<n>/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration (YAML) and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.1")
    return p


def cli(argv: list[str] | None = None) -> None:
    """The command line: one ``error: ...`` line and exit status 1 for every user mistake."""
    args = get_args_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return
        main(cfg, args.out or str(Path("runs") / Path(args.config or "digits").stem), fresh=args.fresh)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # the run folder's disk: full or read-only
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
