"""Datasets as preloaded, flattened float tensors in [0, 1] on the device.

torchvision parses MNIST and FashionMNIST (IDX files under <root>/<name>/raw). CIFAR-10 is read
from its binary distribution (<root>/cifar-10-batches-bin, plain bytes, no pickle) with numpy;
only when that is absent do we fall back to torchvision's CIFAR10, which verifies the official
python batches by checksum before unpickling them. A cache of plain tensors (loaded with
weights_only=True) under <root>/cache makes the second load instant (skipped where <root> is
read-only).
"""
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from lib.config import UsageError
from lib.io import atomic_path

DATASETS = {"MNIST": (1, 28, 28), "FashionMNIST": (1, 28, 28), "CIFAR10": (3, 32, 32)}


@dataclass
class Data:
    x_train: torch.Tensor  # (N, D) float32 in [0, 1]
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str = "synthetic"  # the dataset's name
    source: str = "synthetic"  # "data_dir" (found under --data-dir or downloaded), "bundled" or "synthetic"

    @property
    def info(self):
        """What a results file records of the data actually used."""
        return {"name": self.name, "source": self.source, "n_train": len(self.y_train), "n_test": len(self.y_test)}

    @property
    def label(self):
        """What a figure title says of the data, e.g. 'MNIST (bundled subset, 4,000 train)'."""
        kind = {"bundled": "bundled subset, ", "synthetic": "synthetic, "}.get(self.source, "")
        return f"{self.name} ({kind}{len(self.y_train):,} train)"


def check_dataset(name):
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def _missing(name, root):
    return UsageError(f"{name} not found under {os.path.abspath(root)} and could not be downloaded "
                      f"(offline?): pass --data-dir=PATH to a folder in torchvision's layout")


def _read_cifar_bin(folder):
    def read(files):
        raw = np.concatenate([np.fromfile(os.path.join(folder, f), np.uint8) for f in files]).reshape(-1, 3073)
        return torch.from_numpy(raw[:, 1:].copy()), torch.from_numpy(raw[:, 0].astype(np.int64))
    return (*read([f"data_batch_{i}.bin" for i in range(1, 6)]), *read(["test_batch.bin"]))


def _read_raw(name, root, download):
    """uint8 images (N, ...) and int64 labels of the full training and test sets."""
    import torchvision
    if name == "CIFAR10" and os.path.isdir(os.path.join(root, "cifar-10-batches-bin")):
        return _read_cifar_bin(os.path.join(root, "cifar-10-batches-bin"))
    cls = getattr(torchvision.datasets, name)
    sets = []
    for train in (True, False):
        try:
            sets.append(cls(root, train=train, download=False))
        except RuntimeError:
            if not download:
                raise _missing(name, root) from None
            try:
                sets.append(cls(root, train=train, download=True))
            except Exception:
                raise _missing(name, root) from None
    return [t for s in sets for t in (torch.as_tensor(s.data), torch.as_tensor(s.targets))]


def load(name, root="data", device="cpu", train_size=50000, split_seed=0, download=True):
    """Training and test sets of `name` as Data on `device`: a seeded random subset of
    train_size training images (the paper: 50,000 of MNIST's 60,000; all available if fewer)
    and the whole test set. Images flattened to (N, D) floats in [0, 1]."""
    check_dataset(name)
    key = hashlib.sha1(f"{os.path.abspath(root)}|{name}|{train_size}|{split_seed}".encode()).hexdigest()[:12]
    cache = os.path.join(root, "cache", f"{name}_{key}.pt")
    if os.path.exists(cache):
        t = torch.load(cache, weights_only=True)
    else:
        xtr, ytr, xte, yte = _read_raw(name, root, download)
        idx = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(split_seed))[:train_size]
        t = {"x_train": xtr[idx].reshape(len(idx), -1), "y_train": ytr[idx].long(),
             "x_test": xte.reshape(len(yte), -1), "y_test": yte.long()}
        try:
            with atomic_path(cache) as tmp:
                torch.save(t, tmp)
        except OSError:
            pass  # a read-only checkout still works, just without the cache
    f = lambda x: (x.float() / 255).to(device)  # noqa: E731
    return Data(f(t["x_train"]), t["y_train"].to(device), f(t["x_test"]), t["y_test"].to(device), name, "data_dir")


def synthetic(name="MNIST", n_train=200, n_test=100, seed=0, device="cpu", classes=10):
    """A small deterministic, learnable classification set with `name`'s image shape:
    class prototypes in [0, 1] plus noise. For offline smoke runs and tests."""
    check_dataset(name)
    d = int(np.prod(DATASETS[name]))
    gen = torch.Generator().manual_seed(seed)
    protos = torch.rand(classes, d, generator=gen)
    def draw(n):
        y = torch.arange(n) % classes
        x = (0.7 * protos[y] + 0.3 * torch.rand(n, d, generator=gen)).clamp(0, 1)
        return (x * 255).round().to(torch.uint8), y
    (xtr, ytr), (xte, yte) = draw(n_train), draw(n_test)
    f = lambda x: (x.float() / 255).to(device)  # noqa: E731
    return Data(f(xtr), ytr.to(device), f(xte), yte.to(device), name, "synthetic")


def _idx_bytes(arr):
    dims = arr.shape
    header = bytes([0, 0, 8, len(dims)]) + b"".join(int(n).to_bytes(4, "big") for n in dims)
    return header + arr.astype(np.uint8).tobytes()


def write_fake(root, name="MNIST", n_train=200, n_test=100, seed=0):
    """Write `synthetic` data to `root` in the on-disk format `load` reads: IDX files under
    <root>/<name>/raw (MNIST, FashionMNIST) or binary batches under cifar-10-batches-bin."""
    data = synthetic(name, n_train, n_test, seed)
    shape = DATASETS[name]
    parts = {"train": (data.x_train, data.y_train), "t10k": (data.x_test, data.y_test)}
    if name == "CIFAR10":
        folder = os.path.join(root, "cifar-10-batches-bin")
        os.makedirs(folder, exist_ok=True)
        chunks = np.array_split(np.arange(n_train), 5)
        for i, part in enumerate([*chunks, None]):
            x, y = parts["train"] if part is not None else parts["t10k"]
            sel = part if part is not None else np.arange(len(y))
            rec = np.concatenate([y.numpy()[sel, None], (x.numpy()[sel] * 255).round()], 1)
            rec.astype(np.uint8).tofile(os.path.join(folder, f"data_batch_{i + 1}.bin" if part is not None else "test_batch.bin"))
        return root
    folder = os.path.join(root, name, "raw")
    os.makedirs(folder, exist_ok=True)
    for prefix, (x, y) in parts.items():
        for kind, arr in (("images-idx3", (x.numpy() * 255).round().reshape(-1, *shape[1:])),
                          ("labels-idx1", y.numpy())):
            path = os.path.join(folder, f"{prefix}-{kind}-ubyte")
            blob = _idx_bytes(arr)
            with open(path, "wb") as fh:
                fh.write(blob)
    return root
