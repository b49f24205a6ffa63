"""Time one full training step (forward, backward, optimizer, schedules, EMA) per predictor,
side by side in one process, interleaved.

    python -m bench.step_timing [--config digits] [--batch-size B] [--steps 5] [--rounds 5] [--json FILE]

Every variant starts from the same weights (same seed) and sees the same synthetic batches
(random tensors shaped like the preset's augmented views: timing the model, not the data
pipeline). Rounds interleave the variants, rotating their order, and the reported figure is
the median over rounds of the mean step time, so a burst of load on a shared machine hits
all variants alike. Overheads are relative to ``linear`` (an SGD-trained d x d predictor).

A second column times the predictor module alone (forward on the (2B, d) projector outputs
plus backward, in training mode: for DirectPred that includes the statistics update and the
rebuild), interleaved the same way: on CPU the whole step is seconds and its noise hides
differences of a millisecond, which this column resolves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from train import data
from train.config import from_dict, load_config
from train.model import build_model
from train.optim import build_optimizer, build_scheduler
from train.pretrain import train_step
from train.run_state import Learner, amp_dtype

VARIANTS = {  # name -> predictor overrides
    "directpred": {"name": "directpred", "freq": 1},
    "directpred_freq5": {"name": "directpred", "freq": 5},
    "directpred_async": {"name": "directpred", "freq": 1, "async_rebuild": True},
    "directpred_freq5_async": {"name": "directpred", "freq": 5, "async_rebuild": True},
    "linear": {"name": "linear"},
    "mlp": {"name": "mlp"},
    "none": {"name": "none"},
}


def build(preset: str, overrides: list[str], variant: str, batch: int, device: torch.device):
    cfg = from_dict({"predictor": VARIANTS[variant]}, load_config(preset, overrides))
    model = build_model(cfg, data.spec(cfg.data).channels, cfg.seed).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg.optim, model, batch)
    sched = build_scheduler(cfg.optim, opt, total_steps=10**6, steps_per_epoch=1000)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    return model, opt, sched, scaler, amp_dtype(cfg, device)


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    names = list(args.variants)
    cfg = load_config(args.config, args.overrides)
    spec, size = data.spec(cfg.data), cfg.data.image_size
    batch = args.batch_size or cfg.batch_size
    runs = {n: build(args.config, args.overrides, n, batch, device) for n in names}
    g = torch.Generator().manual_seed(0)
    batches = [tuple(torch.randn(batch, spec.channels, size, size, generator=g).to(device) for _ in range(2))
               for _ in range(args.steps)]
    if cfg.model.channels_last:
        batches = [tuple(v.contiguous(memory_format=torch.channels_last) for v in b) for b in batches]

    def run_steps(n: str, k: int) -> float:
        model, opt, sched, scaler, dtype = runs[n]
        learner = Learner(bare=model, model=model, optimizer=opt, scheduler=sched, scaler=scaler, dtype=dtype)
        model.train()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for v1, v2 in batches[:k]:
            train_step(learner, v1, v2, None, 0.99)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / k

    z = torch.randn(2 * batch, cfg.model.proj_dim, generator=g).to(device).requires_grad_()

    def run_predictor(n: str, k: int) -> float:
        pred = runs[n][0].predictor
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(k):
            pred(z).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / k

    for n in names:  # warm-up: allocator, first eigendecomposition, thread pools
        for _ in range(args.warmup):
            run_steps(n, 1)
            run_predictor(n, 1)
    times: dict[str, list[float]] = {n: [] for n in names}
    pred_times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            times[n].append(run_steps(n, args.steps))
            pred_times[n].append(run_predictor(n, args.predictor_reps))
    base = statistics.median(times["linear"]) if "linear" in times else None
    result = {"config": args.config, "batch_size": batch, "image_size": size, "device": str(device),
              "threads": torch.get_num_threads(), "steps_per_round": args.steps, "rounds": args.rounds,
              "variants": {}}
    print(f"step time, {args.config} (batch {batch}, {size}x{size}, {device}, {torch.get_num_threads()} threads), "
          f"median of {args.rounds} interleaved rounds x {args.steps} steps")
    print(f"  {'predictor':<24}{'ms/step':>10}{'min':>10}{'vs linear':>12}{'predictor fwd+bwd ms':>22}")
    for n in names:
        med, lo = statistics.median(times[n]) * 1e3, min(times[n]) * 1e3
        pmed = statistics.median(pred_times[n]) * 1e3
        rel = f"{(med / (base * 1e3) - 1) * 100:+.1f}%" if base else ""
        print(f"  {n:<24}{med:>10.2f}{lo:>10.2f}{rel:>12}{pmed:>22.3f}")
        result["variants"][n] = {"median_ms": med, "min_ms": lo, "rounds_ms": [t * 1e3 for t in times[n]],
                                 "overhead_vs_linear": (med / (base * 1e3) - 1) if base else None,
                                 "predictor_median_ms": pmed, "predictor_rounds_ms": [t * 1e3 for t in pred_times[n]]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Training-step time per predictor, interleaved")
    p.add_argument("--config", default="digits", help="preset or YAML (digits, cifar10_r18, ...)")
    p.add_argument("--batch-size", type=int, default=0, help="global batch (default: the preset's)")
    p.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--predictor-reps", type=int, default=50, help="predictor-only calls per variant per round")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. amp=bf16")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_intermixed_args())
