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


def test_effective_rank_of_features_that_are_not_finite_is_nan():
    f = torch.randn(50, 8)
    f[3, 2] = float("inf")
    assert math.isnan(monitor.effective_rank(f))  # was a LinAlgError from svdvals


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


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def test_diagnostics_figure_after_the_papers_fig2(tmp_path):
    """A grid with a colour bar; the asymmetry panel only for a W_p that was ever asymmetric."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g)
    corr = a @ a.t()
    built = monitor.Diagnostics()  # W_p = U diag(p) U^T, as DirectPred builds it: symmetric
    s, u = torch.linalg.eigh(corr)
    for epoch in (1, 2, 3):
        built.record(epoch, corr, (u * s.clamp_min(0).sqrt()) @ u.t(), erank=5.0)
    trained = monitor.Diagnostics()  # a gradient-trained W_p: asymmetric
    for epoch in (1, 2, 3):
        trained.record(epoch, corr, torch.randn(6, 6, generator=g), erank=5.0)
    assert not built.asymmetric() and trained.asymmetric()
    fig = built.figure(2.0, "directpred")
    assert not any("asymmetry" in t for t in _titles(fig)) and any("symmetric throughout" in t for t in _titles(fig))
    assert any("eigen-index" in ax.get_ylabel() for ax in fig.axes)  # the colour bar says what colour means
    align = next(ax for ax in fig.axes if ax.get_title().startswith("alignment"))
    assert align.get_ylim()[0] <= 0.0 and align.get_ylim()[1] >= 1.0  # a fixed 0-1 scale, not a zoom on noise
    fig = trained.figure(2.0, "linear")
    assert any(t.startswith("asymmetry") for t in _titles(fig))
    built.plot(tmp_path / "d.png", 2.0, "directpred")
    from PIL import Image

    width, height = Image.open(tmp_path / "d.png").size
    assert 1.3 < width / height < 2.0  # a grid, not a 5.5:1 strip


class _Writer:
    """Records what would go to TensorBoard."""

    def __init__(self):
        self.scalars, self.histograms = {}, {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)

    def add_histogram(self, tag, values, step):
        self.histograms[tag] = (torch.as_tensor(values), step)


def test_directpred_diagnostics_go_to_tensorboard():
    import fastpred

    pred = fastpred.DirectPredictor(4)
    x = torch.randn(16, 4)
    pred(x)
    with pytest.warns(RuntimeWarning):
        pred(torch.full((16, 4), float("nan")))  # skipped: counted in num_skipped
    d = monitor.Diagnostics()
    d.record(1, pred.corr, pred.weight.detach(), erank=3.0)
    writer = _Writer()
    monitor.write_tensorboard(writer, 42, d, pred)
    assert writer.scalars["predictor/num_skipped"] == (1, 42)
    assert writer.scalars["predictor/num_eigh_failures"] == (0, 42)
    expected = torch.linalg.eigvalsh(pred.corr.double()).clamp_min(1e-12).log10()
    got = writer.histograms["predictor/corr_eigenvalues_log10"][0]
    torch.testing.assert_close(got.sort().values, expected.sort().values.to(got.dtype), rtol=1e-5, atol=1e-5)
    assert {"predictor/wp_eigenvalues", "predictor/alignment"} <= set(writer.histograms)
    monitor.write_tensorboard(None, 42, d, pred)  # tensorboard not installed: nothing to do


def test_tensorboard_events_of_a_run(tmp_path, run_pretrain):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_pretrain(tmp_path, None, "epochs=1", "batch_size=256")
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    assert {"predictor/num_skipped", "predictor/num_eigh_failures", "predictor/asymmetry"} <= set(events.Tags()["scalars"])
    assert "predictor/corr_eigenvalues_log10" in events.Tags()["histograms"]
    assert [e.step for e in events.Scalars("predictor/num_skipped")] == [5]


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


def test_a_tensorboard_write_that_fails_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, capfd):
    # issue 20.5: `ulimit -f` hit in the writer's thread: a traceback from that thread, then an error line
    # naming no file that stopped the run
    import errno
    import time

    from tensorboard.summary.writer import record_writer

    from train.metrics_log import MetricsLog

    def too_large(self, data):
        raise OSError(errno.EFBIG, "File too large")

    log = MetricsLog(tmp_path, True)
    monkeypatch.setattr(record_writer.RecordWriter, "write", too_large)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
        time.sleep(0.05)  # the writer's thread meets the error meanwhile
    log.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert err.count("TensorBoard events in") == 1 and str(tmp_path / "tb") in err and "File too large" in err
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5  # every record kept
