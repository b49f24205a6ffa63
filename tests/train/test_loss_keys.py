"""The trainer's ``loss.*`` keys: choices, refusals where IsoLoss is undefined, the loss the model
computes, --help / --print-config, the checkpoint's config and exact resume."""

import signal

import pytest
import torch
import yaml

from fastpred.losses import FORMS, isoloss
from train import config_checks, pretrain
from train.config import ConfigError, load_config
from train.model import build_model

from test_resume import _assert_same_state, _interrupt_at  # tests/train is on sys.path (no packages)


def test_defaults_are_byol_cosine_and_the_choices_match_the_library():
    cfg = load_config(None)
    assert (cfg.loss.name, cfg.loss.form) == ("byol", "cosine")
    assert config_checks.LOSS_FORMS == FORMS


@pytest.mark.parametrize("override, needle", [
    ("loss.name=simclr", "loss.name='simclr'"),
    ("loss.form=l1", "loss.form='l1'"),
    ("loss.nme=byol", "unknown config key 'loss.nme'"),
])
def test_bad_loss_keys_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, needle", [
    (["predictor.name=linear"], "predictor.name=directpred, got 'linear'"),
    (["predictor.name=mlp"], "predictor.name=directpred, got 'mlp'"),
    (["predictor.name=none"], "predictor.name=directpred, got 'none'"),
    (["predictor.freq=5"], "predictor.freq=1, got 5"),
    (["model.ema=false", "model.stop_grad=false"], "model.stop_grad=true"),
])
def test_isoloss_is_refused_where_undefined(overrides, needle):
    load_config(None, overrides)  # fine with the BYOL loss
    with pytest.raises(ConfigError, match=needle) as e:
        load_config(None, ["loss.name=isoloss", *overrides])
    assert "sends no gradient to W_p" in str(e.value) or "stop-gradient" in str(e.value)


@pytest.mark.parametrize("form", FORMS)
def test_the_model_computes_the_chosen_loss(form):
    """Same network, same batch: IsoLoss reports the BYOL value but sends z the gradient of p."""
    torch.manual_seed(0)
    v1, v2 = torch.randn(16, 1, 8, 8), torch.randn(16, 1, 8, 8)
    grads, values = {}, {}
    for name in ("byol", "isoloss"):
        model = build_model(load_config(None, [f"loss.name={name}", f"loss.form={form}"]), 1, seed=0)
        with torch.no_grad():  # a symmetric PSD W_p far from a multiple of I, as after a rebuild
            model.predictor.weight.copy_(torch.diag(torch.linspace(0.2, 1.5, 64)))
        loss, _, _ = model(v1, v2)
        loss.backward()
        values[name] = loss.item()
        grads[name] = model.projector[-1].weight.grad.clone()
    assert values["isoloss"] == pytest.approx(values["byol"], rel=1e-6)
    assert (grads["isoloss"] - grads["byol"]).abs().max() > 1e-3 * grads["byol"].abs().max()


def test_pair_loss_is_fastpred_isoloss():
    model = build_model(load_config(None, ["loss.name=isoloss", "loss.form=euclidean"]), 1, seed=0)
    z = torch.randn(5, 64, requires_grad=True)
    p, t = torch.randn(5, 64), torch.randn(5, 64)
    model.pair_loss(z, p, t).backward()
    ref = z.detach().clone().requires_grad_()
    isoloss(ref, p, t, "euclidean").backward()
    assert torch.equal(z.grad, ref.grad)


def test_help_and_print_config_show_the_loss_keys(capsys):
    assert "loss.: name form" in pretrain.get_args_parser().format_help()
    pretrain.cli(["--print-config", "loss.name=isoloss", "loss.form=euclidean"])
    out = capsys.readouterr().out
    assert "loss:\n  name: isoloss\n  form: euclidean\n" in out


def test_run_start_line_names_the_loss(tmp_path, capsys, run_pretrain):
    run_pretrain(tmp_path / "run", None, "epochs=1", "batch_size=256", "ckpt.every_steps=0",
                 "monitor.knn_max_train=200", "loss.name=isoloss")
    banner = [x for x in capsys.readouterr().out.splitlines() if x.startswith("pre-training ")]
    assert len(banner) == 1 and " + directpred predictor, isoloss loss (cosine) on " in banner[0], banner


RUN = ["epochs=2", "batch_size=256", "ckpt.every_steps=4", "ckpt.keep=3", "log_every=2", "loss.name=isoloss"]


@pytest.mark.parametrize("partitions", [0, 2])
def test_isoloss_run_resumes_bit_identical_and_saves_its_config(tmp_path, monkeypatch, run_pretrain, read_metrics,
                                                                partitions):
    run = [*RUN, f"predictor.partitions={partitions}"]  # partitions: W_p per half-space, still set from F
    ref = tmp_path / "ref"
    run_pretrain(ref, None, *run)
    out = tmp_path / "resumed"
    restore = _interrupt_at(monkeypatch, 3, signal.SIGUSR1)
    run_pretrain(out, None, *run)
    restore()
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 3 and state["config"]["loss"] == {"name": "isoloss", "form": "cosine"}
    assert state["model"]["predictor.weight"].shape[0] == (2 * partitions or 64)
    run_pretrain(out, None, *run)
    a = torch.load(ref / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "last_eval", "step"):
        _assert_same_state(a[key], b[key], key)
    assert yaml.safe_load((out / "config.yaml").read_text())["loss"] == {"name": "isoloss", "form": "cosine"}


def test_isoloss_under_two_gloo_ranks(tmp_path):
    """DDP: IsoLoss's gradient reaches the online network on both ranks alike; F and W_p stay shared."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.pretrain",
           "--out", str(out), "epochs=1", "batch_size=256", "ckpt.every_steps=0", "loss.name=isoloss"]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "replicas consistent across 2 ranks" in log, log[-4000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["final"] is True and lines[-1]["step"] == 5
    assert all(0 <= x["loss"] <= 8 for x in lines if "loss" in x)  # two pairs of 2 - 2 cos
