"""Data loading through the real code path on tiny files; config overrides; one-line errors."""
import pytest
import torch

from lib.config import UsageError, configure
from lib.data import load, synthetic, write_fake


@pytest.mark.parametrize("name,dim", [("MNIST", 784), ("FashionMNIST", 784), ("CIFAR10", 3072)])
def test_load_tiny_files_in_torchvision_layout(tmp_path, name, dim):
    write_fake(tmp_path, name, n_train=60, n_test=30, seed=1)
    d = load(name, tmp_path, train_size=50, download=False)
    assert d.x_train.shape == (50, dim) and d.x_test.shape == (30, dim)
    assert d.x_train.dtype == torch.float32 and 0 <= d.x_train.min() and d.x_train.max() <= 1
    ref = synthetic(name, 60, 30, seed=1)
    assert torch.equal(d.y_test, ref.y_test) and torch.allclose(d.x_test, ref.x_test)
    # the training split is a seeded random subset of the files' training images
    idx = torch.randperm(60, generator=torch.Generator().manual_seed(0))[:50]
    assert torch.equal(d.y_train, ref.y_train[idx]) and torch.allclose(d.x_train, ref.x_train[idx])
    again = load(name, tmp_path, train_size=50, download=False)  # from the tensor cache
    assert torch.equal(again.x_train, d.x_train) and any((tmp_path / "cache").iterdir())


def test_missing_data_offline_names_data_dir(tmp_path):
    with pytest.raises(UsageError, match="--data-dir"):
        load("MNIST", tmp_path, download=False)
    with pytest.raises(UsageError, match="known: MNIST, FashionMNIST, CIFAR10"):
        load("SVHN", tmp_path)


DEFAULTS = {"LR": 0.01, "EPOCHS": 40, "DATASET": "MNIST", "PLOT_ONLY": False, "SEEDS": [1, 2], "lower": 3}


def test_configure_overrides_and_quick():
    cfg = configure(DEFAULTS, ["--lr=1", "--dataset=CIFAR10", "--plot-only", "--quick"], {"EPOCHS": 2})
    assert cfg["LR"] == 1.0 and isinstance(cfg["LR"], float)
    assert cfg["DATASET"] == "CIFAR10" and cfg["PLOT_ONLY"] is True and cfg["EPOCHS"] == 2
    assert "lower" not in cfg
    assert configure(DEFAULTS, ["--seeds=[3]", "--epochs=5"])["SEEDS"] == [3]


@pytest.mark.parametrize("argv,match", [(["--lrate=1"], "unknown setting '--lrate=1'; did you mean --lr"),
                                        (["--epochs=1.5"], "expected a int"),
                                        (["--lr=abc"], "cannot parse"),
                                        (["lr=1"], "unknown setting")])
def test_configure_rejects_bad_input(argv, match):
    with pytest.raises(UsageError, match=match):
        configure(DEFAULTS, argv)


def test_atomic_write_leaves_no_partial_file_and_ordinary_permissions(tmp_path):
    import os
    import stat

    import pytest

    from lib.io import atomic_path, load_json, save_json
    path = tmp_path / "r.json"
    save_json(path, {"a": 1.5, "b": float("nan")})
    assert load_json(path) == {"a": 1.5, "b": None}
    save_json(path, {"a": 1.5, "b": float("nan")})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        open(tmp, "w").write("half")
        raise RuntimeError("crash mid-write")
    assert load_json(path) == {"a": 1.5, "b": None} and os.listdir(tmp_path) == ["r.json"]


def test_only_the_fence_is_an_option_and_presets_yield_to_the_user(tmp_path):
    from lib.config import fenced_settings, help_text, with_preset
    script = tmp_path / "s.py"
    script.write_text('"""Doc.\n\nOutputs: nothing."""\nCOLORS = {"a": 1}\n# ---- config\n'
                      'LR = None  # learning rate\n#   (continued)\nDATASET = "MNIST"  # data\n'
                      '# ----\nPRESETS = {"DATASET": {"MNIST": {"LR": 0.1}, "CIFAR10": {"LR": 0.2}}}\n')
    g = {"__file__": str(script), "__doc__": "Doc.\n\nOutputs: nothing.", "COLORS": {"a": 1}, "LR": None,
         "DATASET": "MNIST"}
    assert fenced_settings(script) == {"LR": (None, "learning rate (continued)"), "DATASET": ("MNIST", "data")}
    presets = {"DATASET": {"MNIST": {"LR": 0.1}, "CIFAR10": {"LR": 0.2}}}
    assert configure(g, [], presets=presets)["LR"] == 0.1
    assert configure(g, ["--dataset=CIFAR10"], presets=presets)["LR"] == 0.2
    assert configure(g, ["--lr=0.05", "--dataset=CIFAR10"], presets=presets)["LR"] == 0.05
    assert with_preset({"LR": 0.05}, presets, "DATASET", "MNIST")["LR"] == 0.05
    with pytest.raises(UsageError, match="unknown setting '--colors={}'"):
        configure(g, ["--colors={}"])
    with pytest.raises(UsageError, match="unknown dataset 'SVHN'"):
        configure(g, ["--dataset=SVHN"], presets=presets)
    text = help_text(g, {"LR": 1.0}, presets)
    assert "--lr=None" in text and "MNIST: 0.1" in text and "Outputs: nothing." in text


@pytest.mark.parametrize("name", ["bogus", "cuda:0", "tpu"])
def test_bad_device_is_one_line(name):
    from lib.config import check_device
    import torch
    if name == "cuda:0" and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(UsageError) as e:
        check_device(name)
    assert "\n" not in str(e.value) and "--device" in str(e.value)
