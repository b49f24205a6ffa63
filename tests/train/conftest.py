"""Fixtures for the trainer tests: tiny fake datasets in torchvision's on-disk formats (nothing is
ever downloaded) and a helper that runs a short pre-training in-process."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train import pretrain
from train.config import load_config


@pytest.fixture(autouse=True)
def _one_thread():
    """Trainer tests run with one intra-op thread: their tiny models gain little from more, and on a
    shared 2-core machine oversubscribed OpenMP threads slowed them down by an order of magnitude."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, size, size) uint8 images whose mean colour depends on the label, and the labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    base = (labels[:, None, None, None] * 25).astype(np.int64)
    imgs = np.clip(base + rng.integers(0, 40, size=(n, 3, size, size)), 0, 255).astype(np.uint8)
    return imgs, labels


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory) -> Path:
    """``cifar-10-batches-py`` with 5 x 4 training images and 8 test images."""
    root = tmp_path_factory.mktemp("cifar")
    d = root / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        n = 4
        x, y = _images(n, 32, i)
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": x.reshape(n, 3072), "labels": y.tolist()}, f)
    x, y = _images(8, 32, 9)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": x.reshape(8, 3072), "labels": y.tolist()}, f)
    return root


@pytest.fixture(scope="session")
def fake_stl(tmp_path_factory) -> Path:
    """``stl10_binary`` with 8 train, 8 test and 8 unlabeled 96 x 96 images (column-major, labels 1..10)."""
    root = tmp_path_factory.mktemp("stl")
    d = root / "stl10_binary"
    d.mkdir()
    for part, seed in (("train", 1), ("test", 2), ("unlabeled", 3)):
        x, y = _images(8, 96, seed)
        x.transpose(0, 1, 3, 2).tofile(d / f"{part}_X.bin")
        if part != "unlabeled":
            (y + 1).astype(np.uint8).tofile(d / f"{part}_y.bin")
    return root


@pytest.fixture(scope="session")
def fake_imagefolder(tmp_path_factory) -> Path:
    """``train/`` (2 classes x 4 JPEGs + one unreadable file) and ``val/`` (2 x 2), 40 x 48 px."""
    root = tmp_path_factory.mktemp("imagenet")
    for split, n in (("train", 4), ("val", 2)):
        for c, cls in enumerate(("n01", "n02")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            x, _ = _images(n, 48, 10 * c + n)
            for i in range(n):
                Image.fromarray(x[i].transpose(1, 2, 0)[:40]).save(folder / f"{i}.jpg")
    (root / "train" / "n01" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


def _run_pretrain(out: Path, preset: str | None = None, *overrides: str) -> dict:
    return pretrain.main(load_config(preset, list(overrides)), out)


def _read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def run_pretrain():
    """``run_pretrain(out, preset, "key=value", ...)``: pre-train in this process, return the final evaluation."""
    return _run_pretrain


@pytest.fixture
def read_metrics():
    """``read_metrics(out)``: the records of ``out/metrics.jsonl``."""
    return _read_metrics
