"""teleport_sharpness_curvature.py: Figures 4 and 11 with control arms (perturb-only, reset-only).
lib.arms' own tests cover the hook, the matched perturbation and the per-model resets; these
check the script: its arms, its config and its outputs."""
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

import teleport_sharpness_curvature as tsc
from lib.arms import ArmHook, Moments, branch
from lib.config import resolve, run
from lib.data import synthetic, write_fake
from lib.models import Activation
from lib.train import fit, make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACT = Activation(0.1)
# small enough for 2 busy cores: tiny widths and teleport batches
TINY = ["--dataset=MNIST", "--hidden=[8, 6]", "--train-size=120", "--tele-batch-size=30", "--eval-batch-size=30",
        "--eval-curves=1", "--batch-size=20", "--progress=False"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fake(str(tmp_path_factory.mktemp("data")), "MNIST", n_train=120, n_test=40)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: on an oversubscribed machine two OpenMP threads per process stall each other."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _cfg(data_dir, out, *args):
    return resolve(tsc, ["--quick", f"--data-dir={data_dir}", f"--out-dir={out}", *TINY, *args])


@pytest.fixture(scope="module")
def quick_run(data_dir, tmp_path_factory):
    """The script as a subprocess: --quick, AdaGrad, --controls (every arm)."""
    out = str(tmp_path_factory.mktemp("out"))
    cmd = [sys.executable, "teleport_sharpness_curvature.py", "--quick", f"--data-dir={data_dir}",
           f"--out-dir={out}", "--optimizer=adagrad", "--controls", *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(out, "results", "generalization", "MNIST_adagrad.json")) as fh:
        return out, json.load(fh), proc.stdout


def test_quick_run_writes_figures_json_and_every_control_arm(quick_run, data_dir):
    out, res, stdout = quick_run
    for kind in ("sharpness", "curvature"):
        assert os.path.getsize(os.path.join(out, "figures", "generalization", f"MNIST_adagrad_{kind}.png")) > 10000
    assert os.path.exists(os.path.join(out, "results", "generalization", "MNIST_adagrad_table.md"))
    cfg = res["config"]
    assert cfg["LR"] == 0.01 and cfg["SHARP_LR"] == tsc.PRESETS["DATASET"]["MNIST"]["SHARP_LR"]  # the presets
    assert res["data"] == {"name": "MNIST", "source": "data_dir", "n_train": 120, "n_test": 40}
    assert res["label"] == "MNIST (120 train)" and set(res["environment"]) >= {"git_commit", "torch"}
    assert res["arms"] == ["baseline", *tsc.TELEPORT_ARMS, *[f"perturb-only ({a})" for a in tsc.TELEPORT_ARMS],
                           "reset-only"]
    for arm in res["arms"]:
        for k in ("train_loss", "test_loss", "test_acc"):
            assert torch.tensor(res["curves"][arm][k]).shape == (cfg["N_RUNS"], cfg["EPOCHS"])
        # the arms share the first BRANCH_EPOCH epochs, then differ (every arm but baseline is reset)
        b = cfg["BRANCH_EPOCH"]
        assert res["curves"][arm]["train_loss"][0][:b] == res["curves"]["baseline"]["train_loss"][0][:b]
        if arm != "baseline":
            assert res["curves"][arm]["train_loss"][0][b:] != res["curves"]["baseline"]["train_loss"][0][b:]
            assert [r["batch"] for r in res["records"][arm]] == list(range(cfg["TELE_BATCHES"]))
    assert len(res["summary"]) == len(res["arms"]) and "| reset-only |" in stdout


def test_perturb_only_matches_the_median_drift_of_its_teleport_arm(quick_run):
    _, res, _ = quick_run
    for arm in tsc.TELEPORT_ARMS:
        for tele, pert in zip(res["records"][arm], res["records"][f"perturb-only ({arm})"]):
            drifts = [a - b for a, b in zip(tele["loss_after"], tele["loss_before"])]
            assert pert["matched_median_drift"] == pytest.approx(statistics.median(drifts), abs=1e-7)
            assert pert["drift"] == pytest.approx([abs(pert["matched_median_drift"])] * len(drifts), rel=1e-3, abs=1e-6)


def test_plot_only_redraws_from_the_saved_json_and_leaves_it_alone(quick_run, tmp_path):
    out, res, _ = quick_run
    paths = [os.path.join(out, "results", "generalization", f"MNIST_adagrad{s}") for s in (".json", "_table.md")]
    before = [open(p).read() for p in paths]
    figure = os.path.join(out, "figures", "generalization", "MNIST_adagrad_sharpness.png")
    os.remove(figure)
    tsc.main(resolve(tsc, [f"--out-dir={out}", "--optimizer=adagrad", "--dataset=MNIST", "--plot-only"]))
    assert os.path.getsize(figure) > 10000 and [open(p).read() for p in paths] == before


def test_lr_reaches_the_run(data_dir, tmp_path):
    """--lr is what the training uses and records; without it the optimizer's preset."""
    args = ["--arms=[]", "--n-runs=1", "--epochs=2", "--branch-epoch=1", "--optimizer=adagrad"]
    preset = tsc.main(_cfg(data_dir, tmp_path / "a", *args))
    given = tsc.main(_cfg(data_dir, tmp_path / "b", *args, "--lr=0.05"))
    saved = json.load(open(tmp_path / "b" / "results" / "generalization" / "MNIST_adagrad.json"))["config"]
    assert preset["config"]["LR"] == 0.01 and saved["LR"] == 0.05
    assert saved["OUT_DIR"] == str(tmp_path / "b") and saved["DATA_DIR"] == data_dir  # outside the repo: as given
    for k in ("train_loss", "test_loss"):
        assert preset["curves"]["baseline"][k][0][0] != given["curves"]["baseline"][k][0][0]


def test_reset_only_without_reset_moments_is_bitwise_the_baseline(data_dir, tmp_path):
    cfg = _cfg(data_dir, tmp_path, "--optimizer=adagrad", "--controls", "--tele-batches=0",
               "--arms=['curvature-increase']")
    res = tsc.main(cfg)
    assert res["curves"]["reset-only"] == res["curves"]["baseline"]


def test_an_arm_does_not_depend_on_which_other_arms_run(data_dir, tmp_path):
    both = tsc.main(_cfg(data_dir, tmp_path / "a", "--optimizer=adagrad", "--n-runs=1",
                         "--arms=['sharpness-decrease', 'curvature-increase']"))
    alone = tsc.main(_cfg(data_dir, tmp_path / "b", "--optimizer=adagrad", "--n-runs=1",
                          "--arms=['curvature-increase']"))
    for k in ("train_loss", "test_loss"):
        assert torch.allclose(torch.tensor(both["curves"]["curvature-increase"][k]),
                              torch.tensor(alone["curves"]["curvature-increase"][k]), atol=1e-5)
    assert both["records"]["curvature-increase"][0]["objective_after"] == pytest.approx(
        alone["records"]["curvature-increase"][0]["objective_after"], rel=1e-4)


def _teleport_once(arm, steps):
    """Teleport a briefly trained 784-16-10-10 model with the script's arms (baseline and `arm`)
    and measure phi and psi on a fixed batch with fixed directions and curves before and after."""
    from lib.metrics import random_directions, random_lie_elements
    cfg = resolve(tsc, ["--dataset=MNIST", f"--arms=['{arm}']", "--n-runs=2", "--tele-batch-size=120",
                        f"--sharp-steps={steps}", f"--curv-steps={steps}", "--sharp-stop-above=100.0"])
    data = synthetic("MNIST", 120, 40, seed=1)
    W, opt = make_model([784, 16, 10, 10], [1, 2], "sgd", 0.02)
    fit(W, opt, data, ACT, 2, 20, progress=False)
    g = torch.Generator().manual_seed(3)
    X, Y = data.x_train, data.y_train
    ts = tsc.displacements(cfg)
    dirs, curves = random_directions(W, len(ts), "sphere", g), [random_lie_elements(W, g) for _ in range(8)]
    arms = tsc.make_arms(cfg, ACT)
    assert [a.name for a in arms] == ["baseline", arm]
    W2, opt2 = branch(W, opt, 2, "sgd", 0.02)
    hook = ArmHook(W2, opt2, data, ACT, arms, Moments((0,), 1, 120, 0))
    before = tsc.landscape(W2, X, Y, ACT, ts, dirs, curves)
    hook(0, 0)
    after = tsc.landscape(W2, X, Y, ACT, ts, dirs, curves)
    return before, after


def test_sharpness_decrease_lowers_phi():
    before, after = _teleport_once("sharpness-decrease", 10)
    assert after["phi"][:2] == before["phi"][:2]  # the baseline's models are untouched
    assert all(a < b for a, b in zip(after["phi"][2:], before["phi"][2:]))


def test_curvature_increase_raises_psi():
    before, after = _teleport_once("curvature-increase", 3)
    assert all(a > b for a, b in zip(after["psi"][2:], before["psi"][2:]))


@pytest.mark.parametrize("arg,message", [("--dataset=SVHN", "unknown dataset 'SVHN'"),
                                         ("--optimizer=adam", "unknown optimizer 'adam'"),
                                         ("--lr=-0.1", "learning rate must be >= 0"),
                                         ("--arms=['sharpness-up']", "unknown arm 'sharpness-up'"),
                                         ("--sharp-lr={'up': 0.1}", "--sharp-lr must be a dict with keys"),
                                         ("--branch-epoch=40", "branch_epoch must be in [0, epochs)"),
                                         ("--plot-only", "--plot-only: no saved results at")])
def test_bad_input_is_one_line_error(arg, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        run(tsc.main, vars(tsc), [arg, f"--out-dir={tmp_path}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not os.listdir(tmp_path)  # nothing written
