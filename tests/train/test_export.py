"""train.export: the backbone as a plain state_dict that loads strictly into torchvision's model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from train import checkpoint, export
from train.config import load_config, to_dict
from train.model import SmallResNet, build_model

ROOT = Path(__file__).resolve().parents[2]


def _checkpoint(tmp_path, overrides, channels=3, step=7) -> tuple[Path, nn.Module]:
    """A checkpoint in train.pretrain's layout whose target backbone differs from the online one."""
    cfg = load_config(None, overrides)
    model = build_model(cfg, channels, seed=0)
    with torch.no_grad():
        for p in (model.target_backbone.parameters() if cfg.model.ema else ()):
            p.add_(0.01 * torch.randn_like(p))
    checkpoint.save({"config": to_dict(cfg), "model": model.state_dict(), "step": step, "epoch": 1}, tmp_path, step, 1)
    return tmp_path / "last.pt", model


def _torchvision(arch: str, in_channels: int, cifar_stem: bool) -> nn.Module:
    """Built here from torchvision by hand, as a user would (not through train.model)."""
    net = getattr(torchvision.models, arch)(weights=None)
    net.fc = nn.Identity()
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


@pytest.mark.parametrize("arch,cifar_stem,channels,data_name,size", [
    ("resnet18", True, 3, "cifar10", 16),
    ("resnet18", False, 1, "digits", 32),
    ("resnet50", False, 3, "stl10", 32),
])
def test_online_and_target_load_strictly_into_torchvision(tmp_path, arch, cifar_stem, channels, data_name, size):
    ckpt, model = _checkpoint(tmp_path, [f"model.arch={arch}", f"model.cifar_stem={str(cifar_stem).lower()}",
                                         f"data.name={data_name}", f"data.image_size={size}"], channels)
    x = torch.randn(2, channels, size, size)
    for target, reference in ((False, model.backbone), (True, model.target_backbone)):
        out = tmp_path / ("target.pt" if target else "online.pt")
        meta = export.export(ckpt, out, target=target)
        net = _torchvision(arch, channels, cifar_stem)
        net.load_state_dict(torch.load(out, weights_only=True), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(net.eval()(x), reference.eval()(x), rtol=0, atol=0)
        written = json.loads(out.with_suffix(".json").read_text())
        assert written == meta
        assert meta["torchvision_model"] == arch and meta["branch"] == ("target" if target else "online")
        assert meta["stem"] == ("cifar" if cifar_stem else "imagenet") and meta["in_channels"] == channels
        assert meta["feature_dim"] == (2048 if arch == "resnet50" else 512) and meta["step"] == 7
    assert not torch.equal(torch.load(tmp_path / "online.pt")["conv1.weight"],
                           torch.load(tmp_path / "target.pt")["conv1.weight"])


def test_small_resnet_is_exported_and_said_not_to_be_torchvision(tmp_path, run_pretrain):
    run_pretrain(tmp_path / "run", None, "epochs=1", "batch_size=256", "monitor.probe=false")
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    meta = export.export(tmp_path / "run" / "last.pt", tmp_path / "small.pt")
    assert meta["torchvision_model"] is None and "not a torchvision model" in meta["note"]
    assert meta["preset"] == "digits" and set(meta["preset_overrides"]) == {"epochs", "batch_size", "monitor.probe"}
    assert meta["step"] == state["step"] == 5
    net = SmallResNet(in_channels=1)
    net.load_state_dict(torch.load(tmp_path / "small.pt", weights_only=True), strict=True)
    online = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    for k, v in net.state_dict().items():
        assert torch.equal(v, online[k]), k


def test_target_of_a_run_without_ema_is_refused(tmp_path):
    ckpt, _ = _checkpoint(tmp_path, ["model.ema=false"], channels=1)
    with pytest.raises(export.ExportError, match="no separate target"):
        export.export(ckpt, tmp_path / "t.pt", target=True)
    assert not (tmp_path / "t.pt").exists()


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for ckpt in (tmp_path / "missing.pt", tmp_path / "junk.pt"):
        r = subprocess.run([sys.executable, "-m", "train.export", "--ckpt", str(ckpt), "--out", str(tmp_path / "b.pt")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert r.stderr.startswith("error: --ckpt") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "b.pt").exists()


@pytest.mark.parametrize("overrides,channels", [
    (["model.arch=resnet18", "data.image_size=32"], 1),
    (["model.arch=resnet18", "model.cifar_stem=true", "data.name=cifar10", "data.image_size=16"], 3),
    ([], 1),
], ids=["resnet18-1ch", "resnet18-cifar", "small"])
def test_the_printed_snippet_runs_as_is(tmp_path, overrides, channels):
    # issue 20.13: the snippet lacked `import torch`
    ckpt, model = _checkpoint(tmp_path, overrides, channels)
    meta = export.export(ckpt, tmp_path / "b.pt")
    scope: dict = {}
    exec(export.load_snippet(meta, tmp_path / "b.pt"), scope)  # a fresh namespace, as a user's script
    x = torch.randn(2, channels, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scope["net"].eval()(x), model.backbone.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("overrides,channels", [([], 1), (["model.arch=resnet18", "data.image_size=32"], 1)],
                         ids=["small", "resnet18"])
def test_the_printed_snippet_runs_as_a_file_from_another_folder(tmp_path, overrides, channels):
    # issue 25, new user 6: saved as a file and run, the digits snippet failed with "No module named 'train'"
    (tmp_path / "run").mkdir()
    ckpt, model = _checkpoint(tmp_path / "run", overrides, channels)
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "train.export", "--ckpt", str(ckpt), "--out", "b.pt"], cwd=work,
                       env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    snippet = r.stdout.split("load it with:\n", 1)[1]
    script = elsewhere / "load.py"
    script.write_text("".join(line[2:] + "\n" for line in snippet.splitlines())
                      + "x = torch.ones(2, %d, 32, 32)\nprint(float(net.eval()(x).double().sum()))\n" % channels)
    r = subprocess.run([sys.executable, str(script)], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        want = float(model.backbone.eval()(torch.ones(2, channels, 32, 32)).double().sum())
    assert float(r.stdout) == pytest.approx(want, rel=1e-6)
