"""Users' own data: an unlabeled image folder, downloads where a network exists (and a clear
failure where none does), the kNN bank subset."""

import shutil
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from train import data, linear_eval, pretrain
from train.config import ConfigError, load_config
from train.utils import DistInfo


@pytest.fixture
def unlabeled_folder(tmp_path):
    """``train/`` with 24 PNGs (16 at the top, 8 two levels down), a text file, and no ``val/``."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i in range(24):
        folder = root / "train" / ("" if i < 16 else "trip/day2")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    (root / "train" / "notes.txt").write_text("not an image")
    return root


UNLABELED_RUN = ["data.name=imagefolder", "data.image_size=8", "batch_size=8", "epochs=1", "log_every=1"]


def test_unlabeled_folder_pretrains_without_labels(tmp_path, unlabeled_folder, read_metrics, capsys):
    ds = data.raw_dataset(load_config(None, [*UNLABELED_RUN, f"data.root={unlabeled_folder}"]).data, "pretrain")
    assert len(ds) == 24 and set(ds.targets) == {-1}  # the text file is not an image
    assert [p.rsplit("/", 1)[-1] for p, _ in ds.samples[-8:]] == [f"{i}.png" for i in range(16, 24)]
    final = pretrain.main(load_config(None, [*UNLABELED_RUN, f"data.root={unlabeled_folder}"]), tmp_path / "run")
    assert set(final) == {"erank"}  # no kNN, no probe: there is nothing to score them on
    epochs = [r for r in read_metrics(tmp_path / "run") if "epoch_time" in r]
    assert len(epochs) == 1 and "erank" in epochs[0] and "knn_top1" not in epochs[0] and "probe_loss" not in epochs[0]
    assert "24 unlabeled images" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="data.eval_root"):
        linear_eval.main(tmp_path / "run" / "last.pt", ["eval.epochs=1"])


def test_unlabeled_folder_monitored_on_a_labelled_one(tmp_path, unlabeled_folder, fake_imagefolder):
    run = [*UNLABELED_RUN, f"data.root={unlabeled_folder}", f"data.eval_root={fake_imagefolder}"]
    final = pretrain.main(load_config(None, run), tmp_path / "run")
    assert set(final) == {"knn_top1", "erank"}  # kNN on the labelled folder; no probe (pre-training has no labels)
    res = linear_eval.main(tmp_path / "run" / "last.pt", ["eval.epochs=1", "eval.lr_grid=[0.1]"])
    assert 0 <= res["learned"]["top1"] <= 100


def test_data_keys_that_do_not_fit_together(tmp_path, fake_cifar):
    with pytest.raises(ConfigError, match="data.eval_root"):
        data.check_data(load_config(None, ["data.name=cifar10", f"data.root={fake_cifar}",
                                           f"data.eval_root={fake_cifar}"]).data)
    with pytest.raises(ConfigError, match="cannot download data.name='imagefolder'"):
        data.check_data(load_config(None, ["data.name=imagefolder", f"data.root={tmp_path}", "data.download=true"]).data)


def test_download_without_a_network_fails_at_start_with_a_clear_message(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)  # what torchvision's downloader calls
    timeout = socket.getdefaulttimeout()
    cfg = load_config(None, ["data.name=cifar10", f"data.root={tmp_path / 'cifar'}", "data.download=true"])
    with pytest.raises(ConfigError, match=r"data.download=true: downloading cifar10 into data.root=.*"
                                          r"Name or service not known.*without a network"):
        pretrain.main(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    assert socket.getdefaulttimeout() == timeout  # the download's timeout does not leak


def test_download_fetches_only_what_is_missing(tmp_path, monkeypatch, fake_cifar):
    calls = []

    def fake_download(root):  # stands in for torchvision.datasets.CIFAR10(root, download=True)
        calls.append(root)
        shutil.copytree(fake_cifar / "cifar-10-batches-py", f"{root}/cifar-10-batches-py")

    monkeypatch.setitem(data.DOWNLOADS, "cifar10", fake_download)
    cfg = load_config(None, ["data.name=cifar10", f"data.root={tmp_path / 'new'}", "data.download=true"]).data
    data.check_data(cfg)
    assert calls == [str(tmp_path / "new")] and len(data.raw_dataset(cfg, "train")) == 20
    data.check_data(cfg)  # present now: not fetched again
    assert len(calls) == 1
    without = load_config(None, ["data.name=cifar10", f"data.root={tmp_path / 'none'}"]).data
    with pytest.raises(FileNotFoundError, match="data.download=true"):  # the error says how to get it
        data.check_data(without)


@pytest.mark.parametrize("knn_max_train,expected", [(0, 1437), (100, 100), (5000, 1437)])
def test_knn_bank_is_a_fixed_subset_of_knn_max_train_images(knn_max_train, expected):
    cfg = load_config(None, [f"monitor.knn_max_train={knn_max_train}", "seed=3"])
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    bank = pretrain.load_data(cfg, info)[2].dataset.base  # the kNN bank the trainer evaluates with
    assert len(bank) == expected
    full = data.Digits("train")
    if expected == len(full):
        return
    keep = bank.indices
    assert len(set(keep)) == expected and all(0 <= i < len(full) for i in keep)
    for j in (0, expected - 1):  # the bank's images are those training images
        assert torch.equal(bank[j][0], full[keep[j]][0]) and bank[j][1] == full.targets[keep[j]]
    again = pretrain.load_data(cfg, info)[2].dataset.base.indices
    other = pretrain.load_data(load_config(None, [f"monitor.knn_max_train={knn_max_train}", "seed=4"]), info)
    assert again == keep and other[2].dataset.base.indices != keep  # fixed by the seed
