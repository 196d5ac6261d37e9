"""teleport_sharpness_curvature.py: Figures 4 and 11 with control arms (perturb-only, reset-only).
lib.arms' own tests cover the hook, the matched perturbation and the per-model resets; these
check the script: its arms, its config and its outputs."""
import json
import math
import os
import shutil
import statistics
import subprocess
import sys

import pytest

from lib.io import check_replace
import torch

import lib.train
import teleport_sharpness_curvature as tsc
from lib.arms import ArmHook, Moments, branch
from lib.config import UsageError, resolve, run
from lib.data import synthetic, write_fake
from lib.models import Activation
from lib.report import diverged_arms
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


@pytest.mark.parametrize("stem", ["MNIST_sgd", "MNIST_adagrad", "MNIST_sgd_curv-lr100", "MNIST_adagrad_curv-lr100"])
def test_the_committed_tables_follow_from_the_committed_results(stem):
    """What --plot-only writes as the table: the summary recomputed from the saved curves and records."""
    folder = os.path.join(ROOT, "results", "generalization")
    res = json.load(open(os.path.join(folder, f"{stem}.json")))
    res["diverged"] = diverged_arms(res["curves"])  # saved without it: none diverged
    assert not any(e for v in res["diverged"].values() for e in v)
    table = tsc.table_markdown(tsc.summary(res), res["diverged"])
    assert table + "\n" == open(os.path.join(folder, f"{stem}_table.md")).read()


def test_lr_reaches_the_run(data_dir, tmp_path):
    """--lr is what the training uses and records; without it the optimizer's preset."""
    args = ["--arms=[]", "--controls=False", "--n-runs=1", "--epochs=2", "--branch-epoch=1", "--optimizer=adagrad"]
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
    both = tsc.main(_cfg(data_dir, tmp_path / "a", "--optimizer=adagrad", "--n-runs=1", "--controls=False",
                         "--arms=['sharpness-decrease', 'curvature-increase']"))
    alone = tsc.main(_cfg(data_dir, tmp_path / "b", "--optimizer=adagrad", "--n-runs=1", "--controls=False",
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
    cfg = resolve(tsc, ["--dataset=MNIST", f"--arms=['{arm}']", "--controls=False", "--n-runs=2", "--tele-batch-size=120",
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


# --- outputs as a set, resume, divergence ---------------------------------------------------------
RESUME = ["--optimizer=adagrad", "--epochs=4", "--branch-epoch=2", "--checkpoint-s=0",
          "--arms=['sharpness-decrease', 'curvature-increase']"]


def _outputs(out):
    """{relative path: bytes} of every file under out, the checkpoints' folder excepted."""
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(out) if ".progress" not in d for f in files}


def _numbers(res):
    """What a resumed run must reproduce: curves, records (without their timings), phi/psi."""
    drop = lambda x: ({k: drop(v) for k, v in x.items() if k != "time_s"} if isinstance(x, dict)  # noqa: E731
                      else [drop(v) for v in x] if isinstance(x, list) else x)
    return drop({k: res[k] for k in ("curves", "records", "landscape", "diverged")})


def _assert_close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_close(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_close(x, y)
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9, nan_ok=True)
    else:
        assert a == b


@pytest.fixture(scope="module")
def whole_run(data_dir, tmp_path_factory):
    """An uninterrupted run (AdaGrad, two teleport arms with their controls, 2 + 2 epochs)."""
    out = tmp_path_factory.mktemp("whole")
    return out, tsc.main(_cfg(data_dir, out, *RESUME))


@pytest.mark.parametrize("stop,saved", [(2, "phase1, epoch 1 of 2"), (4, "phase2, epoch 1 of 2")])
def test_interrupted_run_resumes_to_the_same_numbers_and_keeps_the_previous_set(
        whole_run, data_dir, tmp_path, monkeypatch, stop, saved):
    """Ctrl-C (KeyboardInterrupt) in epoch `stop` of 4 (2: phase 1, 4: phase 2, after the
    teleports): the previous outputs stay as they were; the same command resumes from the
    checkpoint, trains only the epochs left and ends with the uninterrupted run's numbers."""
    out = tmp_path / "out"
    shutil.copytree(whole_run[0], out)  # the previous complete set, made with the same settings
    before, calls, stops, train_epoch = _outputs(out), [], [stop], lib.train.train_epoch

    def counted(*args, **kw):
        calls.append(1)
        if len(calls) in stops:
            raise KeyboardInterrupt
        return train_epoch(*args, **kw)
    monkeypatch.setattr(lib.train, "train_epoch", counted)
    with pytest.raises(KeyboardInterrupt):
        tsc.main(_cfg(data_dir, out, *RESUME))
    stops.clear()
    assert _outputs(out) == before and not [p for p in os.listdir(out) if p.startswith(".staging")]
    ckpt = out / ".progress" / "teleport_sharpness_curvature-MNIST_adagrad.pt"
    assert torch.load(ckpt, weights_only=True)["what"] == saved
    calls.clear()
    again = tsc.main(_cfg(data_dir, out, *RESUME))
    assert len(calls) == 4 - (stop - 1)  # only the epochs not saved
    _assert_close(_numbers(again), _numbers(whole_run[1]))
    assert not ckpt.exists() and _outputs(out).keys() == before.keys()


def test_other_settings_do_not_replace_saved_results(quick_run, data_dir, capsys):
    out, res, _ = quick_run
    before = _outputs(out)
    args = ["--quick", f"--data-dir={data_dir}", f"--out-dir={out}", "--optimizer=adagrad", *TINY]
    with pytest.raises(SystemExit) as e:
        run(tsc.main, vars(tsc), [*args, "--lr=0.05"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "LR=0.05 (saved: 0.01)" in err and "--replace" in err
    assert _outputs(out) == before
    check_replace(os.path.join(out, "results", "generalization", "MNIST_adagrad.json"),
                  resolve(tsc, [*args, "--lr=0.05", "--replace"]))  # --replace: allowed


def test_the_committed_protocol_may_replace_the_committed_results_and_nothing_else(tmp_path):
    """The committed MNIST results count as made by `--dataset=MNIST` on the 4,000-image subset;
    other settings or other data are refused, --replace allows them."""
    from types import SimpleNamespace
    path = tmp_path / "results" / "generalization" / "MNIST_sgd.json"
    path.parent.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "results", "generalization", "MNIST_sgd.json"), path)
    subset, full = (SimpleNamespace(info={"n_train": n, "n_test": m}) for n, m in ((4000, 1000), (60000, 10000)))
    cfg = resolve(tsc, ["--dataset=MNIST", f"--out-dir={tmp_path}"])
    check_replace(str(path), cfg)
    check_replace(str(path), cfg, data=subset)
    with pytest.raises(UsageError, match=f"^{path} holds results made on 4,000/1,000 training/test images"):
        check_replace(str(path), cfg, data=full)
    with pytest.raises(UsageError, match=r"CONTROLS=False \(saved: True\)"):
        check_replace(str(path), resolve(tsc, ["--dataset=MNIST", "--controls=False"]))
    check_replace(str(path), resolve(tsc, ["--dataset=MNIST", "--controls=False", "--replace"]))
    check_replace(str(path), {**cfg, "REPLACE": True}, data=full)


def test_a_diverging_run_is_a_result(data_dir, tmp_path):
    """At lr 1e6 every model turns non-finite in the first epoch: the teleports' linear algebra
    fails (undone), phi/psi are NaN, and the run still writes strict JSON, figures and a table
    that says which runs diverged and leaves them out of the means."""
    res = tsc.main(_cfg(data_dir, tmp_path, "--lr=1e6", "--arms=['sharpness-increase', 'curvature-decrease']"))
    names = ["baseline", "sharpness-increase", "curvature-decrease", "perturb-only (sharpness-increase)",
             "perturb-only (curvature-decrease)"]
    assert res["arms"] == names and res["diverged"] == {a: [1, 1] for a in names}
    for arm in ("sharpness-increase", "curvature-decrease"):
        assert all("error" in r and r["failed"] == [True, True] for r in res["records"][arm])
    path = tmp_path / "results" / "generalization" / "MNIST_sgd.json"
    saved = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in strict JSON"))
    assert saved["diverged"] == res["diverged"] and saved["landscape"]["branch"]["psi"] == [None, None]
    assert all(r["n"] == 0 and math.isnan(r["test_loss"]) for r in res["summary"])
    table = (tmp_path / "results" / "generalization" / "MNIST_sgd_table.md").read_text()
    assert "| baseline (0 of 2 runs) | - ± - |" in table and "baseline run 1 at epoch 1, run 2 at epoch 1" in table
    assert "Teleports undone" in table and "nan" not in table
    for kind in ("sharpness", "curvature"):
        assert (tmp_path / "figures" / "generalization" / f"MNIST_sgd_{kind}.png").stat().st_size > 10000


def test_landscape_of_a_non_finite_model_is_nan_and_the_others_unchanged(monkeypatch):
    from lib.metrics import psi, random_directions, random_lie_elements
    data = synthetic("MNIST", 60, 20, seed=2)
    W, _ = make_model([784, 8, 6, 10], [1, 2, 3], "sgd", 0.02)
    g = torch.Generator().manual_seed(0)
    ts, curves = [0.01, 0.02], [random_lie_elements(W, g)]
    args = (data.x_train, data.y_train, ACT, ts, random_directions(W, 2, "sphere", g), curves)
    good = tsc.landscape(W, *args)
    with torch.no_grad():
        W[1][1, 0, 0] = float("nan")
        W[0][2] *= 1e30  # finite, absurd
    # and psi's linear algebra failing on the absurd model (an SVD that does not converge)
    failing = lambda W, *a: psi(W, *a) if W[0].abs().max() < 1e20 else torch.linalg.pinv(torch.full((2, 2), math.nan))  # noqa: E731
    monkeypatch.setattr(tsc, "psi", failing)
    bad = tsc.landscape(W, *args)
    assert math.isnan(bad["phi"][1]) and math.isnan(bad["psi"][1]) and math.isnan(bad["psi"][2])
    assert bad["phi"][2] > 1e20
    assert bad["phi"][0] == pytest.approx(good["phi"][0], rel=1e-6) and bad["psi"][0] == pytest.approx(good["psi"][0], rel=1e-5)
