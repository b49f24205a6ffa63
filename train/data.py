"""Datasets, the resumable sampler and the loaders.

Built in: scikit-learn's handwritten digits (real 8x8 images, no download). Fashion-MNIST from its
IDX files (:mod:`train.fashion_mnist`; Debian's package by default). From ``data.root``:
CIFAR-10 and STL-10 in torchvision's on-disk format (``cifar-10-batches-py/``, ``stl10_binary/``;
with ``data.download=true`` torchvision fetches what is missing, Fashion-MNIST too), an
ImageFolder tree with ``train/`` and ``val/`` (ImageNet), or a folder with ``train/`` alone: its
images, at any depth, are pre-trained on without labels, with kNN monitoring and linear evaluation
on the labelled ImageFolder ``data.eval_root`` when one is given, and only the effective rank
otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import socket
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchvision import datasets, tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from . import fashion_mnist
from .config import Config, ConfigError, DataConfig
from .utils import log, warn

# errors PIL and the decoders raise on a truncated or corrupt file (UnidentifiedImageError is an OSError)
UNREADABLE = (OSError, ValueError, SyntaxError)


@dataclass(frozen=True)
class DataSpec:
    """Per-dataset constants: normalisation, classes, channels, evaluation resize."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    channels: int
    resize_ratio: float = 1.0  # evaluation resize = round(image_size * ratio), then centre crop


SPECS = {
    "digits": DataSpec((0.3053,), (0.3760,), 10, 1),
    "fashion_mnist": DataSpec((0.2860,), (0.3530,), 10, 1),
    "cifar10": DataSpec((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10, 3),
    "stl10": DataSpec((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), 10, 3),
    "imagefolder": DataSpec((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0, 3, 256 / 224),
}


def spec(cfg: DataConfig, num_classes: int | None = None) -> DataSpec:
    if cfg.name not in SPECS:
        raise ValueError(f"data.name={cfg.name!r}: expected one of {', '.join(SPECS)}")
    s = SPECS[cfg.name]
    return s if num_classes is None else DataSpec(s.mean, s.std, num_classes, s.channels, s.resize_ratio)


# ----------------------------------------------------------------------------- raw datasets
# Each returns (image, label) from __getitem__ and has .targets; label -1 means unlabeled.


class Digits(Dataset):
    """scikit-learn's 1797 handwritten digits (8x8, 17 grey levels) as uint8 images.

    A fixed stratified split (not the run's seed: the split is part of the data): 1437 train, 360 test.
    """

    def __init__(self, split: str):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        images = np.clip(np.rint(d.images * (255 / 16)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
        tr, te = train_test_split(np.arange(len(images)), test_size=0.2, random_state=0, stratify=d.target)
        idx = {"train": tr, "test": te}[split]
        self.images = torch.from_numpy(images[idx]).unsqueeze(1)  # (N, 1, 8, 8)
        self.targets = [int(t) for t in d.target[idx]]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return tv_tensors.Image(self.images[i]), self.targets[i]


class CIFAR10Folder(Dataset):
    """CIFAR-10 from torchvision's folder ``root/cifar-10-batches-py`` (pickled batches, read as is)."""

    FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

    def __init__(self, root: str, split: str):
        base = Path(root) / "cifar-10-batches-py"
        data, labels = [], []
        for name in self.FILES[split]:
            with open(base / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry.get("labels", entry.get("fine_labels", [])))
        self.images = torch.from_numpy(np.concatenate(data))  # (N, 3, 32, 32)
        self.targets = [int(t) for t in labels]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return tv_tensors.Image(self.images[i]), self.targets[i]


class STL10Folder(Dataset):
    """STL-10 from torchvision's folder ``root/stl10_binary`` (memory-mapped, 96x96).

    ``split``: train | test | unlabeled | train+unlabeled (DirectPred pre-trains on the last).
    """

    def __init__(self, root: str, split: str):
        base = Path(root) / "stl10_binary"
        parts = {"train+unlabeled": ["train", "unlabeled"]}.get(split, [split])
        self.arrays, self.targets = [], []
        for part in parts:
            x = np.memmap(base / f"{part}_X.bin", dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)
            self.arrays.append(x)
            if part == "unlabeled":
                self.targets += [-1] * len(x)
            else:
                y = np.fromfile(base / f"{part}_y.bin", dtype=np.uint8).astype(np.int64) - 1  # labels are 1..10
                self.targets += y.tolist()
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        img = np.ascontiguousarray(self.arrays[k][i - self.offsets[k]].transpose(0, 2, 1))  # stored column-major
        return tv_tensors.Image(torch.from_numpy(img)), self.targets[i]

    def images_at(self, indices: torch.Tensor) -> torch.Tensor:
        idx = indices.numpy()
        out = np.empty((len(idx), 3, 96, 96), dtype=np.uint8)
        part = np.searchsorted(self.offsets, idx, side="right") - 1
        for k, arr in enumerate(self.arrays):
            sel = np.flatnonzero(part == k)
            if len(sel):  # a memory-mapped read of these images only, in sorted order
                order = np.argsort(idx[sel])
                rows = arr[idx[sel][order] - self.offsets[k]]
                out[sel[order]] = rows.transpose(0, 1, 3, 2)  # stored column-major
        return torch.from_numpy(out)


class UnlabeledFolder(Dataset):
    """Every image file under ``folder``, at any depth, in sorted order, each with label -1."""

    def __init__(self, folder: str | Path):
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if not files:
            raise FileNotFoundError(f"{folder} holds no image files ({' '.join(IMG_EXTENSIONS)})")
        self.samples = [(str(p), -1) for p in files]  # ImageFolder's attribute: Views names unreadable files
        self.targets = [-1] * len(files)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return default_loader(self.samples[i][0]), -1


def unlabeled(cfg: DataConfig) -> bool:
    """An image folder with ``train/`` and no ``val/``: pre-training without labels (no online probe)."""
    return cfg.name == "imagefolder" and not (Path(cfg.root) / "val").is_dir()


def has_labels(cfg: DataConfig) -> bool:
    """Whether labelled train and test sets exist (for kNN monitoring and linear evaluation)."""
    return not unlabeled(cfg) or bool(cfg.eval_root)


# torchvision's downloaders, each fetching the whole dataset into the root folder given
DOWNLOADS: dict[str, Callable[[str], Any]] = {
    "cifar10": lambda root: datasets.CIFAR10(root, train=True, download=True),
    "stl10": lambda root: datasets.STL10(root, split="train", download=True),
    "fashion_mnist": lambda root: datasets.FashionMNIST(root, train=True, download=True),  # all four files
}


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """torchvision opens URLs without a timeout: a silent network would hang instead of failing."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def download(cfg: DataConfig, timeout: float = 60.0) -> None:
    """Let torchvision download ``cfg.name`` into ``data.root``. Processes on one machine (torchrun)
    take turns on a lock of the folder: the first downloads, the others find the files.

    Raises:
        ConfigError: the download failed (no network, say), naming the dataset, the folder and why.
    """
    root = Path(cfg.root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root, os.O_RDONLY)
    except OSError as e:
        raise ConfigError(f"data.download=true: cannot use data.root={cfg.root!r} ({e})") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with _socket_timeout(timeout):
            DOWNLOADS[cfg.name](str(root))
    except (OSError, RuntimeError) as e:  # URLError and timeouts are OSErrors; a bad checksum a RuntimeError
        raise ConfigError(f"data.download=true: downloading {cfg.name} into data.root={cfg.root!r} failed ({e}); "
                          f"without a network, fetch it elsewhere and copy it into data.root "
                          f"(torchvision's layout: {_required_files(cfg)[0].parent.name}/)") from e
    finally:
        os.close(fd)


def _required_files(cfg: DataConfig) -> list[Path]:
    root = Path(cfg.root)
    if cfg.name == "cifar10":
        return [root / "cifar-10-batches-py" / n for n in CIFAR10Folder.FILES["train"] + CIFAR10Folder.FILES["test"]]
    if cfg.name == "stl10":
        return [root / "stl10_binary" / f"{n}.bin" for n in ("train_X", "train_y", "test_X", "test_y", "unlabeled_X")]
    if cfg.name == "fashion_mnist":  # torchvision's download layout (the reader also takes the files in root)
        return [root / "FashionMNIST" / "raw" / n for names in fashion_mnist.FILES.values() for n in names]
    if cfg.name == "imagefolder":
        labelled = [Path(cfg.eval_root) / "train", Path(cfg.eval_root) / "val"] if cfg.eval_root else []
        return [root / "train"] + labelled
    return []


def check_data(cfg: DataConfig) -> None:
    """Fail at start, naming ``data.root`` and what is missing; download first when asked to.

    Raises:
        FileNotFoundError: a missing folder or file, named.
        ConfigError: an impossible combination of data keys, or a failed download.
    """
    spec(cfg)
    if cfg.eval_root and not unlabeled(cfg):
        raise ConfigError(f"data.eval_root is for data.name=imagefolder with an unlabeled data.root (train/ only); "
                          f"here data.name={cfg.name!r}, data.root={cfg.root!r}")
    if cfg.download and cfg.name not in DOWNLOADS and cfg.name != "digits":
        raise ConfigError(f"data.download=true: torchvision cannot download data.name={cfg.name!r} "
                          f"(downloadable: {', '.join(DOWNLOADS)})")
    if cfg.train_subset and cfg.name != "fashion_mnist":
        raise ValueError(f"data.train_subset={cfg.train_subset} applies to data.name='fashion_mnist' only")
    if cfg.name == "digits":
        return
    if cfg.name == "fashion_mnist":  # the Debian folder by default; explains how to get the files
        try:
            fashion_mnist.find_files(cfg.root)
        except FileNotFoundError:
            if not (cfg.download and cfg.root):
                raise
            download(cfg)  # into torchvision's FashionMNIST/raw/, which the reader also takes
            fashion_mnist.find_files(cfg.root)
        return
    if not cfg.root:
        hint = ""
        if cfg.name in DOWNLOADS:
            hint = " to download into" if cfg.download else " (or data.download=true where there is a network)"
        raise FileNotFoundError(f"data.name={cfg.name!r} needs data.root=<folder>{hint}")
    if cfg.download and any(not p.exists() for p in _required_files(cfg)):
        download(cfg)
    hint = "; data.download=true fetches it where there is a network" if cfg.name in DOWNLOADS else ""
    if not Path(cfg.root).is_dir():
        raise FileNotFoundError(f"data.root={cfg.root!r} does not exist or is not a folder{hint}")
    missing = [str(p) for p in _required_files(cfg) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"data.root={cfg.root!r} lacks {', '.join(missing)} "
                                f"(expected torchvision's on-disk layout for {cfg.name}{hint})")


def raw_dataset(cfg: DataConfig, split: str) -> Dataset:
    """``split``: pretrain (what SSL trains on), train (labeled train set), test."""
    check_data(cfg)
    if cfg.name == "digits":
        return Digits("test" if split == "test" else "train")
    if cfg.name == "fashion_mnist":
        return (fashion_mnist.FashionMNIST(cfg.root, "test") if split == "test"
                else fashion_mnist.FashionMNIST(cfg.root, "train", cfg.train_subset))
    if cfg.name == "cifar10":
        return CIFAR10Folder(cfg.root, "test" if split == "test" else "train")
    if cfg.name == "stl10":
        return STL10Folder(cfg.root, {"pretrain": "train+unlabeled"}.get(split, split))
    if split == "pretrain" and unlabeled(cfg):
        return UnlabeledFolder(Path(cfg.root) / "train")
    if not has_labels(cfg):
        raise FileNotFoundError(f"data.root={cfg.root!r} has train/ only (unlabeled images): the {split} split needs "
                                "labels; set data.eval_root=<ImageFolder with train/ and val/>")
    base = Path(cfg.eval_root) if unlabeled(cfg) else Path(cfg.root)
    folder = base / ("val" if split == "test" else "train")
    try:
        return datasets.ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / no images
        raise FileNotFoundError(f"data.root={cfg.root!r}: {folder} is not a usable ImageFolder ({e})") from e


def num_classes(cfg: DataConfig, ds: Dataset) -> int:
    if cfg.name == "imagefolder":
        return len(ds.classes)
    return SPECS[cfg.name].num_classes


def monitor_datasets(cfg: Config) -> tuple[Dataset, Dataset | None, int]:
    """(kNN memory bank, test set, number of classes) for monitoring during pre-training.

    The bank is the labelled train set, or a fixed random subset of ``monitor.knn_max_train``
    images of it (drawn from ``seed``). An unlabeled folder without ``data.eval_root`` has no test
    set (None, 0 classes): its bank, drawn from the pre-training images, serves the effective rank only.
    """
    if has_labels(cfg.data):
        bank, test = raw_dataset(cfg.data, "train"), raw_dataset(cfg.data, "test")
        n_classes = num_classes(cfg.data, bank)
    else:
        bank, test, n_classes = raw_dataset(cfg.data, "pretrain"), None, 0
        log(f"data.root={cfg.data.root!r} has train/ only: pre-training on {len(bank)} unlabeled images; "
            "kNN and probe monitoring off (data.eval_root=<labelled ImageFolder> turns kNN on)")
    if 0 < cfg.monitor.knn_max_train < len(bank):
        g = torch.Generator().manual_seed(cfg.seed)
        keep = torch.randperm(len(bank), generator=g)[: cfg.monitor.knn_max_train].tolist()
        bank = torch.utils.data.Subset(bank, keep)
    return bank, test, n_classes


# ----------------------------------------------------------------------------- views


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one sample: a function of (run seed, epoch, index) only."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


class Views(Dataset):
    """Wraps a raw dataset: key -> (view_1, ..., view_k, label, skipped).

    Keys are plain indices (deterministic transforms: evaluation) or ``(epoch, index)`` pairs from
    :class:`ResumableSampler`, in which case the transforms draw from torch's RNG seeded by
    :func:`sample_seed`. An unreadable image is replaced by the next readable one and counted in
    ``skipped`` (the loop sums it), never fatal.
    """

    def __init__(self, base: Dataset, transforms: Sequence[Callable], seed: int | None = None):
        self.base, self.transforms, self.seed = base, list(transforms), seed
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def _load(self, index: int) -> tuple[Any, int, int]:
        n = len(self)
        for skipped in range(min(n, 1000)):
            j = (index + skipped) % n
            try:
                img, label = self.base[j]
                return img, label, skipped
            except UNREADABLE as e:
                if j not in self._warned:
                    self._warned.add(j)
                    path = getattr(self.base, "samples", None)
                    warn(f"skipping unreadable image {path[j][0] if path else j}: {e}")
        raise RuntimeError(f"no readable image among 1000 samples after index {index}")

    def __getitem__(self, key):
        if isinstance(key, tuple):
            epoch, index = key
        else:
            epoch, index = None, key
        img, label, skipped = self._load(index)
        if epoch is None or self.seed is None:
            views = [t(img) for t in self.transforms]
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, index))
                views = [t(img) for t in self.transforms]
        return (*views, label, skipped)


def in_memory(ds: Dataset) -> bool:
    """Whether ``ds`` hands out batches of uint8 images by index (:func:`images_at`): an ``images``
    tensor (N, C, H, W) (digits, Fashion-MNIST, CIFAR-10) or an ``images_at`` method (STL-10)."""
    images = getattr(ds, "images", None)
    return hasattr(ds, "images_at") or (isinstance(images, torch.Tensor) and images.dtype == torch.uint8
                                        and images.ndim == 4)


def images_at(ds: Dataset, indices: torch.Tensor) -> torch.Tensor:
    """The uint8 images (B, C, H, W) of an :func:`in_memory` dataset at ``indices`` (B,) int64."""
    return ds.images_at(indices) if hasattr(ds, "images_at") else ds.images[indices]


class BatchedViews:
    """The pre-training batches of an in-memory dataset, both views made on ``device`` for the whole
    batch by ``augment`` (:class:`train.batch_augment.BatchAugment`).

    Iterates ``sampler`` (a :class:`ResumableSampler`: its keys carry the epoch, and it skips what
    an interrupted run consumed) in batches of ``batch_size``, dropping the last partial one, as the
    per-sample loader does, and yields ``(view_1, view_2, labels, skipped)`` on ``device``.
    """

    def __init__(self, ds: Dataset, sampler: "ResumableSampler", batch_size: int, augment: Callable,
                 device: torch.device):
        self.ds, self.sampler, self.batch_size, self.augment, self.device = ds, sampler, batch_size, augment, device
        self.targets = torch.as_tensor(ds.targets, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        keys = iter(self.sampler)
        while len(batch := list(islice(keys, self.batch_size))) == self.batch_size:
            epochs, indices = torch.tensor(batch, dtype=torch.int64).unbind(1)
            images = images_at(self.ds, indices).to(self.device, non_blocking=True)
            v1, v2 = self.augment(images, epochs, indices)
            yield v1, v2, self.targets[indices].to(self.device), torch.zeros(len(batch), dtype=torch.int64)


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (per-epoch permutation from seed + epoch, a shard per rank) that
    yields ``(epoch, index)`` keys and can start part-way through an epoch.

    ``set_epoch(epoch, start_batch)`` skips the batches this rank consumed before an interruption,
    so a resumed run sees exactly the samples, in the order, an uninterrupted run would.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.start = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start_batch * self.batch_size

    def __iter__(self):
        for index in islice(super().__iter__(), self.start, None):
            yield (self.epoch, index)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)

    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size


def loader(ds: Dataset, batch_size: int, workers: int, sampler=None, drop_last: bool = False,
           pin_memory: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=pin_memory, persistent_workers=workers > 0,
                      # the loader's own generator: creating an iterator must not consume the global RNG
                      generator=torch.Generator().manual_seed(0))
