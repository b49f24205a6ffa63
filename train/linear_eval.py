"""Linear evaluation of a pre-trained backbone (the standard protocol).

    python -m train.linear_eval --ckpt runs/digits/last.pt [--random-init-baseline] [key=value ...]

The backbone is frozen (eval mode, no gradient). A linear classifier on standardised features
(BatchNorm without affine, then Linear) is trained with SGD + momentum on a cosine schedule.
With ``eval.augment=true`` every epoch sees random-resized crops + flips of the training images;
otherwise features of the centre crops are computed once (fast; the digits preset). Test images
are always centre crops. Top-1 and top-5 on the test set are reported.

Hyper-parameters are never chosen on the test set: when ``eval.lr_grid`` has several values,
each is trained on (1 - eval.val_fraction) of the training set and scored on the held-out rest;
the best is then retrained on the whole training set and evaluated once on the test set.

``--random-init-baseline`` also evaluates the same network at its random initialisation (the
pre-training seed rebuilds exactly the weights training started from) and prints both.

Reference rows without any checkpoint (what every learned number must be read against):

    python -m train.linear_eval --config fashion_mnist --reference random_init|raw_pixels --out DIR [seed=K ...]

``random_init``: the preset's network initialised from ``seed``; ``raw_pixels``: the normalised
pixels themselves, flattened. Results also carry the effective rank of the training features.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import checkpoint, data, monitor
from .augment import eval_transform, linear_train_transform
from .config import Config, ConfigError, EvalConfig, load_config, merge, validate
from .model import build_model
from .utils import DistInfo, cleanup_distributed, init_distributed, log


def topk(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracies (%) for each k (k capped at the number of classes)."""
    out = {}
    for k in ks:
        pred = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (N, k)
        out[f"top{k}"] = 100.0 * float((pred == y[:, None]).any(1).float().mean())
    return out


def train_head(batches, dim: int, num_classes: int, lr: float, ev: EvalConfig, steps_per_epoch: int,
               device: torch.device, distributed: bool, seed: int, desc: str | None = None) -> nn.Module:
    """SGD (momentum 0.9, cosine per step) on a BatchNorm(affine=False) + Linear head.

    ``batches(epoch)`` yields (features, labels) for one epoch; its order is seeded by the caller.
    The head is initialised from ``seed`` alone (not from the process's global RNG, which torch
    seeds differently in every process), so one checkpoint and seed always give the same numbers.
    ``desc``: show a progress bar over epochs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes)).to(device)
    model = DDP(head) if distributed else head
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=ev.weight_decay)
    total = ev.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    head.train()
    for epoch in tqdm(range(ev.epochs), desc=desc, disable=desc is None, leave=False, mininterval=1.0,
                      dynamic_ncols=True):
        for f, y in batches(epoch):
            loss = F.cross_entropy(model(f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


class Evaluator:
    """Holds the data of one evaluation so several backbones (learned, random init) share it."""

    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg, self.info = cfg, info
        spec = data.spec(cfg.data)
        size = cfg.data.image_size
        self.train = data.raw_dataset(cfg.data, "train")  # labeled (STL-10: the 5000 train images)
        self.test = data.raw_dataset(cfg.data, "test")
        self.num_classes = data.num_classes(cfg.data, self.train)
        self.eval_tf = eval_transform(size, round(size * spec.resize_ratio), spec.mean, spec.std, cfg.aug.normalize)
        self.train_tf = linear_train_transform(size, spec.mean, spec.std, cfg.aug.normalize)
        # held-out split of train for choosing lr (stratified, fixed by the seed), never the test set
        targets = torch.tensor(self.train.targets)
        g = torch.Generator().manual_seed(cfg.seed)
        val = []
        for c in targets.unique():
            idx = (targets == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            val.append(idx[: int(round(len(idx) * cfg.eval.val_fraction))])
        self.val_idx = torch.cat(val).sort().values
        mask = torch.ones(len(self.train), dtype=torch.bool)
        mask[self.val_idx] = False
        self.fit_idx = mask.nonzero().flatten()

    def _loader(self, ds, tf, sampler=None, seed=None):
        cfg = self.cfg
        local = cfg.eval.batch_size // self.info.world_size
        v = data.Views(ds, [tf], seed=seed)
        if sampler is None and self.info.distributed:
            sampler = torch.utils.data.DistributedSampler(v, self.info.world_size, self.info.rank, shuffle=False)
        return data.loader(v, local, cfg.data.workers, sampler, drop_last=seed is not None,
                           pin_memory=self.info.device.type == "cuda"), v

    def features(self, backbone, ds, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        ld, _ = self._loader(ds, self.eval_tf)
        return monitor.extract_features(backbone, ld, self.info.device, desc=desc if self.info.is_main else None)

    def run(self, backbone: nn.Module, name: str = "learned") -> dict:
        """Choose lr on the held-out split (if several), retrain on all of train, test once.
        Each stage is logged (``name``: which backbone), with progress bars on rank 0."""
        cfg, ev, dev = self.cfg, self.cfg.eval, self.info.device
        backbone.eval().requires_grad_(False)
        t0 = time.perf_counter()
        train_f, train_y = self.features(backbone, self.train, f"{name}: train features")
        test_f, test_y = self.features(backbone, self.test, f"{name}: test features")
        log(f"{name}: features of {len(self.train)} train and {len(self.test)} test images "
            f"({train_f.shape[1]}-d, {time.perf_counter() - t0:.1f}s)")
        dim = train_f.shape[1]
        scores = {}
        if len(ev.lr_grid) > 1:
            for i, lr in enumerate(ev.lr_grid):
                t0 = time.perf_counter()
                head = self._fit(backbone, train_f, train_y, self.fit_idx, lr, dim, f"{name}: lr {lr:g}")
                with torch.no_grad():
                    scores[lr] = topk(head(train_f[self.val_idx.to(dev)]), train_y[self.val_idx.to(dev)], (1,))["top1"]
                log(f"{name}: lr {lr:g} ({i + 1}/{len(ev.lr_grid)}): held-out top-1 {scores[lr]:.2f}% "
                    f"({ev.epochs} epochs on {len(self.fit_idx)} images, {time.perf_counter() - t0:.1f}s)")
            best = max(ev.lr_grid, key=lambda lr: scores[lr])  # ties: the first (smallest listed) wins
        else:
            best = ev.lr_grid[0]
        t0 = time.perf_counter()
        head = self._fit(backbone, train_f, train_y, torch.arange(len(self.train)), best, dim,
                         f"{name}: final fit, lr {best:g}")
        log(f"{name}: final fit with lr {best:g} on all {len(self.train)} train images "
            f"({time.perf_counter() - t0:.1f}s)")
        with torch.no_grad():
            res = topk(head(test_f), test_y)
        res.update(lr=best, val_top1={str(k): v for k, v in scores.items()}, erank=monitor.effective_rank(train_f))
        return res

    def _fit(self, backbone, train_f, train_y, idx: torch.Tensor, lr: float, dim: int, desc: str) -> nn.Module:
        ev, dev, info = self.cfg.eval, self.info.device, self.info
        desc = desc if info.is_main else None
        if not ev.augment:  # cached centre-crop features, every rank trains the same head
            f, y = train_f[idx.to(dev)], train_y[idx.to(dev)]
            bs = min(ev.batch_size, len(f))
            steps = max(1, len(f) // bs)

            def batches(epoch):
                g = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
                perm = torch.randperm(len(f), generator=g).to(dev)
                for s in range(steps):
                    j = perm[s * bs:(s + 1) * bs]
                    yield f[j], y[j]

            return train_head(batches, dim, self.num_classes, lr, ev, steps, dev, distributed=False,
                              seed=self.cfg.seed, desc=desc)
        sub = torch.utils.data.Subset(self.train, idx.tolist())
        local = ev.batch_size // info.world_size
        sampler = data.ResumableSampler(sub, local, info.world_size, info.rank, self.cfg.seed)
        ld, _ = self._loader(sub, self.train_tf, sampler, seed=self.cfg.seed)

        def batches(epoch):
            sampler.set_epoch(epoch)
            for x, y, _ in ld:
                with torch.no_grad():  # (not around the yield: grad mode would leak into the caller)
                    f = backbone(x.to(dev, non_blocking=True)).float()
                yield f, y.to(dev)

        return train_head(batches, dim, self.num_classes, lr, ev, sampler.batches_per_epoch(), dev,
                          distributed=info.distributed, seed=self.cfg.seed, desc=desc)


def load_backbone(cfg: Config, state: dict | None, channels: int, device: torch.device) -> nn.Module:
    """The online backbone from a pre-training state dict, or the same network at random init."""
    model = build_model(cfg, channels, cfg.seed)
    if state is not None:
        model.load_state_dict(state)
    return model.backbone.to(device)


def check_eval_config(cfg: Config) -> None:
    """Everything a linear evaluation needs, checked before any work.

    Raises:
        ConfigError: a value out of range, missing data or labels, an empty lr grid, or a
            batch that the processes cannot share, naming it.
    """
    try:
        validate(cfg)
        data.check_data(cfg.data)
        if not data.has_labels(cfg.data):
            raise ValueError(f"linear evaluation needs labels, and data.root={cfg.data.root!r} has train/ only: "
                             "add data.eval_root=<ImageFolder with train/ and val/>")
        if cfg.eval.batch_size % int(os.environ.get("WORLD_SIZE", "1")):
            raise ValueError(f"eval.batch_size={cfg.eval.batch_size} is not divisible by the number of processes")
        if not cfg.eval.lr_grid:
            raise ValueError("eval.lr_grid is empty")
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e


def main(ckpt: str | Path, overrides: list[str] = (), random_init_baseline: bool = False,
         out: str | Path | None = None) -> dict:
    """Evaluate the backbone of ``ckpt`` (and optionally the random-init one). Returns the results
    and writes ``linear_eval.json`` (and a ``"linear_eval"`` record in metrics.jsonl) into ``out``
    (default: the checkpoint's folder)."""
    state = checkpoint.load(ckpt, required=("config", "model", "step"))
    try:
        cfg = merge(None, state["config"], overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    check_eval_config(cfg)
    info = init_distributed(cfg.device)
    try:
        ev = Evaluator(cfg, info)
        channels = data.spec(cfg.data).channels
        results = {"checkpoint": str(ckpt), "step": state["step"]}
        results["learned"] = ev.run(load_backbone(cfg, state["model"], channels, info.device), "learned")
        if random_init_baseline:
            results["random_init"] = ev.run(load_backbone(cfg, None, channels, info.device), "random init")
        report(results)
        out_dir = Path(out) if out is not None else Path(ckpt).parent
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "linear_eval.json").write_text(json.dumps(results, indent=2))
            record_in_metrics(out_dir / "metrics.jsonl", {
                "step": state["step"], "linear_eval": results["learned"],
                **({"linear_eval_random_init": results["random_init"]} if random_init_baseline else {})})
        return results
    finally:
        cleanup_distributed()


REFERENCES = ("random_init", "raw_pixels")


def main_reference(cfg: Config, kind: str, out: str | Path) -> dict:
    """Linear evaluation without pre-training (``kind``: random_init | raw_pixels) into
    ``out/linear_eval.json`` as ``{"reference": kind, kind: results}``."""
    if kind not in REFERENCES:
        raise ConfigError(f"--reference {kind!r}: expected one of {', '.join(REFERENCES)}")
    check_eval_config(cfg)
    info = init_distributed(cfg.device)
    try:
        ev = Evaluator(cfg, info)
        if kind == "random_init":
            backbone = load_backbone(cfg, None, data.spec(cfg.data).channels, info.device)
        else:
            backbone = nn.Flatten()  # (N, C*H*W) normalised pixels
        results = {"reference": kind, "seed": cfg.seed, kind: ev.run(backbone)}
        r = results[kind]
        log(f"linear evaluation of {kind.replace('_', ' ')} ({cfg.data.name}, seed {cfg.seed}), test set: "
            f"top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  lr {r['lr']:g}")
        if info.is_main:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "linear_eval.json").write_text(json.dumps(results, indent=2))
        return results
    finally:
        cleanup_distributed()


def record_in_metrics(path: Path, record: dict) -> None:
    """Append ``record`` (a ``"linear_eval"`` one) to ``metrics.jsonl``, replacing an earlier linear
    evaluation of the same step (a re-run gives the same numbers: it is deterministic) and a last
    line cut off by a crash. The pre-training's ``"final": true`` record stays the only final one.
    Written through a temp file and a rename; no TensorBoard events (they would be empty)."""
    old = path.read_text(errors="replace").splitlines(keepends=True) if path.exists() else []
    if old and not old[-1].endswith("\n"):
        old = old[:-1]

    def replaced(line: str) -> bool:
        try:
            rec = json.loads(line)
        except ValueError:
            return False
        return isinstance(rec, dict) and "linear_eval" in rec and rec.get("step") == record["step"]

    kept = [line for line in old if not replaced(line)]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept) + json.dumps(record) + "\n")
    os.replace(tmp, path)


def report(results: dict) -> None:
    rows = [("learned (pre-trained)", results["learned"])]
    if "random_init" in results:
        rows.append(("same network, random init", results["random_init"]))
    log(f"linear evaluation of {results['checkpoint']} (step {results['step']}), test set:")
    log(f"  {'backbone':<28}{'top-1':>8}{'top-5':>8}   lr (chosen on held-out train)")
    for name, r in rows:
        log(f"  {name:<28}{r['top1']:>7.2f}%{r['top5']:>7.2f}%   {r['lr']:g}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Linear evaluation of a pre-trained backbone")
    p.add_argument("--ckpt", help="checkpoint written by train.pretrain (e.g. runs/digits/last.pt)")
    p.add_argument("--reference", choices=REFERENCES,
                   help="no checkpoint: evaluate the --config network at random init, or the raw pixels")
    p.add_argument("--config", default=None, help="with --reference: preset name or YAML file (default: digits)")
    p.add_argument("--out", default=None, help="folder for linear_eval.json (default: the checkpoint's folder)")
    p.add_argument("--random-init-baseline", action="store_true",
                   help="also evaluate the same network at its random initialisation")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.epochs=90 data.root=/data")
    return p


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_intermixed_args()  # key=value before, between or after options
    if (args.ckpt is None) == (args.reference is None):
        parser.error("give either --ckpt or --reference (with --config and --out)")
    try:
        if args.reference:
            if args.out is None:
                parser.error("--reference needs --out")
            main_reference(load_config(args.config, args.overrides), args.reference, args.out)
        elif not Path(args.ckpt).is_file():
            sys.exit(f"error: --ckpt {args.ckpt!r}: no such file")
        else:
            main(args.ckpt, args.overrides, args.random_init_baseline, args.out)
    except ConfigError as e:
        sys.exit(f"error: {e}")
