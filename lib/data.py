"""Datasets as preloaded, flattened float tensors in [0, 1] on the device.

Where `load` finds a dataset, in order:
1. under <root> (--data-dir) in torchvision's layout: MNIST and FashionMNIST as IDX files in
   <root>/<name>/raw (plain or gzipped, read here with numpy, headers and sizes checked); CIFAR-10
   as its binary distribution <root>/cifar-10-batches-bin (plain bytes, no pickle), else as the
   python batches <root>/cifar-10-batches-py, which torchvision verifies by checksum before
   unpickling;
2. downloaded into <root> with torchvision, when its mirrors answer within seconds; the download
   goes to a temporary folder first, so a failed attempt leaves nothing behind;
3. for MNIST only, the real 4,000/1,000-image subset bundled in datasets/mnist5k (one line on
   stderr says so; Data.source == "bundled").
Damaged or truncated files give a one-line UsageError naming the file. A cache of plain tensors
under <root>/cache (loaded with weights_only=True), keyed on the source files' paths, sizes and
modification times and on the split settings, makes the second load instant; it is skipped where
<root> is missing or read-only, never written into the bundled copy, and rebuilt when damaged.
"""
import gzip
import hashlib
import os
import shutil
import socket
import sys
import tempfile
import threading
import urllib.parse
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from lib.config import UsageError
from lib.io import REPO, atomic_path

DATASETS = {"MNIST": (1, 28, 28), "FashionMNIST": (1, 28, 28), "CIFAR10": (3, 32, 32)}
BUNDLED = os.path.join(REPO, "datasets", "mnist5k")  # MNIST subset shipped with the repository
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_BIN = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
CIFAR_PY = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
MIRRORS = {"MNIST": ["https://ossci-datasets.s3.amazonaws.com", "http://yann.lecun.com"],  # torchvision's hosts
           "FashionMNIST": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"],
           "CIFAR10": ["https://www.cs.toronto.edu"]}
_told = set()  # datasets whose bundled-copy notice this process has printed


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


def read_idx(path, shape):
    """The uint8 array (N, *shape) stored in the IDX file `path` (plain, or gzipped if it ends in
    .gz); a damaged file (bad gzip stream, header, item shape or size) is a one-line UsageError."""
    gz = str(path).endswith(".gz")
    try:
        with (gzip.open if gz else open)(path, "rb") as fh:
            blob = fh.read()
    except EOFError:
        raise UsageError(f"{path}: wrong size (the gzip stream ends early): truncated; replace the file") from None
    except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        why = "not a gzip file, or a damaged one" if gz and not e.strerror else (e.strerror or str(e))
        raise UsageError(f"{path}: cannot read ({why}); replace the file") from None
    ndim, head = 1 + len(shape), 4 + 4 * (1 + len(shape))
    size = f"{len(blob):,} bytes{' uncompressed' if gz else ''}"
    if len(blob) < 4:
        raise UsageError(f"{path}: wrong size ({size}, shorter than an IDX header): empty or truncated; replace the file")
    if blob[:4] != bytes([0, 0, 8, ndim]):
        raise UsageError(f"{path}: bad IDX header (magic 0x{blob[:4].hex()}, expected 0x0000080{ndim} for "
                         f"{ndim}-d uint8 data; {size}): not an IDX file or a damaged one; replace the file")
    if len(blob) < head:
        raise UsageError(f"{path}: wrong size ({size}, shorter than its {head}-byte header): truncated; replace the file")
    dims = [int.from_bytes(blob[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if tuple(dims[1:]) != tuple(shape):
        raise UsageError(f"{path}: bad IDX header (items of shape {tuple(dims[1:])}, expected {tuple(shape)}); "
                         f"replace the file")
    if len(blob) != head + int(np.prod(dims)):
        raise UsageError(f"{path}: wrong size ({size}, expected {head + int(np.prod(dims)):,} for {dims[0]:,} "
                         f"items): truncated or damaged; replace the file")
    return np.frombuffer(blob, np.uint8, offset=head).reshape(dims)


def _read_idx_set(files, shape):
    """Training and test images (N, *shape) and labels of four IDX files (see IDX_FILES)."""
    out = []
    for images, labels in (files[:2], files[2:]):
        x, y = read_idx(images, shape), read_idx(labels, ())
        if len(x) != len(y):
            raise UsageError(f"{images} holds {len(x):,} images but {labels} {len(y):,} labels; replace them")
        if len(y) and y.max() > 9:
            raise UsageError(f"{labels}: labels outside 0-9 (damaged?); replace the file")
        out += [torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))]
    return out


def _read_cifar_bin(files):
    def read(paths):
        parts = []
        for path in paths:
            raw = np.fromfile(path, np.uint8)
            if raw.size == 0 or raw.size % 3073:
                raise UsageError(f"{path}: wrong size ({raw.size:,} bytes, not a whole number of 3,073-byte "
                                 f"CIFAR-10 records): truncated or damaged; replace the file")
            if raw.reshape(-1, 3073)[:, 0].max() > 9:
                raise UsageError(f"{path}: labels outside 0-9: damaged, or not a CIFAR-10 batch; replace the file")
            parts.append(raw.reshape(-1, 3073))
        raw = np.concatenate(parts)
        return torch.from_numpy(raw[:, 1:].copy()), torch.from_numpy(raw[:, 0].astype(np.int64))
    return (*read(files[:5]), *read(files[5:]))


def _read_cifar_py(files):
    import torchvision
    root = os.path.dirname(os.path.dirname(files[0]))
    try:
        sets = [torchvision.datasets.CIFAR10(root, train=train, download=False) for train in (True, False)]
    except RuntimeError:  # torchvision checks every batch's md5 before unpickling it
        raise UsageError(f"{os.path.dirname(files[0])}: CIFAR-10 python batches fail their checksums "
                         f"(damaged or incomplete); replace them") from None
    # torchvision holds the images as (N, 32, 32, 3); the binary batches, like DATASETS, are (N, 3, 32, 32)
    return [t for s in sets for t in (torch.as_tensor(s.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(s.targets))]


def _find(name, root):
    """The source files of `name` under root, None if there are none; a partial set is an error."""
    if name == "CIFAR10":
        options = [("cifar-10-batches-bin", CIFAR_BIN), ("cifar-10-batches-py", CIFAR_PY)]
        options = [(os.path.join(root, sub), names) for sub, names in options if os.path.isdir(os.path.join(root, sub))]
        if not options:
            return None
        folder, names = options[0]
        files = [os.path.join(folder, f) for f in names]
    else:
        folder = os.path.join(root, name, "raw")
        files = [next((p for p in (os.path.join(folder, f), os.path.join(folder, f + ".gz")) if os.path.exists(p)),
                      os.path.join(folder, f)) for f in IDX_FILES]
    absent = [f for f in files if not os.path.exists(f)]
    if len(absent) == len(files):
        return None
    if absent:
        raise UsageError(f"{name} under {os.path.abspath(root)} is incomplete: {absent[0]} is missing"
                         f"{' (or its .gz)' if name != 'CIFAR10' else ''}; add it or pass --data-dir=PATH")
    return files


def _reachable(urls, timeout=5.0):
    """Whether any of the servers of `urls` accepts a connection within `timeout` seconds, DNS included."""
    ok = []
    def probe():
        for url in urls:
            parts = urllib.parse.urlsplit(url)
            try:
                socket.create_connection((parts.hostname, parts.port or {"https": 443}.get(parts.scheme, 80)),
                                         timeout=timeout).close()
                ok.append(url)
                return
            except OSError:
                pass
    thread = threading.Thread(target=probe, daemon=True)  # a hanging DNS lookup cannot be timed out otherwise
    thread.start()
    thread.join(timeout)
    return bool(ok)


def _download(name, root):
    """Download `name` with torchvision into a temporary folder, then move it under root (created
    only now). Returns whether it worked; a failed attempt leaves nothing behind."""
    if not _reachable(MIRRORS[name]):
        return False
    import torchvision
    tmp, timeout = tempfile.mkdtemp(prefix="download-"), socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(30)
        cls = getattr(torchvision.datasets, name)
        for train in (True, False):
            cls(tmp, train=train, download=True)
        for folder, _, names in os.walk(tmp):
            dest = os.path.join(root, os.path.relpath(folder, tmp))
            os.makedirs(dest, exist_ok=True)
            for f in names:
                if not os.path.exists(os.path.join(dest, f)):
                    shutil.move(os.path.join(folder, f), os.path.join(dest, f))
        print(f"downloaded {name} into {os.path.abspath(root)}", file=sys.stderr)
        return True
    except Exception:
        return False
    finally:
        socket.setdefaulttimeout(timeout)
        shutil.rmtree(tmp, ignore_errors=True)


def _in_bundled(path):
    return os.path.commonpath([os.path.abspath(path), BUNDLED]) == BUNDLED


def _writable(folder):
    """Whether folder may be written: permitted, and (which root ignores) its mode allows it."""
    return os.access(folder, os.W_OK) and bool(os.stat(folder).st_mode & 0o200)


def _cache_path(root, name, files, train_size, split_seed):
    """Where the tensors read from `files` are cached: under <root>/cache when root is an existing,
    writable folder outside the bundled copy, else None. The key covers each file's path, size and
    modification time, so replacing a file invalidates the cache."""
    cache = os.path.join(root, "cache")
    if not os.path.isdir(root) or _in_bundled(root) or not _writable(root) or (os.path.isdir(cache) and not _writable(cache)):
        return None
    stats = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    key = hashlib.sha1(repr((name, train_size, split_seed, stats)).encode()).hexdigest()[:12]
    return os.path.join(cache, f"{name}_{key}.pt")


def _load_cache(path):
    """The cached tensors at `path`, or None if absent, unreadable or not what `load` writes."""
    try:
        t = torch.load(path, weights_only=True)
        x, y, xt, yt = (t[k] for k in ("x_train", "y_train", "x_test", "y_test"))
        ok = x.dtype == xt.dtype == torch.uint8 and y.dtype == yt.dtype == torch.int64
        return t if ok and x.dim() == xt.dim() == 2 and len(x) == len(y) and len(xt) == len(yt) else None
    except Exception:  # absent, truncated, random bytes: rebuild it
        return None


def _tensors(name, files, cache, train_size, split_seed):
    """Uint8 images (N, D) and int64 labels of a seeded train_size subset and the test set."""
    t = _load_cache(cache) if cache else None
    if t is None:
        read = {"cifar-10-batches-bin": _read_cifar_bin, "cifar-10-batches-py": _read_cifar_py}
        read = read.get(os.path.basename(os.path.dirname(files[0])), lambda f: _read_idx_set(f, DATASETS[name][1:]))
        xtr, ytr, xte, yte = read(files)
        idx = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(split_seed))[:train_size]
        t = {"x_train": xtr[idx].reshape(len(idx), -1), "y_train": ytr[idx].long(),
             "x_test": xte.reshape(len(yte), -1), "y_test": yte.long()}
        try:
            if cache:
                with atomic_path(cache) as tmp:
                    torch.save(t, tmp)
        except OSError:
            pass  # a read-only data folder still works, just without the cache
    return t


def load(name, root="data", device="cpu", train_size=50000, split_seed=0, download=True, bundled=True):
    """Training and test sets of `name` as Data on `device`: a seeded random subset of
    train_size training images (the paper: 50,000 of MNIST's 60,000; all available if fewer)
    and the whole test set. Images flattened to (N, D) floats in [0, 1]. Looks under root, then
    downloads (if `download`), then, for MNIST, uses the bundled subset (if `bundled`)."""
    check_dataset(name)
    root = os.fspath(root)
    source = "bundled" if _in_bundled(root) else "data_dir"
    files = _find(name, root)
    if files is None and download and _download(name, root):
        files = _find(name, root)
    if files is None:
        if not (bundled and name == "MNIST"):
            raise _missing(name, root)
        files, source = _find(name, BUNDLED), "bundled"
        if files is None:  # a copy of the code without datasets/
            raise _missing(name, root)
        if name not in _told:
            _told.add(name)
            print(f"note: {name} not found under {os.path.abspath(root)}{' nor downloadable' if download else ''}; "
                  f"using the bundled 4,000-image subset (datasets/mnist5k). For the full 60,000 images, "
                  f"run once online or pass --data-dir=PATH", file=sys.stderr)
    t = _tensors(name, files, _cache_path(root, name, files, train_size, split_seed), train_size, split_seed)
    f = lambda x: (x.float() / 255).to(device)  # noqa: E731
    return Data(f(t["x_train"]), t["y_train"].to(device), f(t["x_test"]), t["y_test"].to(device), name, source)


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


def write_fake(root, name="MNIST", n_train=200, n_test=100, seed=0, gz=False):
    """Write `synthetic` data to `root` in the on-disk format `load` reads: IDX files under
    <root>/<name>/raw (MNIST, FashionMNIST; gzipped if `gz`) or binary batches under
    cifar-10-batches-bin. Returns root."""
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
            path = os.path.join(folder, f"{prefix}-{kind}-ubyte" + (".gz" if gz else ""))
            blob = _idx_bytes(arr)
            with (gzip.open if gz else open)(path, "wb") as fh:
                fh.write(blob)
    return root
