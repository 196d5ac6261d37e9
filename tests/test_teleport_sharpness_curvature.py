"""teleport_sharpness_curvature.py: Figures 4 and 11 with the controls of issue 7."""
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

import teleport_sharpness_curvature as tsc
from lib.config import configure, run
from lib.data import synthetic, write_fake
from lib.models import Activation
from lib.optim import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACT = Activation(0.1)
# small enough for 2 busy cores: tiny widths and teleport batches, one run per arm
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
    return configure(vars(tsc), ["--quick", f"--data-dir={data_dir}", f"--out-dir={out}", *TINY, *args], tsc._QUICK)


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


def test_quick_run_writes_figures_json_and_every_control_arm(quick_run):
    out, res, stdout = quick_run
    for kind in ("sharpness", "curvature"):
        assert os.path.getsize(os.path.join(out, "figures", "generalization", f"MNIST_adagrad_{kind}.png")) > 10000
    assert os.path.exists(os.path.join(out, "results", "generalization", "MNIST_adagrad_table.md"))
    cfg = res["config"]
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
            assert len(res["records"][arm]) == cfg["TELE_BATCHES"]
    assert "environment" in res and len(res["summary"]) == len(res["arms"]) and "| reset-only |" in stdout


def test_perturb_only_matches_the_median_drift_of_its_teleport_arm(quick_run):
    _, res, _ = quick_run
    for arm in tsc.TELEPORT_ARMS:
        for tele, pert in zip(res["records"][arm], res["records"][f"perturb-only ({arm})"]):
            drifts = [a - b for a, b in zip(tele["loss_after"], tele["loss_before"])]
            assert pert["matched_median_drift"] == pytest.approx(statistics.median(drifts), abs=1e-7)
            assert pert["drift"] == pytest.approx([abs(pert["matched_median_drift"])] * len(drifts), rel=1e-3, abs=1e-6)


def test_reset_only_without_reset_moments_is_bitwise_the_baseline(data_dir, tmp_path):
    cfg = _cfg(data_dir, tmp_path, "--optimizer=adagrad", "--controls", "--tele-batches=0",
               "--arms=['curvature-increase']")
    res = tsc.main(cfg)
    assert res["curves"]["reset-only"] == res["curves"]["baseline"]


def test_batched_branch_equals_a_separately_run_arm(data_dir, tmp_path):
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
    """Teleport a briefly trained 784-16-10-10 model with the script's settings for `arm` and
    measure phi and psi on a fixed batch with fixed directions and curves before and after."""
    from lib.metrics import random_directions, random_lie_elements
    from lib.train import fit, make_model
    cfg = tsc.resolve(configure(vars(tsc), ["--dataset=MNIST", f"--arms=['{arm}']", "--n-runs=2",
                                            "--tele-batch-size=120", f"--sharp-steps={steps}",
                                            f"--curv-steps={steps}", "--sharp-stop-above=100.0"]))
    data = synthetic("MNIST", 120, 40, seed=1)
    W, opt = make_model([784, 16, 10, 10], [1, 2], "sgd", 0.02)
    fit(W, opt, data, ACT, 2, 20, progress=False)
    g = torch.Generator().manual_seed(3)
    X, Y = data.x_train, data.y_train
    ts = tsc.displacements(cfg)
    dirs, curves = random_directions(W, len(ts), "sphere", g), [random_lie_elements(W, g) for _ in range(8)]
    arms = ["baseline", arm]
    W2, opt2 = tsc.branch(W, opt, 2, "sgd", 0.02)
    hook = tsc.BranchHook(W2, opt2, data, ACT, cfg, arms, lambda Wm: None)
    before = tsc.landscape(W2, X, Y, ACT, ts, dirs, curves)
    hook(0, 0)
    after = tsc.landscape(W2, X, Y, ACT, ts, dirs, curves)
    return before, after


def test_sharpness_decrease_lowers_phi():
    before, after = _teleport_once("sharpness-decrease", 10)
    assert after["phi"][:2] == before["phi"][:2]  # the baseline slice is untouched
    assert all(a < b for a, b in zip(after["phi"][2:], before["phi"][2:]))


def test_curvature_increase_raises_psi():
    before, after = _teleport_once("curvature-increase", 3)
    assert all(a > b for a, b in zip(after["psi"][2:], before["psi"][2:]))


def test_reset_slices_equals_a_fresh_adagrad():
    torch.manual_seed(0)
    W0 = [torch.randn(2, 4, 3), torch.randn(2, 2, 4)]
    X, Y = torch.randn(8, 3), torch.randint(2, (8,))
    from lib.models import loss_fn

    def steps(W, opt, n):
        for _ in range(n):
            opt.zero_grad()
            loss_fn(W, X, Y, ACT).sum().backward()
            opt.step()

    W = [w.clone().requires_grad_() for w in W0]
    opt = make_optimizer("adagrad", W, 0.1)
    steps(W, opt, 3)
    tsc.reset_slices(opt, W, slice(0, 1))
    mid = [w.detach()[:1].clone().requires_grad_() for w in W]
    steps(W, opt, 3)
    fresh = make_optimizer("adagrad", mid, 0.1)
    steps(mid, fresh, 3)
    assert all(torch.allclose(a[:1], b, atol=1e-6) for a, b in zip(W, mid))


def test_matched_perturbation_hits_the_target_drift():
    torch.manual_seed(0)
    W = [torch.randn(3, 8, 784) * 0.05, torch.randn(3, 10, 8) * 0.3]
    data = synthetic("MNIST", 50, 10)
    target = [0.01, 0.1, 0.03]
    new, rec = tsc.matched_perturbation(W, data.x_train, data.y_train, ACT, target, torch.Generator().manual_seed(0))
    assert rec["drift"] == pytest.approx(target, abs=1e-5)
    moved = sum((a - b).pow(2).flatten(1).sum(1) for a, b in zip(new, W)).sqrt()
    assert moved.tolist() == pytest.approx(rec["norm"], rel=1e-4) and min(rec["norm"]) > 0


@pytest.mark.parametrize("arg,message", [("--dataset=SVHN", "unknown dataset 'SVHN'"),
                                         ("--optimizer=adam", "unknown optimizer 'adam'"),
                                         ("--lr=-0.1", "learning rate must be >= 0"),
                                         ("--arms=['sharpness-up']", "unknown arm 'sharpness-up'")])
def test_bad_input_is_one_line_error(arg, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        run(tsc.main, vars(tsc), tsc._QUICK, [arg, f"--out-dir={tmp_path}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
