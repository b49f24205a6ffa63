"""BYOL / DirectPred pre-training.

    python -m train.pretrain [--config PRESET_OR_YAML] [--out DIR] [--fresh] [--print-config] [key=value ...]
    torchrun --nproc_per_node=G -m train.pretrain --config imagenet_r50_300ep data.root=/imagenet

Every value is checked before anything runs. Re-running with the same ``--out`` resumes from the
newest usable checkpoint there (each one carries a digest verified on load; a bad one is reported
and the previous one tried; when none is usable the run stops unless ``--fresh`` is given). One
trainer at a time owns a folder (a lock on ``DIR/.lock``). SIGTERM, SIGUSR1 or Ctrl-C saves a
checkpoint after the current step and exits with status 0. On CPU a resumed run ends bit-identical
to an uninterrupted one: augmentations are seeded per sample from (seed, epoch, index) and the
sampler restarts inside the epoch where the run stopped.

This file is the loop (``train_step``, ``train_one_epoch``, ``evaluate``, ``end_of_epoch``, ``fit``,
``main``); what a run holds is in :mod:`train.run_state`, starting and resuming in :mod:`train.resume`.
"""

from __future__ import annotations

import argparse
import errno
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import fastpred.backends
import fastpred.functional

from . import data, monitor
from .augment import eval_transform, two_view_transforms
from .batch_augment import BatchAugment
from .config import Config, ConfigError, SettingsDiffer, flat, key_summary, load_config, presets, to_yaml, validate
from .model import build_model, predictor_matrix
from .optim import build_optimizer, build_scheduler, ema_tau
from .resume import (Diverged, check_resumable, claim_folder, config_changes, diverged_message, finished_outputs,
                     save_checkpoint, start)
from .run_state import (EpochSums, Learner, Run, amp_dtype, bare_module, check_replicas, host_losses, own_corr,
                        write_plots)
from .utils import (DistInfo, Preemption, Timer, all_reduce_sum, cleanup_distributed, differences_across_ranks,
                    exit_with_error, gather_objects, init_distributed, log, seed_all, warn)

def check_backend(cfg: Config, device: torch.device) -> None:
    """Raise ``ValueError`` naming ``predictor.backend`` when DirectPred's backend cannot run on
    ``device`` (``triton`` or ``cupy`` on a CPU-only machine, say), instead of failing at the first step."""
    if cfg.predictor.name != "directpred":
        return
    try:
        fastpred.backends.resolve(cfg.predictor.backend, device)
    except RuntimeError as e:
        raise ValueError(f"predictor.backend={cfg.predictor.backend}: {e}") from None


# ----------------------------------------------------------------------------- helpers


class EveryRankError(ConfigError):
    """An error found by the ranks of a distributed run, gathered so that every rank raises the
    same message; ``rank`` says which one this is (rank 0 alone reports it)."""

    def __init__(self, msg: str, rank: int) -> None:
        super().__init__(msg)
        self.rank = rank


def gathered_error(error: str | None, rank: int) -> None:
    """Collective: raise :class:`EveryRankError` on every rank when any rank found ``error`` (one
    message when all ranks found the same, else each rank's, named)."""
    errors = gather_objects(error)
    found = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not found:
        return
    if len(found) == len(errors) and len({e for _, e in found}) == 1:
        raise EveryRankError(found[0][1], rank)
    raise EveryRankError("; ".join(f"rank {r}: {e}" for r, e in found), rank)


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
    run.learner.model.train()
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
        lr = run.learner.optimizer.param_groups[0]["lr"]
        loss, probe_loss, z = train_step(run.learner, v1, v2, labels, tau)
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
                raise Diverged(diverged_message(run, f"the loss is {avg} at step {run.step}"))
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
    cfg, info, backbone = run.cfg, run.info, run.learner.bare.backbone
    cl = cfg.model.channels_last
    train_f, train_y = monitor.extract_features(backbone, run.bank_loader, info.device, run.learner.dtype, cl)
    if all_reduce_sum([float(not bool(train_f.isfinite().all()))], info.device)[0]:  # every rank stops together
        raise Diverged(diverged_message(run, f"the backbone's features are not finite at step {run.step}"))
    res = {}
    if run.test_loader is not None:  # None: unlabeled data, nothing to vote with
        test_f, test_y = monitor.extract_features(backbone, run.test_loader, info.device, run.learner.dtype, cl)
        res["knn_top1"] = monitor.knn_top1(train_f, train_y, test_f, test_y, cfg.monitor.knn_k, cfg.monitor.knn_t,
                                           run.num_classes)
    res["erank"] = monitor.effective_rank(train_f)
    if run.learner.probe is not None:
        res["probe_top1"] = 100.0 * float((bare_module(run.learner.probe)(test_f).argmax(1) == test_y).float().mean())
    return res


def end_of_epoch(run: Run, timer: Timer) -> None:
    """Evaluate (when due), record diagnostics, log one line, checkpoint."""
    cfg, info = run.cfg, run.info
    res = {}
    if (run.epoch + 1) % cfg.monitor.knn_every == 0 or run.epoch + 1 == cfg.epochs:
        res = evaluate(run)
        run.last_eval = res
    corr = own_corr(run.learner.bare.predictor)
    corr = run.diag_corr if corr is None else corr
    run.diag.record(run.epoch + 1, corr, predictor_matrix(run.learner.bare.predictor), res.get("erank", math.nan))
    monitor.write_tensorboard(run.mlog.tb, run.step, run.diag, run.learner.bare.predictor)
    s = run.sums
    skipped, loss_sum, n, probe_sum, n_probe = all_reduce_sum(
        [run.skipped, s.loss, s.steps, s.probe_loss, s.probe_steps], info.device)
    skipped = int(skipped)
    epoch_loss = loss_sum / max(n, 1)
    rec = {"step": run.step, "epoch": run.epoch + 1, "loss": epoch_loss, **res, "skipped_images": skipped,
           "epoch_time": timer()}
    if run.learner.probe is not None:
        rec["probe_loss"] = probe_sum / max(n_probe, 1)
    run.mlog.write(rec)
    log(f"epoch {run.epoch + 1}/{cfg.epochs}  step {run.step}  loss {epoch_loss:.4f}"
        + (f"  knn {res['knn_top1']:.2f}%" if "knn_top1" in res else "")
        + (f"  probe {res['probe_top1']:.2f}%" if "probe_top1" in res else "")
        + (f"  erank {res['erank']:.1f}" if "erank" in res else "")
        + f"  lr {run.learner.optimizer.param_groups[0]['lr']:.4g}  {timer():.1f}s"
        + (f"  skipped images {skipped}" if skipped else ""))
    if res and (msg := monitor.collapse_message(res["erank"], cfg.monitor.collapse_erank)):
        warn(msg)
    run.epoch, run.batch = run.epoch + 1, 0
    save_checkpoint(run)


# ----------------------------------------------------------------------------- setup, fit, finish


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
        check_backend(cfg, info.device)
        if cfg.batch_size % info.world_size or cfg.batch_size < 2 * info.world_size:
            raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the {info.world_size} processes, "
                             "at least 2 per process (BatchNorm needs more than one image)")
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
    learner = Learner(bare=bare, model=bare, optimizer=optimizer, scheduler=scheduler, scaler=scaler, dtype=dtype,
                      probe=probe, probe_opt=probe_opt)  # attaches a DirectPredictor to the optimizer
    return Run(cfg=cfg, info=info, out=out, learner=learner, sampler=sampler, train_loader=train_loader,
               bank_loader=bank_loader, test_loader=test_loader, num_classes=n_classes, total_steps=total_steps,
               diag=monitor.Diagnostics(), diag_corr=diag_corr)


def fit(run: Run) -> dict:
    """Train to ``cfg.epochs`` (or a signal), evaluating every ``monitor.knn_every`` epochs.
    Returns the last evaluation."""
    cfg, info = run.cfg, run.info
    n_params = sum(p.numel() for p in run.learner.bare.parameters() if p.requires_grad)
    log(f"pre-training {cfg.model.arch} + {cfg.predictor.name} predictor, {cfg.loss.name} loss ({cfg.loss.form}) "
        f"on {cfg.data.name}: "
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
    return finish(run)


def finish(run: Run) -> dict:
    """The ``"final": true`` record, the plots, the replica check. Run again, from the last
    checkpoint, by a re-run whose predecessor was stopped after that checkpoint and before this
    was done. Returns the last evaluation."""
    skipped = int(all_reduce_sum([run.skipped], run.info.device)[0])
    run.mlog.write({"final": True, "step": run.step, "epoch": run.epoch, **run.last_eval, "skipped_images": skipped})
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
        differ = differences_across_ranks({**flat(cfg), "--out": str(out_dir), "--fresh": fresh})
        if differ:  # would hang in a collective, or train different things on each rank
            raise SettingsDiffer(f"the {info.world_size} processes were given different settings: "
                                 f"{'; '.join(differ)}", rank=info.rank)
        try:
            run, error = setup(cfg, Path(out_dir), info), None
        except ConfigError as e:
            if not info.distributed:
                raise
            error = str(e)
        gathered_error(error, info.rank)  # one line from rank 0, not one per rank
        lock, state, path = claim_folder(run, fresh)
        try:
            trained = state is not None and state["epoch"] >= cfg.epochs and state["batch"] == 0
            if trained and gather_objects(run.info.is_main and finished_outputs(run.out, state["step"]))[0]:
                changed = config_changes(state, cfg)
                log(f"{path} finished its {state['epoch']} epochs (step {state['step']}): nothing to train, "
                    "nothing written" + (f" (ignored: new values for {', '.join(changed)})" if changed else ""))
                return state["last_eval"]
            if state is not None:
                check_resumable(state, cfg, path)
            start(run, state, path)
            if trained:  # stopped after its last checkpoint, before its final record and plots
                log(f"{path} trained all {state['epoch']} epochs; writing what the run did not finish: "
                    "the final record and the plots")
                return finish(run)
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
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. optim.lr=0.1 (anywhere on the line)")
    return p


def cli(argv: list[str] | None = None) -> None:
    """The command line: one ``error: ...`` line and exit status 1 for every user mistake."""
    args = get_args_parser().parse_intermixed_args(argv)  # key=value before, between or after options
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return
        main(cfg, args.out or str(Path("runs") / Path(args.config or "digits").stem), fresh=args.fresh)
    except (SettingsDiffer, EveryRankError) as e:  # the same line on every rank: rank 0 says it, the others quietly
        exit_with_error(str(e), report=e.rank == 0)
    except ConfigError as e:
        exit_with_error(str(e))
    except OSError as e:  # the run folder's disk: full or read-only
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
            raise
        exit_with_error(str(e))


if __name__ == "__main__":
    cli()
