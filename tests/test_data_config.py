"""Config overrides, atomic writes and one-line errors (data loading: tests/test_data.py)."""
import pytest

from lib.config import UsageError, configure


DEFAULTS = {"LR": 0.01, "EPOCHS": 40, "DATASET": "MNIST", "PLOT_ONLY": False, "SEEDS": [1, 2], "lower": 3}


def test_configure_overrides_and_quick():
    cfg = configure(DEFAULTS, ["--lr=1", "--dataset=CIFAR10", "--plot-only", "--quick"], {"EPOCHS": 2})
    assert cfg["LR"] == 1.0 and isinstance(cfg["LR"], float)
    assert cfg["DATASET"] == "CIFAR10" and cfg["PLOT_ONLY"] is True and cfg["EPOCHS"] == 2
    assert "lower" not in cfg
    assert configure(DEFAULTS, ["--seeds=[3]", "--epochs=5"])["SEEDS"] == [3]
    assert configure({"ARMS": ["a"]}, ["--arms=b,c-d"])["ARMS"] == ["b", "c-d"]
    assert configure({"TAG": "x"}, ["--tag="])["TAG"] == ""


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
