"""Training-step throughput per predictor (``directpred``, ``linear``, ``none``): the GPU check's
answer to "what does DirectPred cost inside a real BYOL step on one GPU?".

    python -m bench.train_step [--device cuda] [--quick] [--toy] [--json FILE]

Two cases, each built by the trainer's own code (:func:`bench.step_timing.build`: the preset's
network, optimizer, schedule, GradScaler and autocast dtype, with ``predictor.name`` set) and
stepped by the trainer's :func:`train.pretrain.train_step` (forward of both views, loss, online
probe, backward, optimizer step, LR schedule, target EMA update; a DirectPredictor's statistics
and rebuild run inside its training-mode call, or in ``step()`` after the optimizer when attached):

* ``imagenet_r50``: the ``imagenet_r50_300ep`` preset (ResNet-50, projector 4096 -> 256, LARS,
  bf16 autocast, channels_last) at a per-GPU batch of 128, on synthetic normalised 224x224
  views made once on the device: the model step alone, no data pipeline.
* ``cifar10_r18``: the ``cifar10_r18`` preset (ResNet-18 with the CIFAR stem, batch 128) on an
  in-memory uint8 dataset of 50 000 CIFAR-shaped random images in host memory; every step takes
  the trainer's next batch from :class:`train.data.BatchedViews` (the sampler's order, the
  images copied to the GPU, both views made there by the batched augmentation, an ``Augment``
  callable, by default :class:`train.batch_augment.BatchAugment` with the preset's views), then
  the step: images/s end to end.

Timing: per case, the three predictors are built side by side (same seed, same data), warmed
up, then timed in interleaved rounds (the order rotates each round) of a fixed number of steps;
a round is CUDA events around its steps (after a ``torch.cuda.synchronize``), and the figure is
the median over rounds. A last, instrumented pass of a few steps records CUDA events around the
predictor's own work (its forward calls, which for DirectPred hold the statistics and the
rebuild, and its ``step()`` when attached; not its backward, two d x d products, which the
difference against ``none`` covers) and around the making of each batch (data ms). The
predictor's share of a step is given both ways: (step - step with ``none``) / step, and
predictor ms / step ms.

Each case and each predictor is guarded: an error (an out-of-memory error, say) is recorded in
its row and the others still run. On a CPU the same code runs with the host clock (``--toy``:
small networks and batches, to exercise the code path).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn as nn

import fastpred
from bench.step_timing import build
from bench.train_throughput import SyntheticImages
from train import data
from train.config import Config, from_dict, load_config
from train.batch_augment import BatchAugment
from train.pretrain import Learner, train_step


PREDICTORS = ("directpred", "linear", "none")

# What train.data.BatchedViews calls: (uint8 images (B, C, H, W) on the device, their epochs and
# dataset indices, (B,) int64 on the host) -> the two float views (B, C, S, S) on the device.
Augment = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]
AUGMENT_LABEL = "train.batch_augment.BatchAugment, the preset's views"


@dataclass(frozen=True)
class Case:
    """One training-step benchmark: a preset at a per-GPU batch on a kind of data."""

    name: str
    preset: str
    batch: int  # per-GPU batch: images per step (each gives two views)
    data: str  # "synthetic" (random normalised views) or "in_memory" (uint8 dataset + batched augmentation)
    classes: int  # the online probe's classes (its labels are random)
    dataset_size: int = 0  # in_memory: images held on the device
    overrides: tuple[str, ...] = ()  # config overrides (the toy sizes)


@dataclass(frozen=True)
class Schedule:
    """Steps per predictor: ``warmup`` untimed, ``rounds`` x ``steps`` timed, then
    ``instrumented_steps`` with the predictor's and the augmentation's own spans recorded."""

    warmup: int = 5
    steps: int = 10
    rounds: int = 5
    instrumented_steps: int = 5


CASES = (
    Case("imagenet_r50", "imagenet_r50_300ep", 128, "synthetic", classes=1000),
    Case("cifar10_r18", "cifar10_r18", 128, "in_memory", classes=10, dataset_size=50_000),
)
FULL = Schedule()
QUICK = Schedule(warmup=3, steps=5, rounds=3, instrumented_steps=3)
# CPU smoke sizes: the same presets and code path, tiny networks and batches.
TOY_OVERRIDES = ("model.arch=resnet_mini", "model.proj_hidden=32", "model.proj_dim=16", "data.image_size=16",
                 "predictor.mlp_hidden=32")
TOY_CASES = tuple(replace(c, name=f"{c.name}_toy", batch=8, dataset_size=64, overrides=TOY_OVERRIDES) for c in CASES)
TOY = Schedule(warmup=1, steps=2, rounds=2, instrumented_steps=1)


# ------------------------------------------------------------------ clocks
class Spans:
    """Milliseconds spent between ``begin()`` and ``end()``, summed over spans: CUDA events on
    a GPU (read after one synchronize, in :meth:`total_ms`), the host clock on a CPU (whose ops
    run synchronously)."""

    def __init__(self, device: torch.device, recording: bool = True) -> None:
        self.cuda = device.type == "cuda"
        self.recording = recording  # begin() and end() do nothing while False
        self.spans: list[tuple] = []
        self._open = None

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin(self) -> None:
        if self.recording:
            self._open = self._mark()

    def end(self) -> None:
        if self.recording:
            self.spans.append((self._open, self._mark()))

    def total_ms(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.spans)
        return sum((b - a) * 1e3 for a, b in self.spans)


def time_steps(device: torch.device, step: Callable[[], object], n: int) -> float:
    """Milliseconds per call of ``step`` over ``n`` calls (CUDA events around them on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    clock = Spans(device)
    clock.begin()
    for _ in range(n):
        step()
    clock.end()
    return clock.total_ms() / n


class PredictorClock:
    """Spans of the predictor's own work while installed: each forward call (pre/post hooks)
    and, for a DirectPredictor, each end of a step (``_end_step``: the fold and the rebuild, which
    the optimizer hook of :meth:`fastpred.DirectPredictor.attach` runs; the trainer attaches).
    ``remove()`` restores the module."""

    def __init__(self, predictor: nn.Module, spans: Spans) -> None:
        self.predictor, self.spans = predictor, spans
        self.handles = [predictor.register_forward_pre_hook(lambda *_: spans.begin()),
                        predictor.register_forward_hook(lambda *_: spans.end())]
        self.wrapped = isinstance(predictor, fastpred.DirectPredictor)
        if self.wrapped:
            own_end_step = predictor._end_step

            def timed_end_step() -> None:
                spans.begin()
                own_end_step()
                spans.end()

            predictor._end_step = timed_end_step  # an instance attribute: every route ends a step here

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        if self.wrapped:
            del self.predictor._end_step


# ------------------------------------------------------------------ data
def in_memory_batches(case: Case, cfg: Config, device: torch.device, augment: Augment | None = None):
    """The trainer's batches for an in-memory dataset of random uint8 images shaped like the
    preset's, held in host memory (:class:`bench.train_throughput.SyntheticImages`), without end:
    :class:`train.data.BatchedViews` over a :class:`train.data.ResumableSampler` (a new order
    each epoch), both views made on ``device`` by ``augment`` (default:
    :class:`train.batch_augment.BatchAugment` for the preset's ``aug`` section), as
    :func:`train.pretrain.load_data` sets them up."""
    spec, side = data.spec(cfg.data), cfg.data.image_size
    if case.dataset_size < case.batch:
        raise ValueError(f"dataset_size={case.dataset_size} is smaller than batch={case.batch}")
    ds = SyntheticImages(case.dataset_size, spec.channels, side, seed=cfg.seed)
    sampler = data.ResumableSampler(ds, case.batch, 1, 0, cfg.seed)
    augment = augment or BatchAugment(cfg.aug, side, spec.mean, spec.std, cfg.seed)
    batches = data.BatchedViews(ds, sampler, case.batch, augment, device)
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from batches


# ------------------------------------------------------------------ one case
@dataclass
class Variant:
    """One predictor's learner, stepped by the trainer's ``train_step`` on ``feed()``'s views."""

    learner: Learner
    feed: Callable[[], tuple]  # () -> (v1, v2, labels)
    tau: float  # target EMA coefficient
    last_loss: torch.Tensor | None = None

    def step(self) -> None:
        v1, v2, labels = self.feed()
        self.last_loss, _, _ = train_step(self.learner, v1, v2, labels, self.tau)


def case_config(case: Case, predictor: str = "directpred") -> Config:
    return from_dict({"predictor": {"name": predictor}}, load_config(case.preset, list(case.overrides)))


def make_variant(case: Case, predictor: str, device: torch.device, feed: Callable[[], tuple]) -> Variant:
    """The trainer's network, optimizer and schedule for ``predictor`` (bench.step_timing.build),
    the online probe when the preset has one (as train.pretrain.setup), and its step on ``feed()``."""
    cfg = case_config(case, predictor)
    model, opt, sched, scaler, dtype = build(case.preset, list(case.overrides), predictor, cfg.batch_size, device)
    probe = probe_opt = None
    if cfg.monitor.probe:
        probe = nn.Linear(model.feat_dim, case.classes).to(device)
        probe_opt = torch.optim.SGD(probe.parameters(), lr=cfg.monitor.probe_lr, momentum=0.9)
    learner = Learner(bare=model, model=model, optimizer=opt, scheduler=sched, scaler=scaler, dtype=dtype,
                      probe=probe, probe_opt=probe_opt)
    model.train()
    return Variant(learner, feed, cfg.model.ema_tau)


def make_feed(case: Case, cfg: Config, device: torch.device, augment_spans: Spans | None = None,
              augment: Augment | None = None) -> tuple[Callable[[], tuple], str]:
    """The per-step input: (v1, v2, labels) and a description of where it comes from."""
    channels_last = cfg.model.channels_last
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    labels = torch.randint(0, case.classes, (case.batch,), device=device, generator=g)
    if case.data == "synthetic":
        side, channels = cfg.data.image_size, data.spec(cfg.data).channels
        pairs = [tuple(torch.randn(case.batch, channels, side, side, device=device, generator=g) for _ in range(2))
                 for _ in range(2)]
        if channels_last:
            pairs = [tuple(v.contiguous(memory_format=torch.channels_last) for v in p) for p in pairs]
        counter = iter(range(sys.maxsize))
        return (lambda: (*pairs[next(counter) % 2], labels)), f"synthetic normalised {side}x{side} views"
    if case.data != "in_memory":
        raise ValueError(f"case.data={case.data!r}: expected synthetic or in_memory")
    label = AUGMENT_LABEL if augment is None else getattr(augment, "__name__", "a given callable")
    batches = in_memory_batches(case, cfg, device, augment)

    def feed() -> tuple:
        if augment_spans is not None:
            augment_spans.begin()
        v1, v2, labels, _ = next(batches)
        if channels_last:  # as the trainer does with a batch on the device
            v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
        if augment_spans is not None:
            augment_spans.end()
        return v1, v2, labels

    return feed, (f"in-memory uint8 dataset of {case.dataset_size} images in host memory, batches by "
                  f"train.data.BatchedViews, views made on the device by {label}")


def _error(what: str, err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{what}: {type(err).__name__}: {first[:300]}"


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def describe(case: Case, predictor: str) -> dict:
    """What a row measures (also the dry run's listing)."""
    cfg = case_config(case, predictor)
    return {"benchmark": f"train step {case.name} {predictor}", "case": case.name, "preset": case.preset,
            "predictor": predictor, "arch": cfg.model.arch, "batch": case.batch, "image_size": cfg.data.image_size,
            "amp": cfg.amp, "channels_last": cfg.model.channels_last, "optimizer": cfg.optim.name,
            "proj_dim": cfg.model.proj_dim, "data": case.data,
            "augment": AUGMENT_LABEL if case.data == "in_memory" else "none (synthetic views)"}


def run_case(case: Case, predictors: tuple[str, ...], schedule: Schedule, device: torch.device,
             allows: Callable[[str], bool] = lambda what: True, augment: Augment | None = None) -> list[dict]:
    """One row per predictor (see the module doc); an error lands in its row's ``error``."""
    rows: dict[str, dict] = {}
    for p in predictors:
        try:
            rows[p] = describe(case, p)
        except Exception as err:  # noqa: BLE001 - recorded, the others still run
            rows[p] = {"benchmark": f"train step {case.name} {p}", "case": case.name, "predictor": p,
                       "error": _error("config", err)}
    live = [p for p in predictors if "error" not in rows[p]]
    if not live or not allows(f"train step {case.name}"):
        return list(rows.values())
    variants: dict[str, Variant] = {}
    aug_spans = Spans(device, recording=False)  # on during the instrumented steps only
    try:
        feed, source = make_feed(case, case_config(case), device, aug_spans, augment)
    except Exception as err:  # noqa: BLE001
        msg = _error("data", err)
        for p in live:
            rows[p]["error"] = msg
        _free(device)
        return list(rows.values())
    for p in live:
        rows[p]["source"] = source

    def guarded(p: str, what: str, fn: Callable[[], object]) -> bool:
        try:
            fn()
            return True
        except Exception as err:  # noqa: BLE001 - an OOM in one predictor leaves the others running
            rows[p]["error"] = _error(what, err)
            variants.pop(p, None)
            _free(device)
            print(f"train step {case.name} {p}: {rows[p]['error']}", flush=True)
            return False

    for p in live:
        if guarded(p, "build", lambda p=p: variants.__setitem__(p, make_variant(case, p, device, feed))):
            guarded(p, "warm-up", lambda p=p: time_steps(device, variants[p].step, schedule.warmup))
    times: dict[str, list[float]] = {p: [] for p in variants}
    for r in range(schedule.rounds):
        if not allows(f"train step {case.name} round {r + 1}"):
            break
        names = list(variants)  # rotated each round
        k = r % max(len(names), 1)
        for p in names[k:] + names[:k]:
            guarded(p, f"round {r + 1}", lambda p=p: times[p].append(time_steps(device, variants[p].step,
                                                                                 schedule.steps)))
    for p in list(variants):
        def instrumented(p: str = p) -> None:
            pred_spans = Spans(device)
            aug_spans.spans.clear()
            aug_spans.recording = True
            clock = PredictorClock(variants[p].learner.bare.predictor, pred_spans)
            try:
                step_ms = time_steps(device, variants[p].step, schedule.instrumented_steps)
            finally:
                clock.remove()
                aug_spans.recording = False
            n = schedule.instrumented_steps
            pred_ms = pred_spans.total_ms() / n
            rows[p].update(instrumented_step_ms=step_ms, predictor_ms=pred_ms, predictor_share=pred_ms / step_ms)
            if aug_spans.spans:
                rows[p]["data_ms"] = aug_spans.total_ms() / n
            rows[p]["last_loss"] = float(variants[p].last_loss)

        guarded(p, "instrumented steps", instrumented)
    none_ms = statistics.median(times["none"]) if times.get("none") and "error" not in rows.get("none", {}) else None
    for p, t in times.items():
        if not t or "error" in rows[p]:
            continue
        ms = statistics.median(t)
        rows[p].update(ms_per_step=ms, rounds_ms=t, images_per_s=case.batch / ms * 1e3,
                       timed_steps=len(t) * schedule.steps)
        if none_ms is not None:
            rows[p].update(vs_none_ms=ms - none_ms, share_by_difference=(ms - none_ms) / ms)
    variants.clear()
    _free(device)
    return list(rows.values())


def planned(cases: tuple[Case, ...] = CASES, predictors: tuple[str, ...] = PREDICTORS) -> list[dict]:
    """The benchmarks a run would take (what the dry run lists), each with its settings."""
    rows = []
    for case in cases:
        for p in predictors:
            try:
                rows.append(describe(case, p))
            except Exception as err:  # noqa: BLE001 - a broken preset is listed, not fatal
                rows.append({"benchmark": f"train step {case.name} {p}", "error": _error("config", err)})
    return rows


def run(cases: tuple[Case, ...] = CASES, predictors: tuple[str, ...] = PREDICTORS, schedule: Schedule = FULL,
        device: torch.device | str | None = None, allows: Callable[[str], bool] = lambda what: True,
        augment: Augment | None = None) -> dict:
    """Every case (each guarded); ``allows(what)`` says whether time is left for ``what``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "schedule": asdict(schedule), "rows": []}
    for case in cases:
        try:
            rows = run_case(case, predictors, schedule, device, allows, augment)
        except Exception as err:  # noqa: BLE001 - the next case still runs
            rows = [{"benchmark": f"train step {case.name}", "case": case.name, "error": _error("case", err)}]
            _free(device)
        for r in rows:
            print(format_row(r), flush=True)
        result["rows"] += rows
    return result


# ------------------------------------------------------------------ report
def format_plan(r: dict) -> str:
    if "error" in r:
        return f"{r['benchmark']}: FAILED {r['error']}"
    return (f"{r['benchmark']} ({r['preset']}: {r['arch']}, batch {r['batch']}, {r['image_size']}x{r['image_size']}, "
            f"amp {r['amp']}, channels_last {r['channels_last']}, {r['data']}; augmentation: {r['augment']})")


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['benchmark']}: FAILED {r['error']}"
    if "ms_per_step" not in r:
        return f"{r['benchmark']}: not measured"
    extra = f", {r['share_by_difference'] * 100:+.1f}% vs none" if "share_by_difference" in r else ""
    if "predictor_ms" in r:
        extra += f", predictor {r['predictor_ms']:.3f} ms ({r['predictor_share'] * 100:.1f}%)"
    return f"{r['benchmark']}: {r['ms_per_step']:.2f} ms/step, {r['images_per_s']:.0f} images/s{extra}"


def markdown(section: dict, dry_run: bool = False) -> list[str]:
    """The report's section: the planned benchmarks in a dry run, else the measured table."""
    lines = ["", "## Training step per predictor", ""]
    if dry_run:
        s = section.get("schedule", {})
        lines += [f"Planned (not run in a dry run), each: {s.get('warmup')} warm-up steps, {s.get('rounds')} "
                  f"interleaved rounds of {s.get('steps')} timed steps, {s.get('instrumented_steps')} "
                  "instrumented steps.",
                  "",
                  "| benchmark | preset | arch | batch | image | amp | channels_last | data / augmentation |",
                  "|---|---|---|---:|---:|---|---|---|"]
        for r in section.get("planned", []):
            if "error" in r:
                lines.append(f"| {r['benchmark']} | FAILED: {r['error']} | | | | | | |")
                continue
            lines.append(f"| {r['benchmark']} | {r['preset']} | {r['arch']} | {r['batch']} | {r['image_size']} | "
                         f"{r['amp']} | {r['channels_last']} | {r['data']}: {r['augment']} |")
        return lines
    if section.get("error"):
        lines += [f"**Not run:** {section['error']}"]
        return lines
    s = section.get("schedule", {})
    lines += [f"Device {section.get('device', '?')}. Per predictor: {s.get('warmup')} warm-up steps, then "
              f"{s.get('rounds')} interleaved rounds of {s.get('steps')} steps (median of rounds; CUDA events on "
              f"a GPU, the host clock on a CPU), then {s.get('instrumented_steps')} instrumented steps for the "
              "predictor's own time and the batch's making (data ms: next batch, copy, both views).",
              "",
              "| case | predictor | ms/step | images/s | vs none (share of step) | predictor ms (share) | data ms |"
              " loss |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in section.get("rows", []):
        if "error" in r:
            lines.append(f"| {r.get('case', '?')} | {r.get('predictor', '')} | FAILED: {r['error']} | | | | | |")
            continue
        if "ms_per_step" not in r:
            lines.append(f"| {r['case']} | {r['predictor']} | not measured (time budget) | | | | | |")
            continue
        diff = (f"{r['vs_none_ms']:+.2f} ms ({r['share_by_difference'] * 100:+.1f}%)"
                if "vs_none_ms" in r else "")
        pred = f"{r['predictor_ms']:.3f} ({r['predictor_share'] * 100:.1f}%)" if "predictor_ms" in r else ""
        aug = f"{r['data_ms']:.2f}" if "data_ms" in r else ""
        loss = f"{r['last_loss']:.3f}" if "last_loss" in r else ""
        lines.append(f"| {r['case']} | {r['predictor']} | {r['ms_per_step']:.2f} | {r['images_per_s']:.0f} | "
                     f"{diff} | {pred} | {aug} | {loss} |")
    sources = sorted({f"{r['case']}: {r['source']}" for r in section.get("rows", []) if "source" in r})
    lines += [""] + [f"- {s}" for s in sources]
    lines += ["- images/s: images per second (each image gives two views); ms/step: the trainer's `train_step` "
              "on those images (in-memory cases: including the making of the batch).",
              "- vs none: step time minus the `none` predictor's; predictor ms: the time of the predictor's "
              "forward calls (DirectPred: statistics and rebuild included) and of its `step()`, without its backward."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda (default when one is visible) or cpu")
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--toy", action="store_true", help="tiny networks and batches (a CPU smoke run)")
    parser.add_argument("--predictors", nargs="+", default=list(PREDICTORS), choices=list(PREDICTORS))
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    schedule = TOY if args.toy else QUICK if args.quick else FULL
    result = run(TOY_CASES if args.toy else CASES, tuple(args.predictors), schedule, args.device)
    print("\n".join(markdown(result)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
