"""A checkpoint written before the configuration moved to OmegaConf (issue 28) still resumes, and
ends where the run that wrote it ended.

``fixtures/pre_omegaconf_step3.pt`` is step 3 (epoch 1, batch 3) of this 2-epoch digits run, made
with the trainer of c82cbbb (the hand-written config.py)::

    python -m train.pretrain --out DIR epochs=2 batch_size=256 ckpt.every_steps=3 ckpt.keep=5 log_every=2 \\
        model.arch=resnet_mini model.proj_hidden=32 model.proj_dim=16 monitor.knn_max_train=200 monitor.probe=false

``FINAL`` is what that same code wrote at the end of the run (step 10), both uninterrupted and resumed
from the fixture alone: the SHA-256 of every tensor of the network, the optimizer and ``diag_corr``.
The configuration change alone kept that digest bit-identical (checked when the fixture was made).
Since then the predictor accumulates a step's x^T x in place (``addmm_``, issue 26), which rounds
the sum of two per-view calls differently in float32's last bits, so the continuation is held to
the old run's final metrics within that rounding, not to its digest; that a resumed run is
bit-identical to an uninterrupted one under today's arithmetic is tested in ``test_resume.py``.
"""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from train import pretrain
from train.config import flat, from_saved, load_config

FIXTURE = Path(__file__).parent / "fixtures" / "pre_omegaconf_step3.pt"
RUN = ["epochs=2", "batch_size=256", "ckpt.every_steps=3", "ckpt.keep=5", "log_every=2", "model.arch=resnet_mini",
       "model.proj_hidden=32", "model.proj_dim=16", "monitor.knn_max_train=200", "monitor.probe=false"]
FINAL = {"step": 10, "epoch": 2, "knn_top1": 67.22222222222223, "erank": 38.498208490779234,
         "tensors": 166, "sha256": "161daeb9f84f48ff4b0d6269785af53196173f288d80dbd14b2ae2af6a02c2d4"}


def _tensors(obj, path=""):
    """(path, tensor) for every tensor in nested dicts and lists, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]")


def _digest(state: dict) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    for p, t in _tensors({k: state[k] for k in ("model", "optimizer", "diag_corr")}):
        h.update(p.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
        n += 1
    return n, h.hexdigest()


def test_the_old_checkpoints_configuration_reads_as_the_same_run():
    state = torch.load(FIXTURE, weights_only=True)
    assert flat(from_saved(state["config"])) == flat(load_config(None, RUN))


def test_an_old_checkpoint_resumes_and_ends_where_the_old_run_ended(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(FIXTURE, out / "ckpt_000000003.pt")
    pretrain.main(load_config(None, RUN), out)
    said = capsys.readouterr()
    assert "resumed from" in said.out and "different configuration" not in said.out + said.err
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["step"], state["epoch"]) == (FINAL["step"], FINAL["epoch"])
    assert state["last_eval"]["knn_top1"] == pytest.approx(FINAL["knn_top1"], abs=1.0)  # at most 1 of 180 images
    assert state["last_eval"]["erank"] == pytest.approx(FINAL["erank"], rel=1e-5)
    assert _digest(state)[0] == FINAL["tensors"]  # the same network, optimizer and diag_corr tensors
