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
        assert ("augment_ms" in r) == case.startswith("cifar10")
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
    assert len(spans.spans) == 9 and "step" not in vars(pred) and int(pred.num_updates) == 4
    handle.remove()


def test_host_clock_spans_add_up():
    spans = ts.Spans(torch.device("cpu"))
    for _ in range(2):
        spans.begin()
        time.sleep(0.02)
        spans.end()
    assert spans.total_ms() >= 40


def test_stand_in_views_are_padded_crops_flipped_or_not():
    cfg = load_config("cifar10_r18", ["aug.normalize=false"])
    augment = ts.flip_crop_stand_in(cfg, torch.device("cpu"))
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    v1, _ = augment(images, torch.arange(16), 0)
    padded = torch.nn.functional.pad(images.float() / 255, (4, 4, 4, 4))
    flips = 0
    for img, view in zip(padded, v1):
        windows = [(img[:, y:y + 32, x:x + 32], f) for y in range(9) for x in range(9) for f in (False, True)]
        match = [f for w, f in windows if torch.equal(w.flip(-1) if f else w, view)]
        assert match, "a view is not a window of the zero-padded image"
        flips += match[0]
    assert 0 < flips < 16  # flip probability 0.5 over 16 samples


def test_batched_augmentation_gets_each_samples_epoch_and_index():
    pytest.importorskip("train.batch_augment")
    cfg = load_config("cifar10_r18", [])
    augment = ts.batched_augment(cfg, torch.device("cpu"))
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    index = torch.tensor([10, 11, 12, 13, 14, 15])
    v1, v2 = augment(images, index, 2)
    # sample 12 in another batch, at another position: the same views (drawn from its index, not its slot)
    w1, w2 = augment(images[[2, 0]], torch.tensor([12, 10]), 2)
    assert torch.equal(w1[0], v1[2]) and torch.equal(w2[0], v2[2])
    e1, _ = augment(images, index, 3)  # another epoch: other views
    assert not torch.equal(e1, v1)
