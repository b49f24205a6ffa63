import json
import math

import pytest
import torch

from train import monitor
from train.config import load_config
from train.model import build_model, predictor_matrix


def test_knn_on_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4) * 5
    y = torch.arange(200) % 4
    f = centers[y] + 0.1 * torch.randn(200, 4, generator=g)
    assert monitor.knn_top1(f[:150], y[:150], f[150:], y[150:], k=5, t=0.1, num_classes=4) == 100.0
    # unlabeled bank entries (-1) never vote
    y_bank = y[:150].clone()
    y_bank[:100] = -1
    assert monitor.knn_top1(f[:150], y_bank, f[150:], y[150:], k=5, t=0.1, num_classes=4) == 100.0


def test_effective_rank_extremes():
    g = torch.Generator().manual_seed(0)
    line = torch.randn(500, 1, generator=g) * torch.randn(1, 16, generator=g)
    assert monitor.effective_rank(line) == pytest.approx(1.0, abs=1e-3)
    iso = torch.randn(5000, 16, generator=g)
    assert monitor.effective_rank(iso) > 15.0
    assert monitor.collapse_message(1.0, 2.0) is not None and monitor.collapse_message(10.0, 2.0) is None


def test_diagnostics_alignment_and_asymmetry(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g)
    corr = a @ a.t()
    d = monitor.Diagnostics()
    d.record(1, corr, corr, erank=5.0)  # W_p = F̂: aligned and symmetric
    d.record(2, corr, torch.randn(6, 6, generator=g), erank=4.0)  # random W: not aligned, asymmetric
    d.record(3, corr, None, erank=math.nan)  # an MLP predictor has no W_p
    h = d.history
    assert torch.allclose(h["align"][0], torch.ones(6), atol=1e-5)
    assert h["asym"][0] == pytest.approx(0.0, abs=1e-6) and h["asym"][1] > 0.5
    assert (h["align"][1].abs() < 0.999).any()
    assert torch.all(h["corr_eig"][0][:-1] >= h["corr_eig"][0][1:])  # largest first
    d.plot(tmp_path / "d.png", 2.0, "test")
    d.to_json(tmp_path / "d.json")
    assert (tmp_path / "d.png").stat().st_size > 10_000
    assert len(json.loads((tmp_path / "d.json").read_text())["epoch"]) == 3


@pytest.mark.parametrize("name", ["directpred", "linear", "mlp", "none"])
def test_predictor_choices_forward(name):
    cfg = load_config(None, [f"predictor.name={name}", "predictor.symmetric=true"])
    model = build_model(cfg, 1, seed=0)
    x = torch.randn(8, 1, 8, 8)
    loss, h, z = model(x, x.flip(-1))
    loss.backward()
    assert h.shape == (8, model.feat_dim) and z.shape == (16, cfg.model.proj_dim)
    w = predictor_matrix(model.predictor)
    assert (w is None) == (name in ("mlp", "none"))
    if name == "linear":
        assert torch.equal(w, w.t())  # symmetric option: (W + W^T) / 2
    assert model.backbone.stem[0].weight.grad is not None


def test_ema_target_and_stop_grad_switches():
    cfg = load_config(None, ["model.ema=false", "model.stop_grad=false"])
    model = build_model(cfg, 1, seed=0)
    assert not hasattr(model, "target_backbone")  # the online network is its own target
    with pytest.raises(ValueError, match="stop_grad"):
        build_model(load_config(None, ["model.stop_grad=false"]), 1, seed=0)
    cfg = load_config(None, ["model.symmetric_loss=false"])
    model = build_model(cfg, 1, seed=0)
    before = [p.clone() for p in model.target_backbone.parameters()]
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    model.update_target(0.75)
    for b, t, o in zip(before, model.target_backbone.parameters(), model.backbone.parameters()):
        assert torch.allclose(t, 0.75 * b + 0.25 * o)
