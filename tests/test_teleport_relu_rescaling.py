"""teleport_relu_rescaling.py: the exact rescaling teleport vs GL(46), on tiny fake MNIST files."""
import json
import os
import subprocess
import sys

import pytest
import torch

import teleport_relu_rescaling as script
from lib.arms import ArmHook, Moments
from lib.config import resolve, run
from lib.data import load, write_fake
from lib.models import activation, forward
from lib.teleport import make_objective
from lib.train import fit, make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return write_fake(str(tmp_path_factory.mktemp("data")), "MNIST", n_train=200, n_test=100)


def _per_sample(W, X, Y, act):
    """Cross-entropy of every sample under every model, (K, B)."""
    out = forward(W, X, act)  # (K, B, C)
    return torch.nn.functional.cross_entropy(out.transpose(1, 2), Y.expand(out.shape[0], -1), reduction="none")


def _teleport_once(arm, data, act, lr, reject_drift=float("inf"), obj="grad_norm"):
    """One teleport moment of the script's arm `arm` (5 steps, batch 40) on two fresh models."""
    cfg = {**resolve(script), "OBJECTIVE": obj, "REJECT_DRIFT": reject_drift, "TELE_STEPS": 5}
    W, opt = make_model([784, 16, 10, 10], [0, 1], "sgd", 1e-2)
    hook = ArmHook(W, opt, data, act, [script.make_arm(cfg, arm, act, lr)], Moments((0,), 1, 40, 3), test_drift=True)
    before = [w.detach().clone() for w in W]
    hook(0, 0)
    return before, [w.detach().clone() for w in W], script.with_grad_norms(hook.records[arm][0], obj)


@pytest.mark.parametrize("act_name", ["relu", "leaky_relu"])
def test_rescaling_teleport_keeps_every_sample_loss_and_grows_grad_norm(fake_root, act_name):
    data, act = load("MNIST", fake_root, train_size=200), activation(act_name)
    before, after, rec = _teleport_once("rescale", data, act, lr=0.3)
    assert all(r > 1.05 * b for r, b in zip(rec["objective_after"], rec["objective_before"]))
    assert rec["grad_norm_after"] == rec["objective_after"]  # the plain objective is ||grad L||^2 itself
    assert max((a - b).abs().max().item() for a, b in zip(after, before)) > 1e-3  # the weights moved
    X = torch.cat([data.x_train, data.x_test])
    Y = torch.cat([data.y_train, data.y_test])
    ref = _per_sample(before, X, Y, act)
    assert ((_per_sample(after, X, Y, act) - ref).abs() / ref).max().item() < 1e-5
    # the recorded whole-test-set drift agrees
    for b, a in zip(rec["test_loss_before"], rec["test_loss_after"]):
        assert abs(a - b) / b < 1e-5


def test_log_objective_climbs_the_same_grad_norm(fake_root):
    data, act = load("MNIST", fake_root, train_size=200), activation("relu")
    _, after, rec = _teleport_once("rescale", data, act, lr=0.3, obj="log_grad_norm")
    W = [w.clone().requires_grad_() for w in after]
    idx = torch.randperm(200, generator=torch.Generator().manual_seed(3))[:40]  # the hook's teleport batch
    direct = make_objective("grad_norm", act)(W, data.x_train[idx], data.y_train[idx]).detach()
    assert torch.allclose(direct, torch.tensor(rec["grad_norm_after"], dtype=direct.dtype), rtol=1e-4)
    assert all(a > 1.05 * b for a, b in zip(rec["grad_norm_after"], rec["grad_norm_before"]))


def test_gl46_drifts_the_test_loss_where_rescaling_does_not(fake_root):
    data, act = load("MNIST", fake_root, train_size=200), activation("leaky_relu")
    _, _, rec = _teleport_once("gl46", data, act, lr=0.01)
    drift = [abs(a - b) / b for a, b in zip(rec["test_loss_after"], rec["test_loss_before"])]
    # batch 40 > hidden width 16: eq. (46) is not exact even on its batch, far less on the test set
    assert min(drift) > 1e-6 and max(drift) > 1e-4 and not any(rec["failed"])


def test_the_guard_undoes_a_teleport_that_moves_its_batch_loss_too_much(fake_root):
    data, act = load("MNIST", fake_root, train_size=200), activation("leaky_relu")
    before, after, rec = _teleport_once("gl46", data, act, lr=0.01, reject_drift=1e-6)
    assert rec["failed"] == [True, True]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert rec["test_loss_after"] == rec["test_loss_before"]
    # the same teleport with the script's default guard (10 %) goes through
    assert not any(_teleport_once("gl46", data, act, lr=0.01, reject_drift=0.1)[2]["failed"])


def test_gl46_last_pair_only_moves_the_last_two_layers(fake_root):
    data, act = load("MNIST", fake_root, train_size=200), activation("relu")
    before, after, rec = _teleport_once("gl46-last", data, act, lr=0.03)
    assert torch.equal(before[0], after[0])  # W_1 is outside the last pair
    assert not torch.equal(before[1], after[1]) and not torch.equal(before[2], after[2])
    assert max(a / b for a, b in zip(rec["objective_after"], rec["objective_before"])) > 1.5


def test_each_action_teleports_at_its_own_step_size_setting():
    cfg = resolve(script, ["--tele-lr-gl46=0.5", "--tele-lr-rescale=0.25"])
    act = activation("relu")
    lrs = {name: script.make_arm(cfg, name, act).teleport["lr"] for name in script.ACTIONS}
    assert lrs == {"gl46": 0.5, "gl46-last": script.TELE_LR_GL46_LAST, "rescale": 0.25}
    assert script.make_arm(cfg, "rescale", act, tele_lr=0.125).teleport["lr"] == 0.125
    assert script.make_arm(cfg, "reset-only", act).state == "reset" and script.make_arm(cfg, "none", act).state is None


def test_summarize_reads_the_right_epochs_and_drifts():
    hist = {"train_loss": [[3.0, 1.0], [2.0, 2.0], [1.0, 0.0]], "test_loss": [[5.0, 5.0], [4.0, 2.0], [1.0, 1.0]],
            "test_acc": [[0, 0], [0, 0], [50.0, 70.0]], "time_s": [1.0, 2.0, 3.0]}
    recs = [{"grad_norm_before": [1.0, 2.0], "grad_norm_after": [2.0, 8.0], "loss_before": [1.0, 1.0],
             "loss_after": [1.1, 1.0], "heldout_loss_before": [2.0, 2.0], "heldout_loss_after": [2.0, 1.0],
             "test_loss_before": [4.0, 4.0], "test_loss_after": [3.0, 4.0], "time_s": 0.5,
             "failed": [False, False]},
            {"grad_norm_before": [1.0, 1.0], "grad_norm_after": [None, 1.0], "loss_before": [1.0, 1.0],
             "loss_after": [9.0, 1.0], "heldout_loss_before": [1.0, 1.0], "heldout_loss_after": [9.0, 1.0],
             "test_loss_before": [1.0, 1.0], "test_loss_after": [9.0, 1.0], "time_s": 0.5,
             "failed": [True, False]}]  # None: an infinite gradient norm, as strict JSON saves it
    s = script.summarize(hist, recs, [1, 3])
    assert s["train_1"] == 2.0 and s["train_3"] == 0.5 and s["test_1"] == 5.0 and s["test_3"] == 1.0
    # the undone teleport (model 0, second record) is left out of the gains and drifts
    assert s["test_acc_final"] == 60.0 and s["grad_gain_median"] == 2.0 and s["failed_fraction"] == 0.25
    assert s["drift_test_median"] == 0.0 and s["drift_test_max"] == pytest.approx(0.25)
    assert s["drift_heldout_median"] == 0.0 and s["teleport_time_s"] == 0.5


@pytest.mark.parametrize("argv, message", [
    (["--activations=['tanh']"], "unknown activation 'tanh'"),
    (["--optimizers=['lbfgs']"], "unknown optimizer 'lbfgs'"),
    (["--arms=['none', 'gl54']"], "unknown arm 'gl54'"),
    (["--lr=-0.1"], "learning rate must be >= 0"),
    (["--tele-lr-rescale=-1.0"], "tele_lr_rescale must be >= 0"),
    (["--widths=[784, 10]"], "WIDTHS must list"),
    (["--dataset=SVHN"], "unknown dataset 'SVHN'"),
    (["--plot-only"], "--plot-only: no saved results at"),
])
def test_bad_input_is_one_line_error(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        run(script.main, vars(script), argv=[*argv, f"--out-dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err


def test_lr_reaches_the_training_and_the_saved_config(fake_root, tmp_path):
    argv = [f"--data-dir={fake_root}", f"--out-dir={tmp_path}", "--quick", "--progress=False", "--lr=0.05",
            "--arms=['none']", "--activations=['relu']", "--optimizers=['sgd']", "--epochs=2", "--report-epochs=[1]"]
    res = run(script.main, vars(script), argv=argv)[0]
    saved = json.load(open(tmp_path / "results" / "rescaling" / "MNIST_relu_sgd.json"))
    assert res["config"]["LR"] == saved["config"]["LR"] == 0.05
    data, act = load("MNIST", fake_root, train_size=200), activation("relu")
    cfg = resolve(script, ["--quick"])
    W, opt = make_model([784, 16, 10, 10], cfg["SEEDS"], "sgd", 0.05)
    assert opt.param_groups[0]["lr"] == 0.05
    assert saved["arms"]["none"]["history"]["train_loss"] == fit(W, opt, data, act, 2, 20, progress=False)["train_loss"]


QUICK_ARGS = ["--quick", "--progress=False", "--arms=['none', 'reset-only', 'gl46', 'rescale']",
              "--activations=['relu']", "--optimizers=['adagrad']"]


@pytest.mark.slow
def test_quick_run_as_a_subprocess(fake_root, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "teleport_relu_rescaling.py"), f"--data-dir={fake_root}",
           f"--out-dir={tmp_path}", *QUICK_ARGS]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| relu | adagrad | rescale |" in out.stdout
    assert len(os.listdir(tmp_path / "figures" / "rescaling")) == 2


def test_quick_run_writes_figures_json_and_table(fake_root, tmp_path):
    run(script.main, vars(script), argv=[f"--data-dir={fake_root}", f"--out-dir={tmp_path}", *QUICK_ARGS])
    fig_dir, res_dir = tmp_path / "figures" / "rescaling", tmp_path / "results" / "rescaling"
    figs = sorted(os.listdir(fig_dir))
    assert figs == ["MNIST_relu_adagrad_drift.png", "MNIST_relu_adagrad_loss.png"]
    assert all((fig_dir / f).stat().st_size > 2000 for f in figs)
    res = json.load(open(res_dir / "MNIST_relu_adagrad.json"))
    cfg = resolve(script, ["--quick"])
    assert res["config"]["EPOCHS"] == cfg["EPOCHS"] == 3 and "torch" in res["environment"]
    assert res["config"]["WIDTHS"] == [784, 16, 10, 10] and res["config"]["OUT_DIR"] == str(tmp_path)
    assert res["data"] == {"name": "MNIST", "source": "data_dir", "n_train": 200, "n_test": 100}
    assert res["label"] == "MNIST (200 train)"
    assert list(res["arms"]) == ["none", "reset-only", "gl46", "rescale"]
    assert res["arms"]["none"]["teleports"] == [] and res["arms"]["reset-only"]["teleports"] == []
    recs = res["arms"]["rescale"]["teleports"]
    assert len(recs) == len(cfg["TELE_EPOCHS"]) * cfg["TELE_BATCHES"]  # epochs 0 and 2, 2 batches each
    assert {"grad_norm_before", "grad_norm_after", "test_loss_before", "test_loss_after", "failed"} <= set(recs[0])
    assert res["arms"]["rescale"]["summary"]["drift_test_max"] < 1e-5
    assert res["arms"]["rescale"]["summary"]["grad_gain_median"] > 1
    assert len(res["arms"]["gl46"]["history"]["test_loss"]) == 3
    table = json.load(open(res_dir / "MNIST_table.json"))
    assert len(table["rows"]) == 4 and len(table["header"]) == len(table["rows"][0])
    assert (res_dir / "MNIST_table.md").read_text().count("\n") == 2 + 4
    # Adagrad has state: the reset alone changes the run, so reset-only is a real control
    h = {a: res["arms"][a]["history"]["train_loss"][-1] for a in ("none", "reset-only")}
    assert h["none"] != h["reset-only"]
    assert not [f for f in os.listdir(res_dir) if f.startswith(".tmp") or f.endswith(".pt")]
    # the figures can be redrawn from the saved results alone
    os.remove(fig_dir / "MNIST_relu_adagrad_loss.png")
    script.main(resolve(script, ["--quick", f"--out-dir={tmp_path}", "--plot-only",
                                 "--activations=['relu']", "--optimizers=['adagrad']"]))
    assert (fig_dir / "MNIST_relu_adagrad_loss.png").exists()
