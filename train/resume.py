"""Starting or resuming a run in its folder: which checkpoint to continue from (the newest usable one
that fits this run's model), what a resume may change, restoring the state exactly, writing
checkpoints that are never diverged ones, and whether a trained run still has to be finished.
The loop itself is ``train.pretrain``."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import IO

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint
from .config import Config, ConfigError, diff, from_saved, old_to_new, to_dict, to_yaml
from .run_state import EpochSums, Run, bare_module, host_losses
from .metrics_log import MetricsLog, read_metrics
from .utils import all_reduce_sum, gather_objects, log, rng_state, set_rng_state, warn


STATE_KEYS = ("config", "step", "epoch", "batch", "world_size", "per_rank", "last_eval", "model", "optimizer",
              "scheduler", "scaler", "probe", "probe_optimizer", "diag_corr", "diagnostics", "metrics_lines")


class Diverged(ConfigError):
    """Training diverged (a loss or weight that is not finite): one error line naming the newest
    checkpoint, which holds finite weights and losses only."""


def diverged_message(run: Run, what: str) -> str:
    kept = checkpoint.own(run.out, run.foreign)
    return (f"training diverged: {what}; "
            + (f"the last good checkpoint, {kept[-1]}, is kept" if kept else "no checkpoint had been written yet")
            + f" (optim.lr={run.cfg.optim.lr:g} may be too large)")


def check_finite(run: Run) -> None:
    """Before a checkpoint is written: every pending loss and every weight finite, so that a saved
    checkpoint is never a diverged one.

    Raises:
        Diverged: naming the step and the newest (good) checkpoint."""
    bad = [l for pair in run.pending for l in pair if l is not None and not math.isfinite(l)]
    weights = torch.stack([p.detach().isfinite().all() for p in run.learner.bare.parameters()]).all()
    if bad or not bool(all_reduce_sum([float(not weights)], run.info.device)[0] == 0):
        what = f"a loss of {bad[0]} before step {run.step}" if bad else f"weights not finite at step {run.step}"
        raise Diverged(diverged_message(run, what))


def save_checkpoint(run: Run) -> None:
    """Everything needed to continue exactly. Collective (gathers every rank's RNG state and
    skip count); rank 0 writes. Never writes a diverged state (:func:`check_finite`)."""
    run.pending = host_losses(run.pending, run.info.device)  # floats: weights_only-safe
    check_finite(run)
    per_rank = gather_objects({"rng": rng_state(), "skipped": run.skipped, "pending": run.pending,
                               "epoch_sums": dataclasses.asdict(run.sums)})
    if not run.info.is_main or run.saved_at == (run.step, run.epoch, run.batch):
        return
    state = {
        "config": to_dict(run.cfg), "step": run.step, "epoch": run.epoch, "batch": run.batch,
        "world_size": run.info.world_size, "per_rank": per_rank, "last_eval": run.last_eval,
        "model": run.learner.bare.state_dict(), "optimizer": run.learner.optimizer.state_dict(),
        "scheduler": run.learner.scheduler.state_dict(), "scaler": run.learner.scaler.state_dict(),
        "probe": bare_module(run.learner.probe).state_dict() if run.learner.probe is not None else None,
        "probe_optimizer": run.learner.probe_opt.state_dict() if run.learner.probe_opt is not None else None,
        "diag_corr": run.diag_corr, "diagnostics": run.diag.state_dict(), "metrics_lines": run.mlog.lines,
    }
    checkpoint.save(state, run.out, run.step, run.cfg.ckpt.keep, run.foreign)
    run.saved_at = (run.step, run.epoch, run.batch)


def claim_folder(run: Run, fresh: bool) -> tuple[IO | None, dict | None, Path | None]:
    """Rank 0 locks ``run.out``, removes temp files of interrupted saves, sets the folder's contents
    aside when ``fresh``, and picks the newest usable checkpoint; every rank loads that same one.
    The files that are not the run's own (refused as damaged or not fitting, or numbered past the
    chosen one) go into ``run.foreign``: checkpoint retention never counts or deletes them.

    Returns (the lock on rank 0, else None; the checkpoint's state or None; its path).
    Raises ConfigError on every rank when rank 0 found a problem (folder in use, none usable).
    """
    lock = state = path = error = None
    if run.info.is_main:
        try:
            lock, state, path = _claim_on_main(run.out, fresh, weights_fit(run))
            run.foreign = tuple(checkpoint.foreign_files(run.out, path, state["step"] if state else 0))
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


def weights_fit(run: Run):
    """``fits(state)`` for :func:`checkpoint.load_latest`: None when the checkpoint's network (and
    probe) have this run's parameter names and shapes, else which differ."""
    probe = run.learner.probe
    ours = {"model": run.learner.bare.state_dict(), "probe": bare_module(probe).state_dict() if probe else None}

    def fits(state: dict) -> str | None:
        problems = []
        for part, mine in ours.items():
            theirs = state[part]
            if mine is None or theirs is None:
                if (mine is None) != (theirs is None) and part == "model":
                    problems.append(f"{part}: missing")
                continue
            for k in sorted(mine.keys() | theirs.keys()):
                if k not in theirs or k not in mine:
                    problems.append(f"{k} {'missing' if k not in theirs else 'not in this model'}")
                elif tuple(mine[k].shape) != tuple(theirs[k].shape):
                    problems.append(f"{k} {tuple(theirs[k].shape)} there, {tuple(mine[k].shape)} here")
        if not problems:
            return None
        keys = [k for k in config_changes(state, run.cfg) if k.startswith(("model.", "predictor.", "data."))]
        return (f"its weights do not fit this model ({'; '.join(problems[:3])}"
                + (f"; {len(problems) - 3} more" if len(problems) > 3 else "") + ")"
                + (f", configured with other values for {', '.join(keys)}" if keys else ""))

    return fits


def _claim_on_main(out: Path, fresh: bool, fits) -> tuple[IO, dict | None, Path | None]:
    lock = checkpoint.lock_folder(out)
    try:
        for p in checkpoint.remove_temp_files(out):
            log(f"removed {p.name}, left by an interrupted checkpoint save")
        if fresh and (old := checkpoint.set_aside(out)):
            log(f"--fresh: the earlier contents of {out} are now in {old}")
        state, path = checkpoint.load_latest(out, required=STATE_KEYS, fits=fits)
    except BaseException:
        lock.close()
        raise
    return lock, state, path


# values the restored optimizer, scheduler, sampler and RNG state carry: a resume cannot apply new ones
FIXED_ON_RESUME = ("optim.", "batch_size", "seed")


def check_resumable(state: dict, cfg: Config, path: Path) -> None:
    """Refuse a resume whose new values the checkpoint's state would silently override.

    ``optim.*`` (the restored optimizer and schedule state keep the checkpoint's), ``batch_size``
    and ``seed`` (the sampler's position and order, the RNG streams) cannot change on resume, nor
    can ``epochs`` drop to where the checkpoint already is (its final evaluation would be an older one).

    Raises:
        ConfigError: naming the keys, both values, and what to do instead.
    """
    changed = [k for k in config_changes(state, cfg) if k.startswith(FIXED_ON_RESUME)]
    saved = state["config"]
    if changed:
        values = old_to_new(saved, to_dict(cfg), changed)
        raise ConfigError(f"{path} cannot be resumed with other values for {values}: the checkpoint's optimizer, "
                          "schedule and sampler state would keep the old ones; use the checkpoint's values, "
                          "or --fresh to start over with these")
    if state["epoch"] >= cfg.epochs and saved.get("epochs") != cfg.epochs:
        raise ConfigError(f"epochs={cfg.epochs}: {path} has already trained {state['epoch']} epochs "
                          f"(of epochs={saved.get('epochs')}); use epochs>={state['epoch'] + 1}, "
                          "or --fresh to start over")


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
    run.learner.bare.load_state_dict(state["model"])
    run.learner.optimizer.load_state_dict(state["optimizer"])
    run.learner.scheduler.load_state_dict(state["scheduler"])
    run.learner.scaler.load_state_dict(state["scaler"])
    if run.learner.probe is not None and state["probe"] is not None:
        bare_module(run.learner.probe).load_state_dict(state["probe"])
        run.learner.probe_opt.load_state_dict(state["probe_optimizer"])
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

    ``config.yaml`` is the configuration the run started with: written when it starts from no
    checkpoint (replacing the one a run that failed before its first checkpoint left there), or from
    the checkpoint when missing, and never rewritten by a resume: a resume with values other than
    the checkpoint's saves them beside it as ``config_from_step_<step>.yaml``."""
    changed = restore(run, state, path) if state is not None else []
    run.mlog = MetricsLog(run.out, run.info.is_main, keep_lines=state["metrics_lines"] if state else 0,
                          purge_step=run.step)
    if run.info.is_main:
        config_yaml = run.out / "config.yaml"
        if state is None:
            if config_yaml.is_file() and config_yaml.read_text(errors="replace") != to_yaml(run.cfg):
                log(f"{config_yaml} was left by a run that wrote no checkpoint: replaced by this run's configuration")
            _write_text(config_yaml, to_yaml(run.cfg))
        elif not config_yaml.exists():
            _write_text(config_yaml, to_yaml(state["config"]))
        if changed:
            beside = run.out / f"config_from_step_{run.step}.yaml"
            _write_text(beside, to_yaml(run.cfg))
            log(f"config.yaml keeps the configuration of the checkpoint; this run's is in {beside.name}")
    if run.info.distributed:  # wrap after restoring; DDP broadcasts rank 0's weights
        ids = [run.info.device.index] if run.info.device.type == "cuda" else None
        run.learner.model = DDP(run.learner.bare, device_ids=ids)
        if run.learner.probe is not None:
            run.learner.probe = DDP(run.learner.probe, device_ids=ids)


def _write_text(path: Path, text: str) -> None:
    """``text`` into ``path``, whole or not at all (a temp file renamed into place).

    Raises:
        ConfigError: naming ``path`` when it cannot be written (a folder in its place, a full disk)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def finished_outputs(out: Path, step: int) -> bool:
    """Whether a run that trained to ``step`` also finished: its ``"final": true`` record and plots."""
    final = any(r.get("final") and r.get("step") == step and "linear_eval" not in r
                for r in read_metrics(out / "metrics.jsonl"))
    return final and all((out / n).is_file() and (out / n).stat().st_size > 0
                         for n in ("diagnostics.json", "diagnostics.png"))
