"""End-to-end training throughput: images/s of the data path plus the optimizer step, with the
views made per sample in the loader (``aug.batched=false``) and for the whole batch on the
training device (``aug.batched=true``), side by side in one run.

    python -m bench.train_throughput [--configs fashion_mnist cifar10_r18] [--steps 5] [--rounds 5]
                                     [--workers 0] [--device cpu] [--json FILE]

Each preset trains on synthetic in-memory uint8 images of its dataset's shape (random pixels:
the cost of the views and of the step does not depend on the content), through the trainer's own
pieces: :class:`train.data.Views` in a DataLoader on a :class:`train.data.ResumableSampler`, or
:class:`train.data.BatchedViews`; then :func:`train.pretrain.train_step`. Both pipelines start
from the same weights. Rounds alternate the two, rotating which goes first; images/s are medians
over rounds, and the speed-up is the median over rounds of each round's ratio (the two pipelines
ran back to back in it), so a burst of load on a shared machine hits both alike. A second pair of
columns times the views alone (the data path without the step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from train import data
from train.augment import two_view_transforms
from train.batch_augment import BatchAugment
from train.config import load_config
from train.pretrain import Learner, train_step
from train.step_timing import build

PIPELINES = ("per_sample", "batched")


class SyntheticImages(Dataset):
    """``n`` random uint8 images (C, size, size) with labels 0-9, held in memory like CIFAR-10's."""

    def __init__(self, n: int, channels: int, size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
        self.targets = torch.randint(0, 10, (n,), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return tv_tensors.Image(self.images[i]), self.targets[i]


def loaders(preset: str, overrides: list[str], batch: int, workers: int, device: torch.device, n: int):
    """The per-sample and the batched pre-training loaders of ``preset`` over the same synthetic
    images and the same sampler."""
    cfg = load_config(preset, overrides)
    spec, size = data.spec(cfg.data), cfg.data.image_size
    ds = SyntheticImages(n, spec.channels, size)
    sampler = data.ResumableSampler(ds, batch, 1, 0, cfg.seed)
    views = data.Views(ds, two_view_transforms(cfg.aug, size, spec.mean, spec.std), seed=cfg.seed)
    per_sample = data.loader(views, batch, workers, sampler, drop_last=True, pin_memory=device.type == "cuda")
    batched = data.BatchedViews(ds, sampler, batch, BatchAugment(cfg.aug, size, spec.mean, spec.std, cfg.seed),
                                device)
    return cfg, sampler, {"per_sample": per_sample, "batched": batched}


def measure(preset: str, overrides: list[str], batch: int, steps: int, rounds: int, workers: int,
            device: torch.device) -> dict:
    """images/s per pipeline (median over rounds) of ``steps`` training steps and of their views alone."""
    cfg, sampler, pipes = loaders(preset, overrides, batch, workers, device, n=batch * (steps + 1))
    models = {p: build(preset, overrides, "directpred", batch, device) for p in PIPELINES}
    learners = {p: Learner(bare=m[0], model=m[0], optimizer=m[1], scheduler=m[2], scaler=m[3], dtype=m[4])
                for p, m in models.items()}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(p: str, epoch: int, step: bool) -> float:
        sampler.set_epoch(epoch)
        learners[p].model.train()
        sync()
        t0 = time.perf_counter()
        for k, (v1, v2, labels, _) in enumerate(pipes[p]):
            if k == steps:
                break
            v1, v2 = (v.to(device, non_blocking=True) for v in (v1, v2))
            if cfg.model.channels_last:
                v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
            if step:
                train_step(learners[p], v1, v2, None, 0.99)
        sync()
        return batch * steps / (time.perf_counter() - t0)

    for p in PIPELINES:  # warm-up: allocator, thread pools, first eigendecomposition
        run(p, 0, True)
    rates: dict[str, dict[str, list[float]]] = {p: {"step": [], "views": []} for p in PIPELINES}
    for r in range(rounds):
        for p in (PIPELINES if r % 2 == 0 else PIPELINES[::-1]):
            rates[p]["step"].append(run(p, r + 1, True))
            rates[p]["views"].append(run(p, r + 1, False))
    med = {p: {k: statistics.median(v) for k, v in rates[p].items()} for p in PIPELINES}
    return {"config": preset, "batch_size": batch, "image_size": cfg.data.image_size, "steps": steps,
            "rounds": rounds, "workers": workers, "device": str(device), "threads": torch.get_num_threads(),
            "images_per_s": med, "rounds_images_per_s": rates,
            # paired: each round's ratio (the two ran back to back), then the median over rounds
            "speedup": statistics.median(b / a for a, b in zip(rates["per_sample"]["step"], rates["batched"]["step"]))}


def main(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    results = []
    print(f"images/s, synthetic in-memory data, {device}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} alternating rounds x {args.steps} steps")
    print(f"  {'preset':<16}{'batch':>6}{'per-sample step':>17}{'batched step':>14}{'speed-up':>10}"
          f"{'per-sample views':>18}{'batched views':>15}")
    for preset in args.configs:
        cfg = load_config(preset, args.overrides)
        batch = args.batch_size or cfg.batch_size
        res = measure(preset, args.overrides, batch, args.steps, args.rounds, args.workers, device)
        m = res["images_per_s"]
        print(f"  {preset:<16}{batch:>6}{m['per_sample']['step']:>17.0f}{m['batched']['step']:>14.0f}"
              f"{res['speedup']:>9.2f}x{m['per_sample']['views']:>18.0f}{m['batched']['views']:>15.0f}", flush=True)
        results.append(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Training images/s: per-sample against batched augmentation")
    p.add_argument("--configs", nargs="+", default=["fashion_mnist", "cifar10_r18"], help="presets")
    p.add_argument("--batch-size", type=int, default=0, help="default: each preset's")
    p.add_argument("--steps", type=int, default=5, help="training steps per pipeline per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the per-sample pipeline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every preset")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
