"""Checkpointing: interrupt-and-resume is bit-identical on CPU; atomic files, keep-last-k,
weights_only loading, fallback from a corrupt newest checkpoint."""

import os
import signal

import pytest
import torch

from train import checkpoint, data
from train.model import BYOL

# 2 epochs x 5 steps on digits; a checkpoint every 4 steps as well as at each epoch end
RUN = ["epochs=2", "batch_size=256", "ckpt.every_steps=4", "ckpt.keep=3", "log_every=2"]
TIMING_KEYS = {"epoch_time", "images_per_s"}


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _assert_same_state(a: dict, b: dict, path=""):
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    else:
        assert a == b, path


def _interrupt_at(monkeypatch, step: int, sig: int):
    """Deliver ``sig`` to this process in the middle of optimizer step ``step`` (1-based),
    as a preemption would: the trainer must finish the step, save and return."""
    original = BYOL.update_target
    calls = {"n": 0}

    def update_target(self, tau):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), sig)
        return original(self, tau)

    monkeypatch.setattr(BYOL, "update_target", update_target)
    return lambda: monkeypatch.setattr(BYOL, "update_target", original)


@pytest.mark.parametrize("stop_step, sig, workers, batched, channels_last",
                         [(3, signal.SIGUSR1, 1, False, False), (3, signal.SIGUSR1, 0, True, False),
                          (5, signal.SIGTERM, 0, True, False), (3, signal.SIGUSR1, 0, True, True)],
                         ids=["mid-epoch-SIGUSR1-per-sample-workers", "mid-epoch-SIGUSR1-batched",
                              "epoch-end-SIGTERM-batched", "mid-epoch-SIGUSR1-batched-channels_last"])
def test_interrupt_and_resume_is_bit_identical(tmp_path, monkeypatch, run_pretrain, read_metrics,
                                               stop_step, sig, workers, batched, channels_last):
    # channels_last: the fashion_mnist preset's layout (NHWC weights and activations)
    run = [*RUN, f"aug.batched={str(batched).lower()}", f"model.channels_last={str(channels_last).lower()}"]
    batches = []  # the batched path (in-memory digits, views made per batch) runs when asked for
    iterate = data.BatchedViews.__iter__
    monkeypatch.setattr(data.BatchedViews, "__iter__", lambda self: batches.append(1) or iterate(self))
    ref = tmp_path / "ref"
    run_pretrain(ref, None, *run)
    assert bool(batches) == batched

    out = tmp_path / "resumed"
    restore = _interrupt_at(monkeypatch, stop_step, sig)
    # the interrupted run may use DataLoader workers: augmentations are seeded per sample
    run_pretrain(out, None, *run, f"data.workers={workers}")
    restore()
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == stop_step
    assert not read_metrics(out)[-1].get("final")
    run_pretrain(out, None, *run)  # same --out: resumes

    a = torch.load(ref / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "probe", "probe_optimizer", "diagnostics", "last_eval", "step"):
        _assert_same_state(a[key], b[key], key)
    conv = next(v for v in a["model"].values() if v.dim() == 4 and v.shape[1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last  # the layout asked for ran
    # predictor state (F̂, W_p, counters) is inside "model"
    assert torch.equal(a["model"]["predictor.corr"], b["model"]["predictor.corr"])
    assert _strip(read_metrics(ref)) == _strip(read_metrics(out))


def _state(v: float) -> dict:
    return {"w": torch.full((3,), v), "step": int(v)}


def test_keep_last_k_and_last_points_to_newest(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save(_state(step), tmp_path, step, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt_000000003.pt", "ckpt_000000004.pt", "last.pt"]  # no temp files left
    state, path = checkpoint.load_latest(tmp_path)
    assert state["step"] == 4 and path.name == "last.pt"


def test_corrupt_newest_falls_back_to_previous_with_warning(tmp_path, capsys):
    for step in (1, 2):
        checkpoint.save(_state(step), tmp_path, step, keep=3)
    newest = tmp_path / "ckpt_000000002.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated write (last.pt is the same file)
    state, path = checkpoint.load_latest(tmp_path)
    assert state["step"] == 1 and path.name == "ckpt_000000001.pt"
    assert "unreadable" in capsys.readouterr().err


def test_load_is_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        checkpoint.load(tmp_path / "evil.pt")


def test_setup_attaches_the_directpredictor_to_the_optimizer_once(tmp_path):
    # issue 28: train_step called attach() on every step; the run's setup does it, before any step
    from train import pretrain
    from train.config import load_config
    from train.utils import init_distributed

    cfg = load_config(None, RUN)
    run = pretrain.setup(cfg, tmp_path / "run", init_distributed(cfg.device))
    predictor = run.learner.bare.predictor
    with pytest.raises(RuntimeError, match="already attached"):  # to the run's optimizer, before any step
        predictor.attach(torch.optim.SGD(predictor.parameters(), lr=0.1))
    assert predictor.attach(run.learner.optimizer) is predictor.attach(run.learner.optimizer)  # the same handle
    assert not (tmp_path / "run").exists()  # setup writes nothing
