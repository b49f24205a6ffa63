"""Fashion-MNIST's IDX reader and the fashion_mnist preset's data path, on small IDX files written
here by a writer independent of the reader (struct, big-endian, as LeCun's format page says)."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from train import data, fashion_mnist
from train.config import ConfigError, load_config
from train.pretrain import main as pretrain_main

NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0, 0, 0x08 (unsigned byte), ndim, then big-endian int32 sizes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        raw = idx_bytes(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)


def fake_fashion(folder: Path, gz: bool = True, n_train: int = 40, n_test: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    write_split(folder, "train", train, np.arange(n_train) % 10, gz)
    test = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    write_split(folder, "t10k", test, (np.arange(n_test) * 3) % 10, gz)
    return train, test


@pytest.mark.parametrize("gz", [True, False])
def test_reads_idx_gz_and_raw(tmp_path, gz):
    train, test = fake_fashion(tmp_path, gz)
    ds = fashion_mnist.FashionMNIST(str(tmp_path), "train")
    assert len(ds) == 40 and ds.images.shape == (40, 1, 28, 28)
    assert np.array_equal(ds.images[:, 0].numpy(), train)
    assert ds.targets == [i % 10 for i in range(40)]
    img, label = fashion_mnist.FashionMNIST(str(tmp_path), "test")[7]
    assert np.array_equal(img[0].numpy(), test[7]) and label == 21 % 10


def test_torchvision_layout(tmp_path):
    fake_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert len(fashion_mnist.FashionMNIST(str(tmp_path), "test")) == 20


def test_bad_magic_and_truncated_files_fail_clearly(tmp_path):
    images = np.zeros((3, 28, 28), np.uint8)
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(idx_bytes(np.zeros(3, np.uint8)))  # a labels file where images are expected
    with pytest.raises(ValueError, match=r"magic number is 2049, expected 2051"):
        fashion_mnist.read_idx(p, fashion_mnist.IMAGES_MAGIC)
    p.write_bytes(idx_bytes(images)[:-5])
    with pytest.raises(ValueError, match=r"truncated"):
        fashion_mnist.read_idx(p, fashion_mnist.IMAGES_MAGIC)
    p.write_bytes(idx_bytes(images)[:10])  # cut inside the header
    with pytest.raises(ValueError, match=r"truncated IDX header"):
        fashion_mnist.read_idx(p, fashion_mnist.IMAGES_MAGIC)
    gz = tmp_path / "y-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(idx_bytes(images))[:-20])  # a cut gzip stream
    with pytest.raises(ValueError, match=r"y-idx3-ubyte.gz"):
        fashion_mnist.read_idx(gz, fashion_mnist.IMAGES_MAGIC)


def test_missing_files_are_named_with_the_debian_package(tmp_path):
    fake_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\].*dataset-fashion-mnist"):
        fashion_mnist.find_files(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist.*dataset-fashion-mnist"):
        fashion_mnist.find_files(str(tmp_path / "nowhere"))


def test_missing_root_fails_at_start_without_writing(tmp_path):
    cfg = load_config("fashion_mnist", [f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="dataset-fashion-mnist"):
        pretrain_main(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_preset_loads_and_reads_a_fake_root_with_a_balanced_subset(tmp_path):
    fake_fashion(tmp_path, n_train=100)
    cfg = load_config("fashion_mnist", [f"data.root={tmp_path}", "data.train_subset=30"])
    assert cfg.data.name == "fashion_mnist" and cfg.model.arch == "resnet_mini" and cfg.data.image_size == 28
    pre, test = data.raw_dataset(cfg.data, "pretrain"), data.raw_dataset(cfg.data, "test")
    assert len(pre) == 30 and len(test) == 20 and data.num_classes(cfg.data, pre) == 10
    assert np.bincount(pre.targets).tolist() == [3] * 10  # 3 of each class
    again = data.raw_dataset(cfg.data, "train")
    assert again.targets == pre.targets  # fixed subset, not the run's seed


def test_resnet_mini_output():
    import torch

    from train.model import build_backbone

    net, dim = build_backbone("resnet_mini", 1, False)
    assert dim == 64 and net(torch.zeros(2, 1, 28, 28)).shape == (2, 64)
    assert net.stem[0].stride == (2, 2)  # 28 -> 14 at the stem


def test_preset_trains_and_evaluates_on_a_fake_root(tmp_path, run_pretrain):
    from train import linear_eval

    fake_fashion(tmp_path / "data", n_train=40)
    small = [f"data.root={tmp_path / 'data'}", "data.train_subset=0", "epochs=1", "batch_size=20",
             "monitor.knn_k=3", "eval.epochs=1", "eval.lr_grid=[0.1]"]
    final = run_pretrain(tmp_path / "run", "fashion_mnist", *small)
    assert "knn_top1" in final and "erank" in final
    res = linear_eval.main(tmp_path / "run" / "last.pt")
    assert 0 <= res["learned"]["top1"] <= 100 and res["learned"]["erank"] >= 1
    ref = linear_eval.main_reference(load_config("fashion_mnist", small), "raw_pixels", tmp_path / "ref")
    assert ref["raw_pixels"]["erank"] > 1 and (tmp_path / "ref" / "linear_eval.json").exists()


def test_default_root_is_the_debian_folder(tmp_path, monkeypatch):
    fake_fashion(tmp_path)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_ROOT", tmp_path)
    assert fashion_mnist.find_files("")["test"][0] == tmp_path / "t10k-images-idx3-ubyte.gz"
    monkeypatch.setattr(fashion_mnist, "DEBIAN_ROOT", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"no data.root given and .*absent does not exist.*apt-get install"):
        fashion_mnist.find_files("")


def test_train_subset_is_checked(tmp_path):
    fake_fashion(tmp_path)
    with pytest.raises(ValueError, match="data.train_subset=-1"):
        fashion_mnist.FashionMNIST(str(tmp_path), "train", -1)
    cfg = load_config(None, ["data.train_subset=100"])  # digits
    with pytest.raises(ConfigError, match="applies to data.name='fashion_mnist' only"):
        pretrain_main(cfg, tmp_path / "out")
