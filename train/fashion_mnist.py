"""Fashion-MNIST (Xiao et al. 2017) read from its IDX files: 60 000 train + 10 000 test grey 28x28
images of 10 clothing classes.

Where the files come from (nothing is downloaded here):

- Debian's package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``, or
  ``make data``) installs them under ``/usr/share/datasets/fashion-mnist/``, the default root;
- torchvision's ``datasets.FashionMNIST(root, download=True)`` writes them to ``root/FashionMNIST/raw/``.

``data.root`` may hold the four files directly or in that torchvision layout, gzipped or not.

IDX format (LeCun's MNIST page): a big-endian header ``0x00 0x00 <dtype> <ndim>`` (magic 2051 for
uint8 images of 3 dimensions, 2049 for uint8 labels of 1), ``ndim`` big-endian int32 sizes, then the
row-major uint8 data.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # uint8 (0x08) data of 3 and 1 dimensions


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """The uint8 array of an IDX file (``.gz`` is decompressed), checked against ``magic``.

    Raises:
        ValueError: naming the file, when the magic number differs or the data is shorter or
            longer than its header says.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut gzip stream an EOFError
        raise ValueError(f"{path}: not a readable IDX file ({e})") from e
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise ValueError(f"{path}: IDX magic number is {found}, expected {magic} "
                         f"({'images' if magic == IMAGES_MAGIC else 'labels'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise ValueError(f"{path}: IDX data has {len(raw) - header} bytes, the header {shape} says {size} "
                         "(truncated or corrupt file)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def default_root() -> str:
    """The Debian package's folder when it exists, else "" (then :func:`find_files` explains)."""
    return str(DEBIAN_ROOT) if DEBIAN_ROOT.is_dir() else ""


def _how_to_get() -> str:
    return (f"install Debian's package {DEBIAN_PACKAGE} (`make data`, or `apt-get install -y {DEBIAN_PACKAGE}`: "
            f"files in {DEBIAN_ROOT}), or point data.root at a folder holding "
            f"{', '.join(n + '[.gz]' for pair in FILES.values() for n in pair)} directly or in FashionMNIST/raw/ "
            "(torchvision's layout)")


def find_files(root: str) -> dict[str, tuple[Path, Path]]:
    """``{"train": (images, labels), "test": (...)}`` under ``root`` (default: the Debian folder).

    Raises:
        FileNotFoundError: naming the root, the missing files and how to get them.
    """
    root = root or default_root()
    if not root:
        raise FileNotFoundError(f"data.name='fashion_mnist': no data.root given and {DEBIAN_ROOT} does not exist; "
                                + _how_to_get())
    if not Path(root).is_dir():
        raise FileNotFoundError(f"data.root={root!r} does not exist or is not a folder; " + _how_to_get())
    missing: list[str] = []
    for folder in (Path(root), Path(root) / "FashionMNIST" / "raw"):
        found, missing_here = {}, []
        for split, names in FILES.items():
            paths = []
            for name in names:
                p = next((folder / (name + ext) for ext in (".gz", "") if (folder / (name + ext)).is_file()), None)
                paths.append(p)
                if p is None:
                    missing_here.append(name)
            found[split] = tuple(paths)
        if not missing_here:
            return found
        missing = missing or missing_here
    raise FileNotFoundError(f"data.root={root!r} lacks {', '.join(n + '[.gz]' for n in missing)} "
                            "(looked in the folder and in FashionMNIST/raw/); " + _how_to_get())


class FashionMNIST(Dataset):
    """One split as uint8 images (N, 1, 28, 28) and ``targets``.

    ``subset`` > 0 keeps a fixed class-balanced subset of that many images (drawn with seed 0, not
    the run's seed: the subset is part of the data, like the digits split), in index order.
    """

    def __init__(self, root: str, split: str, subset: int = 0):
        if split not in FILES:
            raise ValueError(f"split={split!r}: expected train or test")
        if subset < 0:
            raise ValueError(f"data.train_subset={subset}: expected 0 (all images) or a positive count")
        images_path, labels_path = find_files(root)[split]
        images = read_idx(images_path, IMAGES_MAGIC)
        labels = read_idx(labels_path, LABELS_MAGIC)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{images_path} {images.shape} and {labels_path} {labels.shape} do not match")
        keep = balanced_subset(labels, subset) if 0 < subset < len(labels) else np.arange(len(labels))
        self.images = torch.from_numpy(images[keep].copy()).unsqueeze(1)  # (N, 1, 28, 28)
        self.targets = [int(t) for t in labels[keep]]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return tv_tensors.Image(self.images[i]), self.targets[i]


def balanced_subset(labels: np.ndarray, n: int) -> np.ndarray:
    """Sorted indices of ``n`` samples, as equal a share of each class as ``n`` allows (seed 0)."""
    rng = np.random.default_rng(0)
    classes = np.unique(labels)
    per_class = [np.flatnonzero(labels == c) for c in classes]
    quota = np.full(len(classes), n // len(classes))
    quota[: n % len(classes)] += 1
    picked = [rng.permutation(idx)[:q] for idx, q in zip(per_class, quota)]
    return np.sort(np.concatenate(picked))
