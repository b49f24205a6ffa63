"""Every preset builds and trains 2 steps at tiny scale on generated data; the outputs exist."""

import json

import pytest
import torch

from train import linear_eval

# what each preset needs to run 2 steps in seconds: its data, tiny images, one epoch
TINY = {
    "digits": ("digits", ["batch_size=512"]),  # 1437 images // 512 = 2 steps
    "cifar10_r18": ("cifar", ["batch_size=8", "data.image_size=16"]),  # 20 images
    "cifar10_r18_isoloss": ("cifar", ["batch_size=8", "data.image_size=16", "amp=none", "model.proj_hidden=64"]),
    "stl10_r18": ("stl", ["batch_size=8", "data.image_size=32"]),  # 8 train + 8 unlabeled
    "imagenet_r50_300ep": ("imagefolder", ["batch_size=4", "data.image_size=32"]),  # 8 JPEGs + 1 broken
    "imagenet_r50_60ep": ("imagefolder", ["batch_size=4", "data.image_size=32"]),
}
COMMON = ["epochs=1", "data.workers=0", "monitor.knn_k=3", "ckpt.every_steps=1"]


@pytest.mark.parametrize("preset", list(TINY))
def test_preset_trains_two_steps(preset, request, tmp_path, run_pretrain, read_metrics):
    data, extra = TINY[preset]
    overrides = COMMON + extra
    if data != "digits":
        overrides.append(f"data.root={request.getfixturevalue('fake_' + data)}")
    out = tmp_path / preset
    res = run_pretrain(out, preset, *overrides)
    metrics = read_metrics(out)
    final = metrics[-1]
    assert final["final"] is True and final["step"] == 2
    assert 0.0 <= final["knn_top1"] <= 100.0 and "probe_top1" in final and "erank" in final
    assert any("epoch_time" in m for m in metrics) and any("lr" in m for m in metrics)
    assert (out / "config.yaml").exists() and (out / "diagnostics.png").exists()
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 2 and state["epoch"] == 1
    assert len(list(out.glob("ckpt_*.pt"))) == min(2, state["config"]["ckpt"]["keep"])  # steps 1 and 2
    assert all(final[k] == v for k, v in res.items())
    if data == "imagefolder":  # the broken JPEG was met (once per epoch at most) and counted, not fatal
        assert final["skipped_images"] <= 1
        assert (out / "metrics.jsonl").read_text().count('"skipped_images"') >= 1


def test_imagefolder_unreadable_image_is_skipped_and_counted(fake_imagefolder):
    from train import data
    from train.augment import eval_transform
    from train.config import DataConfig

    cfg = DataConfig(name="imagefolder", root=str(fake_imagefolder), image_size=16)
    raw = data.raw_dataset(cfg, "train")
    broken = [i for i, (p, _) in enumerate(raw.samples) if p.endswith("broken.jpg")][0]
    v = data.Views(raw, [eval_transform(16, 16, (0.5,) * 3, (0.5,) * 3, True)])
    img, label, skipped = v[broken]
    assert skipped == 1 and img.shape == (3, 16, 16)
    assert sum(v[i][2] for i in range(len(v))) == 1


def test_linear_eval_augmented_path(fake_cifar, tmp_path, run_pretrain):
    out = tmp_path / "c"
    run_pretrain(out, "cifar10_r18", *COMMON, "batch_size=8", "data.image_size=16", f"data.root={fake_cifar}")
    res = linear_eval.main(out / "last.pt", ["eval.epochs=1", "eval.batch_size=8", "eval.lr_grid=[0.1, 0.5]",
                                             "eval.val_fraction=0.5"], random_init_baseline=True)
    for k in ("learned", "random_init"):
        assert 0.0 <= res[k]["top1"] <= res[k]["top5"] <= 100.0
        assert res[k]["lr"] in (0.1, 0.5) and set(res[k]["val_top1"]) == {"0.1", "0.5"}
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert "linear_eval" in json.loads(lines[-1])
    # issue 20.13: the pre-training's record stays the only final one
    assert [json.loads(x).get("final", False) for x in lines].count(True) == 1
    assert json.loads((out / "linear_eval.json").read_text())["learned"]["top1"] == res["learned"]["top1"]
