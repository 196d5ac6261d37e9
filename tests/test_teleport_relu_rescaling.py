"""teleport_relu_rescaling.py: the exact rescaling teleport vs GL(46), on tiny fake MNIST files;
the defaults as the committed protocol (other settings or data do not replace saved results),
resume after an interruption, divergence as a result."""
import json
import os
import subprocess
import sys

import pytest
import torch

import lib.progress
import teleport_relu_rescaling as script
from lib.arms import ArmHook, Moments
from lib.config import resolve, run
from lib.data import load, write_fake
from lib.models import activation, forward
from lib.progress import PLUMBING
from lib.teleport import make_objective
from lib.train import fit, make_model
from conftest import interrupted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files(root):
    """{path: bytes} of every output file under root (the hidden .progress/ and .staging-* aside)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}



pytestmark = pytest.mark.usefixtures("one_thread")  # as the script uses on a CPU

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


def test_a_diverged_seed_is_left_out_of_the_summary_with_a_count(tmp_path):
    nan = float("nan")
    hist = {"train_loss": [[1.0, 1.0], [0.5, nan]], "test_loss": [[1.0, 2e7], [0.6, None]],  # seed 1: epoch 1
            "test_acc": [[50.0, 10.0], [60.0, 10.0]], "time_s": [1.0, 2.0], "test_loss_init": [2.3, 2.3]}
    recs = [{"grad_norm_before": [1.0, 1.0], "grad_norm_after": [2.0, 1e9], "loss_before": [1.0, 1.0],
             "loss_after": [1.0, 1.0], "test_loss_before": [1.0, 1.0], "test_loss_after": [1.0, 1e9],
             "failed": [False, False]}]
    s = script.summarize(hist, recs, [1, 2])
    assert s["diverged"] == [None, 1] and s["n_diverged"] == 1
    assert s["train_2"] == 0.5 and s["test_1"] == 1.0 and s["test_acc_final"] == 60.0
    assert s["grad_gain_median"] == 2.0 and s["drift_test_max"] == 0.0  # not 1e9 from the diverged seed
    res = {"tag": "MNIST", "activation": "relu", "optimizer": "sgd", "config": {"TELE_EPOCHS": [0], "SEEDS": [0, 1]},
           "arms": {"gl46": {"history": hist, "teleports": recs}}}
    header, rows = script.table({"REPORT_EPOCHS": [2], "EPOCHS": 2}, [res])
    assert rows[0][-1] == "1 of 2 (from epoch 1)" and rows[0][header.index("‖∇L‖² gain (median)")] == 2.0
    script.plot_loss(res, tmp_path / "loss.png", 50)
    script.plot_drift(res, tmp_path / "drift.png", 50)
    assert (tmp_path / "loss.png").stat().st_size > 2000 and (tmp_path / "drift.png").stat().st_size > 2000


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
    # the figures can be redrawn from the saved results alone; the results are left as they are
    os.remove(fig_dir / "MNIST_relu_adagrad_loss.png")
    saved = {k: v for k, v in _files(tmp_path).items() if k.startswith("results")}
    script.main(resolve(script, ["--quick", f"--out-dir={tmp_path}", "--plot-only",
                                 "--activations=['relu']", "--optimizers=['adagrad']"]))
    assert (fig_dir / "MNIST_relu_adagrad_loss.png").exists()
    assert {k: v for k, v in _files(tmp_path).items() if k.startswith("results")} == saved


def test_defaults_are_the_committed_protocol():
    """The plain command's settings are those of the committed results/rescaling/MNIST_*.json,
    on every setting both name alike (a pair's file: but the list of pairs; WIDTHS None there is
    the dataset's preset; the step sizes under their older name TELE_LR too)."""
    cfg = resolve(script)
    names = [f"MNIST_{a}_{o}.json" for a in ("relu", "leaky_relu") for o in ("sgd", "adagrad")] + ["MNIST_table.json"]
    for name in names:
        saved = json.load(open(os.path.join(ROOT, "results", "rescaling", name)))["config"]
        shared = set(saved) & set(cfg) - PLUMBING - ({"ACTIVATIONS", "OPTIMIZERS"} if "table" not in name else set())
        assert len(shared) >= 18 and "ARMS" in shared and "EPOCHS" in shared
        assert {k: cfg[k] for k in shared} == {k: script.PRESETS["DATASET"]["MNIST"]["WIDTHS"]
                                               if k == "WIDTHS" and saved[k] is None else saved[k] for k in shared}
        lrs = saved.get("TELE_LR") or {arm: saved[k] for arm, k in script.TELE_LR_SETTING.items()}
        assert lrs == {arm: cfg[k] for arm, k in script.TELE_LR_SETTING.items()}


def _no_figures(monkeypatch):
    """Figures as stand-in files (matplotlib is slow; the figures have tests of their own)."""
    for name in ("plot_loss", "plot_drift"):
        monkeypatch.setattr(script, name, lambda res, path, dpi: open(path, "w").write(res["optimizer"]))


def test_other_settings_or_data_do_not_replace_saved_results(fake_root, tmp_path, capsys, monkeypatch):
    """Saved results of other settings (or made on other data) are refused in one line before any
    training; --replace replaces them; a pair's file does not depend on which other pairs run."""
    _no_figures(monkeypatch)
    out = tmp_path / "out"
    base = [f"--data-dir={fake_root}", f"--out-dir={out}", "--quick", "--progress=False", "--arms=['none']",
            "--activations=['relu']", "--optimizers=['sgd']", "--epochs=1", "--report-epochs=[1]"]
    run(script.main, vars(script), argv=base)
    before = _files(out)
    other_data = write_fake(str(tmp_path / "other"), "MNIST", n_train=120, n_test=100)
    refused = {"--lr=0.05": "LR=0.05 (saved: 0.01)",  # the pair's file and the table
               "--activations=['relu','leaky_relu']": "ACTIVATIONS=['relu', 'leaky_relu'] (saved: ['relu'])",  # table
               f"--data-dir={other_data}": "200/100 training/test images, this run has 120/100"}
    for arg, said in refused.items():
        with pytest.raises(SystemExit) as e:
            run(script.main, vars(script), argv=[*base, arg])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and said in err and "--replace" in err
    assert _files(out) == before
    run(script.main, vars(script), argv=[*base, "--lr=0.05", "--replace"])
    saved = json.loads((out / "results" / "rescaling" / "MNIST_relu_sgd.json").read_text())
    assert saved["config"]["LR"] == 0.05
    # the relu pair's file made alone is the same protocol as the relu pair of a run of both activations
    script.check_replace(str(out / "results" / "rescaling" / "MNIST_relu_sgd.json"),
                         script.saved_config(resolve(script, [*base, "--lr=0.05", "--activations=['relu','leaky_relu']",
                                                              "--optimizers=['sgd','adagrad']"])),
                         ignore=("ACTIVATIONS", "OPTIMIZERS"))


RESUME_ARGS = ["--quick", "--progress=False", "--activations=['relu']", "--optimizers=['sgd','adagrad']",
               "--arms=['none','gl46']", "--checkpoint-s=0"]


def test_interrupted_run_resumes_to_the_same_numbers_and_keeps_the_previous_set(fake_root, tmp_path, capsys,
                                                                                 monkeypatch):
    """Stopped in a later unit (Adagrad's gl46 arm, before the teleports of epoch 2, progress saved
    at every epoch), the run leaves the previous output set as it was; the same command then resumes
    (the finished units are not run again, the stopped one goes on from its last epoch) and ends with
    the numbers of the uninterrupted run that made the previous set."""
    _no_figures(monkeypatch)
    argv = [f"--data-dir={fake_root}", f"--out-dir={tmp_path}", *RESUME_ARGS]
    run(script.main, vars(script), argv=argv)
    previous = _files(tmp_path)
    whole = {o: json.loads(previous[f"results/rescaling/MNIST_relu_{o}.json"]) for o in ("sgd", "adagrad")}

    class StopInAdagradGL46(ArmHook):
        def __call__(self, epoch, i):
            if isinstance(self.opt, torch.optim.Adagrad) and self.arms[0].name == "gl46" and (epoch, i) == (2, 0):
                raise KeyboardInterrupt
            super().__call__(epoch, i)
    monkeypatch.setattr(script, "ArmHook", StopInAdagradGL46)
    try:
        err = interrupted(capsys, script, argv)
        assert "progress saved (relu adagrad gl46, epoch 2 of 3)" in err.splitlines()[-1]
        assert _files(tmp_path) == previous and not list(tmp_path.glob(".staging-*"))
        monkeypatch.setattr(script, "ArmHook", ArmHook)
        built, make = [], script.make_model
        monkeypatch.setattr(script, "make_model", lambda *a, **k: built.append(a[2]) or make(*a, **k))
        run(script.main, vars(script), argv=argv)
    finally:
        lib.progress.ACTIVE.clear()
    assert "resuming" in capsys.readouterr().err and built == ["adagrad"]  # gl46, resumed
    assert not list((tmp_path / ".progress").iterdir())
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time_s"} for r in recs]  # noqa: E731
    for opt, a in whole.items():
        b = json.loads((tmp_path / "results" / "rescaling" / f"MNIST_relu_{opt}.json").read_text())
        assert list(b["arms"]) == ["none", "gl46"]
        for arm in a["arms"]:
            for k in ("train_loss", "test_loss", "test_acc"):
                torch.testing.assert_close(torch.tensor(b["arms"][arm]["history"][k]),
                                           torch.tensor(a["arms"][arm]["history"][k]), rtol=1e-6, atol=0)
            assert strip(b["arms"][arm]["teleports"]) == strip(a["arms"][arm]["teleports"])
    assert len(whole["adagrad"]["arms"]["gl46"]["teleports"]) == 4  # epochs 0 and 2, none repeated


def test_an_absurd_learning_rate_is_a_result(fake_root, tmp_path, capsys):
    """At lr 1e6 every model diverges: the run completes, records the epoch, draws the figures,
    and neither the table nor the console shows a loss or a gain computed from diverged models."""
    run(script.main, vars(script), argv=[f"--data-dir={fake_root}", f"--out-dir={tmp_path}", "--quick",
                                         "--progress=False", "--lr=1e6", "--activations=['relu']",
                                         "--optimizers=['sgd']", "--arms=['none','gl46','rescale']"])
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "results" / "rescaling" / "MNIST_relu_sgd.json").read_text())
    for arm, r in res["arms"].items():
        assert r["diverged"] == [1, 1] and r["summary"]["n_diverged"] == 2
        assert r["summary"]["train_3"] is None and r["summary"]["grad_gain_median"] is None
    table = json.loads((tmp_path / "results" / "rescaling" / "MNIST_table.json").read_text())
    assert [row[-1] for row in table["rows"]] == ["2 of 2 (from epoch 1)"] * 3
    assert all(v is None for row in table["rows"] for v in row[3:-6])  # losses, accuracy, gains, drifts
    assert "| relu | sgd | gl46 | – | – | – | – | – | – | – | – | – | 50 |" in out
    for kind in ("loss", "drift"):
        assert (tmp_path / "figures" / "rescaling" / f"MNIST_relu_sgd_{kind}.png").stat().st_size > 2000
