"""The training-step benchmarks of `make gpu-check` (bench.train_step): listed by the dry run,
run on the CPU at toy size through the trainer's own step, each failure recorded in its row."""

import json
import math
import time

import pytest
import torch

pytest.importorskip("torchvision")  # train/ needs it

from bench import gpu_check  # noqa: E402
from bench import train_step as ts  # noqa: E402
from fastpred import DirectPredictor  # noqa: E402
from train.config import load_config  # noqa: E402
from train.model import LinearPredictor  # noqa: E402

NAMES = {f"train step {c} {p}" for c in ("imagenet_r50", "cifar10_r18") for p in ("directpred", "linear", "none")}


def test_dry_run_lists_the_training_step_benchmarks(tmp_path, monkeypatch):
    collected = {"returncode": 0, "collect_only": True, "counts": {"collected": 0}, "failed": [], "skipped": []}
    monkeypatch.setattr(gpu_check, "run_gpu_tests", lambda *a, **k: collected)  # no pytest subprocess here
    monkeypatch.setattr(gpu_check, "run_fake_tier", lambda out: {"returncode": 0, "summary": "ok", "seconds": 0})
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    planned = json.loads((tmp_path / "report.json").read_text())["train_step"]["planned"]
    assert {r["benchmark"] for r in planned} == NAMES
    by_case = {r["case"]: r for r in planned}
    # the settings: R50 at bf16, channels_last, 224 px, 128 per GPU; CIFAR in memory, augmented in batch
    r50, cifar = by_case["imagenet_r50"], by_case["cifar10_r18"]
    assert (r50["preset"], r50["arch"], r50["amp"], r50["channels_last"], r50["image_size"], r50["batch"]) == (
        "imagenet_r50_300ep", "resnet50", "bf16", True, 224, 128)
    assert (cifar["preset"], cifar["arch"], cifar["data"], cifar["image_size"]) == (
        "cifar10_r18", "resnet18", "in_memory", 32)
    md = (tmp_path / "report.md").read_text()
    assert "Dry run" in md and all(f"| {name} |" in md for name in NAMES)


def _count_steps(monkeypatch) -> dict:
    """Wrap the trainer's train_step as the benchmark calls it; count calls per predictor type."""
    calls: dict[str, int] = {}
    real = ts.train_step

    def counting(learner, *args):
        name = type(learner.bare.predictor).__name__
        calls[name] = calls.get(name, 0) + 1
        return real(learner, *args)

    monkeypatch.setattr(ts, "train_step", counting)
    return calls


def test_step_benchmark_runs_the_trainers_step_on_cpu_at_toy_size(monkeypatch):
    torch.manual_seed(0)
    calls = _count_steps(monkeypatch)
    schedule = ts.Schedule(warmup=1, steps=2, rounds=2, instrumented_steps=1)
    result = ts.run(ts.TOY_CASES, schedule=schedule, device="cpu")
    rows = {(r["case"], r["predictor"]): r for r in result["rows"]}
    assert set(rows) == {(c.name, p) for c in ts.TOY_CASES for p in ts.PREDICTORS}
    per_predictor = schedule.warmup + schedule.rounds * schedule.steps + schedule.instrumented_steps
    assert calls == {"DirectPredictor": 2 * per_predictor, "LinearPredictor": 2 * per_predictor,
                     "Identity": 2 * per_predictor}  # two cases each
    for (case, pred), r in rows.items():
        assert "error" not in r, r
        assert len(r["rounds_ms"]) == schedule.rounds and r["ms_per_step"] > 0
        assert r["images_per_s"] == pytest.approx(8 * 1e3 / r["ms_per_step"])  # toy batch 8
        assert 0 < r["predictor_share"] < 1 and math.isfinite(r["last_loss"])
        assert ("data_ms" in r) == case.startswith("cifar10")
    for case in ("imagenet_r50_toy", "cifar10_r18_toy"):
        none, dp = rows[(case, "none")], rows[(case, "directpred")]
        assert none["vs_none_ms"] == 0 and dp["vs_none_ms"] == pytest.approx(dp["ms_per_step"] - none["ms_per_step"])
    md = "\n".join(ts.markdown(result))
    assert md.count("| imagenet_r50_toy |") == 3 and md.count("| cifar10_r18_toy |") == 3


def test_an_out_of_memory_error_is_recorded_and_the_rest_still_run(monkeypatch):
    calls = _count_steps(monkeypatch)
    counted = ts.train_step

    def failing(learner, *args):  # the linear predictor runs out of memory in its first timed round
        if isinstance(learner.bare.predictor, LinearPredictor) and calls.get("LinearPredictor", 0) >= 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return counted(learner, *args)

    monkeypatch.setattr(ts, "train_step", failing)
    broken = ts.Case("broken", "no_such_preset", 8, "synthetic", classes=10)
    cases = (broken, ts.TOY_CASES[1])
    result = ts.run(cases, schedule=ts.Schedule(warmup=1, steps=1, rounds=2, instrumented_steps=1), device="cpu")
    rows = {(r["case"], r["predictor"]): r for r in result["rows"]}
    assert all("no_such_preset" in rows[("broken", p)]["error"] for p in ts.PREDICTORS)
    assert "OutOfMemoryError" in rows[("cifar10_r18_toy", "linear")]["error"]
    assert "ms_per_step" not in rows[("cifar10_r18_toy", "linear")]
    for p in ("directpred", "none"):
        assert "error" not in rows[("cifar10_r18_toy", p)] and rows[("cifar10_r18_toy", p)]["ms_per_step"] > 0
    md = "\n".join(ts.markdown(result))
    assert "| cifar10_r18_toy | linear | FAILED: round 1: OutOfMemoryError" in md


def test_predictor_clock_spans_each_forward_and_each_attached_step():
    spans = ts.Spans(torch.device("cpu"))
    pred = DirectPredictor(8)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    handle = pred.attach(opt)
    clock = ts.PredictorClock(pred, spans)
    for _ in range(3):  # per-view calls, then the optimizer step whose hook folds them
        pred(torch.randn(4, 8))
        pred(torch.randn(4, 8))
        opt.step()
    assert len(spans.spans) == 3 * 3 and int(pred.num_updates) == 3
    clock.remove()
    pred(torch.randn(4, 8))
    opt.step()
    assert len(spans.spans) == 9 and "_end_step" not in vars(pred) and int(pred.num_updates) == 4
    handle.remove()


def test_host_clock_spans_add_up():
    spans = ts.Spans(torch.device("cpu"))
    for _ in range(2):
        spans.begin()
        time.sleep(0.02)
        spans.end()
    assert spans.total_ms() >= 40


def test_cifar_batches_are_the_trainers_batched_views(monkeypatch):
    """Each step's views come from BatchAugment with the preset's aug section, for the sampler's
    (epoch, index) keys: the same views as BatchAugment applied to those images directly."""
    seen = []
    real = ts.BatchAugment.__call__

    def recording(self, images, epochs, indices):
        seen.append((self.cfg, images.clone(), epochs.clone(), indices.clone()))
        return real(self, images, epochs, indices)

    monkeypatch.setattr(ts.BatchAugment, "__call__", recording)
    case = ts.replace(ts.TOY_CASES[1], dataset_size=16, batch=8)  # 2 batches per epoch
    cfg = ts.case_config(case)
    feed, source = ts.make_feed(case, cfg, torch.device("cpu"))
    assert "BatchAugment" in source and "BatchedViews" in source
    steps = [feed() for _ in range(3)]  # the third batch opens epoch 1
    assert [int(e[0]) for _, _, e, _ in seen] == [0, 0, 1]
    first_epoch = torch.cat([i for _, _, _, i in seen[:2]])
    assert sorted(first_epoch.tolist()) == list(range(16))  # an epoch is a permutation of the dataset
    aug_cfg, images, epochs, indices = seen[2]
    assert aug_cfg == cfg.aug
    dataset = ts.SyntheticImages(16, 3, 16, seed=cfg.seed)
    assert torch.equal(images, dataset.images[indices])
    fresh = ts.BatchAugment(cfg.aug, 16, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), seed=0)
    v1, v2 = fresh(dataset.images[indices], epochs, indices)
    assert torch.equal(steps[2][0], v1) and torch.equal(steps[2][1], v2)
    assert torch.equal(steps[2][2], torch.as_tensor(dataset.targets)[indices])
