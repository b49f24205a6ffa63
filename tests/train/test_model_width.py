"""``model.width``: the stage widths of resnet_small / resnet_mini times k (WideResNet's k), so the
linear probe sees more features; width 1 is the network the presets were calibrated with."""

import pytest
import torch

from train import export, linear_eval
from train.config import ConfigError, diff, from_saved, load_config, to_dict
from train.model import SmallResNet, build_backbone

from test_fashion_mnist import fake_fashion  # tests/train is on sys.path (rootdir-relative, no packages)


def conv_widths(net: torch.nn.Module) -> list[int]:
    return [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize("arch, base, stem_stride",
                         [("resnet_mini", (16, 32, 64), 2), ("resnet_small", (32, 64, 128), 1)])
@pytest.mark.parametrize("k", [1, 3])
def test_width_multiplies_every_stage(arch, base, stem_stride, k):
    net, dim = build_backbone(arch, 1, False, width=k)
    # the reference: the same net written with its widths spelled out
    ref = SmallResNet(1, tuple(k * w for w in base), stem_stride=stem_stride)
    assert dim == base[-1] * k and conv_widths(net) == conv_widths(ref)
    assert {n: p.shape for n, p in net.state_dict().items()} == {n: p.shape for n, p in ref.state_dict().items()}
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, base[-1] * k)
    # stage widths, written out: stem, then per stage conv1/conv2 (and the 1x1 shortcut between stages)
    assert sorted(set(conv_widths(net))) == sorted({k * w for w in base})


def test_width_key_defaults_to_the_calibrated_network_and_refuses_bad_values():
    cfg = load_config("fashion_mnist")
    assert cfg.model.width == 1
    old = to_dict(cfg)
    del old["model"]["width"]  # a run recorded before the key existed ran at width 1
    assert from_saved(old).model.width == 1 and not diff(from_saved(old), cfg)
    with pytest.raises(ConfigError, match="model.width"):
        load_config("fashion_mnist", ["model.width=0"])
    with pytest.raises(ValueError, match="model.width=2"):
        build_backbone("resnet18", 3, True, width=2)


def test_a_wide_run_trains_evaluates_and_exports(tmp_path, run_pretrain):
    fake_fashion(tmp_path / "data", n_train=40)
    small = [f"data.root={tmp_path / 'data'}", "data.train_subset=0", "epochs=1", "batch_size=20", "model.width=2",
             "monitor.knn_k=3", "monitor.probe=false", "eval.epochs=1", "eval.lr_grid=[0.1]"]
    run_pretrain(tmp_path / "run", "fashion_mnist", *small)
    res = linear_eval.main(tmp_path / "run" / "last.pt")
    assert 0 <= res["learned"]["top1"] <= 100
    meta = export.export(tmp_path / "run" / "last.pt", tmp_path / "wide.pt")
    assert meta["feature_dim"] == 128
    net, _ = build_backbone("resnet_mini", 1, False, width=2)
    net.load_state_dict(torch.load(tmp_path / "wide.pt", weights_only=True), strict=True)


def test_the_wide_preset_trains_and_its_grid_has_the_issues_rows(tmp_path, run_pretrain):
    from train.study import load_grid

    cfg = load_config("fashion_mnist_wide")
    assert cfg.model.arch == "resnet_mini" and cfg.model.width == 4 and cfg.data.train_subset == 0
    grid = load_grid("fm_wide")
    assert grid.preset == "fashion_mnist_wide" and grid.seeds >= 3
    assert {r.name for r in grid.rows} == {
        "random_init", "raw_pixels", "directpred", "no_predictor", "sgd_linear_sym_noema", "no_stop_grad", "mlp",
        "isoloss", "sgd_linear", "dp_power1", "directpred_noema", "isoloss_noema"}
    assert grid.row("directpred").expect == {"above": "raw_pixels"}  # the issue's question, read paired
    fake_fashion(tmp_path / "data", n_train=40)
    final = run_pretrain(tmp_path / "run", "fashion_mnist_wide", f"data.root={tmp_path / 'data'}", "epochs=1",
                         "batch_size=20", "monitor.knn_k=3")
    assert final["erank"] >= 1 and 0 <= final["knn_top1"] <= 100
