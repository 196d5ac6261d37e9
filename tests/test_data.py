"""lib.data through the real code path on tiny files: torchvision's layout, the bundled MNIST subset
as the offline fallback, one-line errors for missing or damaged files, the tensor cache."""
import os
import re
import sys
import types

import numpy as np
import pytest
import torch

import lib.data
from lib.config import UsageError
from lib.data import BUNDLED, load, synthetic, write_fake

REACHABLE = lib.data._reachable  # the real probe, before the fixture below replaces it


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test reaches the network; each starts with the bundled-copy notice not yet printed."""
    monkeypatch.setattr(lib.data, "_reachable", lambda urls, timeout=5.0: False)
    monkeypatch.setattr(lib.data, "_told", set())


def _snapshot(folder):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(folder) for f in fs}


def _one_line_error(fn, *args, **kwargs):
    with pytest.raises(UsageError) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("name,dim,gz", [("MNIST", 784, False), ("MNIST", 784, True), ("FashionMNIST", 784, False),
                                         ("CIFAR10", 3072, False)])
def test_load_tiny_files_in_torchvision_layout(tmp_path, name, dim, gz):
    write_fake(tmp_path, name, n_train=60, n_test=30, seed=1, gz=gz)
    d = load(name, tmp_path, train_size=50, download=False)
    assert d.x_train.shape == (50, dim) and d.x_test.shape == (30, dim) and d.source == "data_dir"
    assert d.x_train.dtype == torch.float32 and 0 <= d.x_train.min() and d.x_train.max() <= 1
    ref = synthetic(name, 60, 30, seed=1)
    assert torch.equal(d.y_test, ref.y_test) and torch.allclose(d.x_test, ref.x_test)
    # the training split is a seeded random subset of the files' training images
    idx = torch.randperm(60, generator=torch.Generator().manual_seed(0))[:50]
    assert torch.equal(d.y_train, ref.y_train[idx]) and torch.allclose(d.x_train, ref.x_train[idx])
    again = load(name, tmp_path, train_size=50, download=False)  # from the tensor cache
    assert torch.equal(again.x_train, d.x_train) and len(list((tmp_path / "cache").iterdir())) == 1


def test_bundled_mnist_is_the_offline_fallback(tmp_path, capsys):
    before = _snapshot(BUNDLED)
    d = load("MNIST", tmp_path)  # an existing, empty data folder; downloading fails
    assert d.source == "bundled" and d.name == "MNIST" and d.label == "MNIST (bundled subset, 4,000 train)"
    assert d.info == {"name": "MNIST", "source": "bundled", "n_train": 4000, "n_test": 1000}
    assert d.x_train.shape == (4000, 784) and d.x_test.shape == (1000, 784) and d.x_train.max() == 1
    # balanced: 500 images of each digit in all, 4,000 / 1,000 split at random
    assert (torch.bincount(d.y_train, minlength=10) + torch.bincount(d.y_test, minlength=10)).tolist() == [500] * 10
    assert torch.bincount(d.y_train).min() > 350 and len(torch.unique(d.x_train, dim=0)) == 4000
    again = load("MNIST", tmp_path, train_size=1000, split_seed=3)
    assert again.x_train.shape == (1000, 784) and torch.equal(again.x_test, d.x_test)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: MNIST not found under") and "--data-dir" in err
    assert "bundled 4,000-image subset" in err
    assert _snapshot(BUNDLED) == before  # the bundled copy is never written into; its cache goes to root
    assert sorted(os.listdir(tmp_path)) == ["cache"] and len(os.listdir(tmp_path / "cache")) == 2


def test_fresh_clone_offline_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    d = load("MNIST", "data")  # the scripts' default DATA_DIR, absent in a fresh clone
    assert d.source == "bundled" and len(d.y_train) == 4000
    assert os.listdir(tmp_path) == []  # neither data/ nor a cache was created
    assert load("MNIST", tmp_path / "missing", download=False).source == "bundled"
    assert os.listdir(tmp_path) == [] and capsys.readouterr().err.count("\n") == 1  # the notice, once


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST", "CIFAR10"])
def test_missing_data_is_one_line_and_creates_nothing(tmp_path, name):
    missing = tmp_path / "nope"
    msg = _one_line_error(load, name, missing, bundled=False)
    assert msg.startswith(f"{name} not found under {missing}") and "--data-dir" in msg
    assert not missing.exists()
    assert "known: MNIST, FashionMNIST, CIFAR10" in _one_line_error(load, "SVHN", tmp_path)


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    """A download that dies half-way (here: a fake torchvision) leaves no folders in root or tmp."""
    class Failing:
        def __init__(self, root, train, download):
            os.makedirs(os.path.join(root, "MNIST", "raw"))
            open(os.path.join(root, "MNIST", "raw", "train-images-idx3-ubyte.gz"), "wb").write(b"partial")
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried ...")
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(datasets=types.SimpleNamespace(MNIST=Failing)))
    monkeypatch.setattr(lib.data, "_reachable", lambda urls, timeout=5.0: True)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    assert load("MNIST", tmp_path / "data").source == "bundled"
    assert sorted(os.listdir(tmp_path)) == ["tmp"] and os.listdir(tmp_path / "tmp") == []
    (tmp_path / "data").mkdir()
    assert load("MNIST", tmp_path / "data").source == "bundled"
    assert os.listdir(tmp_path / "data") == ["cache"]  # no empty data/MNIST/raw


def test_successful_download_moves_files_into_root(tmp_path, monkeypatch):
    class Fake:
        def __init__(self, root, train, download):
            write_fake(root, "FashionMNIST", n_train=40, n_test=20)
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(datasets=types.SimpleNamespace(FashionMNIST=Fake)))
    monkeypatch.setattr(lib.data, "_reachable", lambda urls, timeout=5.0: True)
    d = load("FashionMNIST", tmp_path / "data")
    assert d.source == "data_dir" and len(d.y_train) == 40
    assert sorted(os.listdir(tmp_path / "data" / "FashionMNIST" / "raw")) == sorted(lib.data.IDX_FILES)


def test_the_mirror_probe_fails_fast_and_finds_a_listening_server():
    import socket
    import time
    start = time.perf_counter()
    assert not REACHABLE(["https://mirror.invalid", "http://mirror.invalid"], timeout=1.0)  # .invalid never resolves
    assert time.perf_counter() - start < 2
    with socket.create_server(("127.0.0.1", 0)) as server:
        assert REACHABLE(["http://mirror.invalid/", f"http://127.0.0.1:{server.getsockname()[1]}/mnist/"])


def _truncate(path):
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:len(blob) // 2])


def _random(path):
    open(path, "wb").write(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("damage,file,match", [
    (_truncate, "train-images-idx3-ubyte", "wrong size|truncated"),
    (_truncate, "t10k-labels-idx1-ubyte", "wrong size|truncated"),
    (_random, "train-images-idx3-ubyte", "bad IDX header|not a gzip file"),
    (lambda p: open(p, "wb").close(), "t10k-images-idx3-ubyte", "bad IDX header|wrong size"),
])
def test_damaged_files_are_one_line_errors_naming_the_file(tmp_path, damage, file, match, gz):
    write_fake(tmp_path, "MNIST", n_train=30, n_test=20, gz=gz)
    path = tmp_path / "MNIST" / "raw" / (file + (".gz" if gz else ""))
    damage(path)
    msg = _one_line_error(load, "MNIST", tmp_path)
    assert msg.startswith(str(path)) and re.search(match, msg) and "not found" not in msg


def test_mismatched_or_incomplete_files_are_one_line_errors(tmp_path):
    write_fake(tmp_path / "a", "MNIST", n_train=30, n_test=20)
    write_fake(tmp_path / "b", "MNIST", n_train=31, n_test=20)
    raw = tmp_path / "a" / "MNIST" / "raw"
    os.replace(tmp_path / "b" / "MNIST" / "raw" / "train-labels-idx1-ubyte", raw / "train-labels-idx1-ubyte")
    assert "30 images but" in _one_line_error(load, "MNIST", tmp_path / "a")
    os.remove(raw / "t10k-labels-idx1-ubyte")
    assert "t10k-labels-idx1-ubyte is missing" in _one_line_error(load, "MNIST", tmp_path / "a")
    write_fake(tmp_path / "c", "CIFAR10", n_train=30, n_test=20)
    batch = tmp_path / "c" / "cifar-10-batches-bin" / "test_batch.bin"
    batch.write_bytes(batch.read_bytes()[:-100])
    msg = _one_line_error(load, "CIFAR10", tmp_path / "c")
    assert msg.startswith(str(batch)) and "wrong size" in msg


def test_replacing_the_files_invalidates_the_cache(tmp_path):
    write_fake(tmp_path, "MNIST", n_train=40, n_test=20, seed=1)
    first = load("MNIST", tmp_path)
    write_fake(tmp_path, "MNIST", n_train=50, n_test=20, seed=2)  # other sizes
    assert len(load("MNIST", tmp_path).y_train) == 50
    write_fake(tmp_path, "MNIST", n_train=40, n_test=20, seed=3)  # same sizes, new modification times
    for f in (tmp_path / "MNIST" / "raw").iterdir():
        os.utime(f, ns=(os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns + 10**9))
    third = load("MNIST", tmp_path)
    assert torch.allclose(third.x_test, synthetic("MNIST", 40, 20, seed=3).x_test)
    assert not torch.allclose(third.x_test, first.x_test)


def test_a_damaged_cache_is_rebuilt(tmp_path):
    write_fake(tmp_path, "MNIST", n_train=40, n_test=20)
    d = load("MNIST", tmp_path)
    (cache,) = (tmp_path / "cache").iterdir()
    for blob in (b"", b"garbage", open(cache, "rb").read()[:100]):
        cache.write_bytes(blob)
        assert torch.equal(load("MNIST", tmp_path).x_train, d.x_train)
        assert lib.data._load_cache(str(cache)) is not None  # written again, whole
