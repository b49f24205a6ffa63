"""End-to-end training throughput: images/s of the data path plus the optimizer step, with the
views made per sample in the loader (``aug.batched=false``) and for the whole batch on the
training device (``aug.batched=true``), side by side in one run.

    python -m bench.train_throughput [--configs fashion_mnist cifar10_r18] [--steps 5] [--rounds 5]
                                     [--layouts preset|nchw|nhwc ...] [--workers 0] [--device cpu]
                                     [--json FILE]

Each preset trains on synthetic in-memory uint8 images of its dataset's shape (random pixels:
the cost of the views and of the step does not depend on the content), through the trainer's own
pieces: :class:`train.data.Views` in a DataLoader on a :class:`train.data.ResumableSampler`, or
:class:`train.data.BatchedViews`; then :func:`train.pretrain.train_step`. Every pipeline starts
from the same weights. ``--layouts nchw nhwc`` also times both memory layouts of the network
(``model.channels_last``), each with both pipelines. Rounds run every (pipeline, layout) once,
rotating which goes first; images/s are medians over rounds, and a speed-up is the median over
rounds of each round's ratio (the two ran in the same round), so a burst of load on a shared
machine hits both alike. A second pair of columns times the views alone (the data path without
the step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from bench.step_timing import build
from train import data
from train.augment import two_view_transforms
from train.batch_augment import BatchAugment
from train.config import load_config
from train.pretrain import Learner, train_step

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


LAYOUTS = {"nchw": False, "nhwc": True}  # model.channels_last


def measure(preset: str, overrides: list[str], batch: int, steps: int, rounds: int, workers: int,
            device: torch.device, layouts: tuple[str, ...] = ("preset",)) -> dict:
    """images/s per (pipeline, layout) (median over rounds) of ``steps`` training steps and of their
    views alone; the speed-ups of the batched pipeline and, with two layouts, of NHWC."""
    cfg, sampler, pipes = loaders(preset, overrides, batch, workers, device, n=batch * (steps + 1))
    chosen = {lay: (cfg.model.channels_last if lay == "preset" else LAYOUTS[lay]) for lay in layouts}
    combos = [(p, lay) for lay in layouts for p in PIPELINES]
    learners = {}
    for p, lay in combos:
        m = build(preset, [*overrides, f"model.channels_last={str(chosen[lay]).lower()}"], "directpred", batch, device)
        learners[p, lay] = Learner(bare=m[0], model=m[0], optimizer=m[1], scheduler=m[2], scaler=m[3], dtype=m[4])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(p: str, lay: str, epoch: int, step: bool) -> float:
        sampler.set_epoch(epoch)
        learners[p, lay].model.train()
        sync()
        t0 = time.perf_counter()
        for k, (v1, v2, labels, _) in enumerate(pipes[p]):
            if k == steps:
                break
            v1, v2 = (v.to(device, non_blocking=True) for v in (v1, v2))
            if chosen[lay]:
                v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
            if step:
                train_step(learners[p, lay], v1, v2, None, 0.99)
        sync()
        return batch * steps / (time.perf_counter() - t0)

    for p, lay in combos:  # warm-up: allocator, thread pools, first eigendecomposition
        run(p, lay, 0, True)
    rates = {f"{p}/{lay}": {"step": [], "views": []} for p, lay in combos}
    for r in range(rounds):
        k = r % len(combos)
        for p, lay in combos[k:] + combos[:k]:
            rates[f"{p}/{lay}"]["step"].append(run(p, lay, r + 1, True))
            if lay == layouts[0]:  # the views do not depend on the network's layout
                rates[f"{p}/{lay}"]["views"].append(run(p, lay, r + 1, False))
    med = {c: {k: statistics.median(v) for k, v in x.items() if v} for c, x in rates.items()}

    def paired(a: str, b: str) -> float:
        """Median over rounds of b's images/s over a's in the same round."""
        return statistics.median(y / x for x, y in zip(rates[a]["step"], rates[b]["step"]))

    speedup = {lay: paired(f"per_sample/{lay}", f"batched/{lay}") for lay in layouts}
    res = {"config": preset, "batch_size": batch, "image_size": cfg.data.image_size, "steps": steps,
           "rounds": rounds, "workers": workers, "device": str(device), "threads": torch.get_num_threads(),
           "channels_last": chosen, "images_per_s": med, "rounds_images_per_s": rates,
           "speedup_batched": speedup}  # per layout: batched over per-sample views, same round
    if {"nchw", "nhwc"} <= set(layouts):
        res["speedup_nhwc"] = paired("batched/nchw", "batched/nhwc")  # the step alone, batched views
        res["speedup_end_to_end"] = paired("per_sample/nchw", "batched/nhwc")
    return res


def main(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    results = []
    print(f"images/s, synthetic in-memory data, {device}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rotating rounds x {args.steps} steps")
    print(f"  {'preset':<16}{'layout':>8}{'batch':>6}{'per-sample step':>17}{'batched step':>14}{'speed-up':>10}"
          f"{'per-sample views':>18}{'batched views':>15}")
    for preset in args.configs:
        cfg = load_config(preset, args.overrides)
        batch = args.batch_size or cfg.batch_size
        res = measure(preset, args.overrides, batch, args.steps, args.rounds, args.workers, device,
                      tuple(args.layouts))
        m = res["images_per_s"]
        for lay in args.layouts:
            name = lay if lay != "preset" else ("nhwc" if res["channels_last"][lay] else "nchw") + "*"
            ps, b = m[f"per_sample/{lay}"], m[f"batched/{lay}"]
            views = (f"{ps['views']:>18.0f}{b['views']:>15.0f}" if "views" in ps else "")
            print(f"  {preset:<16}{name:>8}{batch:>6}{ps['step']:>17.0f}{b['step']:>14.0f}"
                  f"{res['speedup_batched'][lay]:>9.2f}x{views}", flush=True)
        if "speedup_nhwc" in res:
            print(f"  {preset}: NHWC over NCHW (batched step) {res['speedup_nhwc']:.2f}x; per-sample NCHW -> "
                  f"batched NHWC {res['speedup_end_to_end']:.2f}x", flush=True)
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
    p.add_argument("--layouts", nargs="+", default=["preset"], choices=["preset", *LAYOUTS],
                   help="network memory layouts to time: the preset's, nchw, nhwc (channels_last)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the per-sample pipeline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every preset")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
