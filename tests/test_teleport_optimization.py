"""teleport_optimization.py: quick runs through the real loading code on tiny IDX files, the
control arms, per-optimizer presets that yield to --lr/--tele-lr/--tele-epoch, --plot-only on
the committed results, the defaults as the committed protocol (other settings or data do not
replace it), resume after an interruption, divergence and failed teleports as results, and
one-line errors."""
import json
import os
import shutil
import sys

import pytest
import torch

import lib.progress
from lib.config import UsageError, resolve, run, with_preset
from lib.data import load, write_fake
from lib.io import check_replace
from lib.progress import Checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import teleport_optimization as script  # noqa: E402
from conftest import interrupted, usage_error  # noqa: E402


def _cfg(tmp_path, **kw):
    argv = [f"--data-dir={tmp_path / 'data'}", f"--out-dir={tmp_path / 'out'}", "--quick"]
    return resolve(script, argv + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def _saved(out, opt):
    return json.loads((out / "results" / "optimization" / f"MNIST_{opt}.json").read_text())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick --controls run on tiny fake MNIST files, in process."""
    tmp = tmp_path_factory.mktemp("fig5")
    write_fake(tmp / "data", "MNIST", n_train=200, n_test=100, seed=0)
    cfg = _cfg(tmp, controls=True, optimizers_run="['adagrad','adam']")  # epoch-2 and epoch-0 teleports
    script.main(cfg)
    return tmp / "out", cfg


def test_quick_run_writes_figures_json_and_every_arm(quick_run):
    out, cfg = quick_run
    for opt in cfg["OPTIMIZERS_RUN"]:
        for kind in ("epoch", "time"):
            png = out / "figures" / "optimization" / f"MNIST_{opt}_loss_vs_{kind}.png"
            assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
        res = _saved(out, opt)
        preset = script.PRESETS["OPTIMIZER"][opt]
        assert {k: res["config"][k] for k in preset} == preset  # the per-optimizer resolved config
        assert res["config"]["EPOCHS"] == 3 and res["environment"]["torch"] == torch.__version__
        assert res["data"]["n_train"] == 200 and res["data"]["label"] == "MNIST (200 train)"
        assert list(res["arms"]) == ["baseline", "teleport", "reset-only", "teleport-keep", "teleport-transport",
                                     "random-teleport"]
        for arm, h in res["arms"].items():
            assert len(h["train_loss"]) == 3 and len(h["test_loss"]) == 3 and len(h["time_s"]) == 3
            assert len(h["train_loss"][0]) == cfg["N_RUNS"]
            assert len(h["teleports"]) == (0 if arm == "baseline" else cfg["TELE_BATCHES"])
            assert all(r["epoch"] == preset["TELE_EPOCH"] for r in h["teleports"])
    summ = json.loads((out / "results" / "optimization" / "MNIST_summary.json").read_text())
    assert set(summ["verdicts"]) == set(cfg["OPTIMIZERS_RUN"])
    assert "reset-only" in (out / "results" / "optimization" / "MNIST_summary.md").read_text()


def test_teleport_raises_grad_norm_and_random_arm_reuses_its_norms(quick_run):
    out, cfg = quick_run
    for opt in cfg["OPTIMIZERS_RUN"]:
        tele = _saved(out, opt)["arms"]["teleport"]["teleports"]
        after = torch.tensor([r["objective_after"] for r in tele])
        before = torch.tensor([r["objective_before"] for r in tele])
        assert after.mean() > before.mean() and "heldout_loss_after" in tele[0]
        if opt == "adagrad":  # step size 1e-4: every single teleport climbs ||grad L||^2
            assert (after > before).all()
    res = _saved(out, "adam")["arms"]
    tele, rand = res["teleport"]["teleports"], res["random-teleport"]["teleports"]
    assert [r["algebra_norm"] for r in rand] == [r["algebra_norm"] for r in tele]
    # the teleport batch before the first teleport is the same images, same weights, in both arms
    assert rand[0]["loss_before"] == tele[0]["loss_before"]
    assert res["random-teleport"]["train_loss"] != res["teleport"]["train_loss"]


def test_adagrad_arms_are_identical_before_the_teleport_epoch(quick_run):
    out, _ = quick_run
    res = _saved(out, "adagrad")["arms"]
    for arm, h in res.items():  # AdaGrad teleports before the 3rd epoch (0-based epoch 2)
        assert h["train_loss"][:2] == res["baseline"]["train_loss"][:2], arm
        if arm != "baseline":
            assert h["train_loss"][2] != res["baseline"]["train_loss"][2], arm


def test_plot_only_redraws_from_saved_results(quick_run, tmp_path):
    out, cfg = quick_run
    png = out / "figures" / "optimization" / "MNIST_adam_loss_vs_epoch.png"
    png.unlink()
    script.main({**cfg, "PLOT_ONLY": True, "OPTIMIZERS_RUN": ["adam"], "DATA_DIR": str(tmp_path / "nothing-here")})
    assert png.exists()


def test_plot_only_copes_with_the_committed_results(tmp_path, capsys):
    """--plot-only redraws the committed results, into a copy, and leaves every results file as
    it was (the summary is printed, not rewritten)."""
    res = tmp_path / "results" / "optimization"
    res.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "results", "optimization", "MNIST_momentum.json"), res)
    before = (res / "MNIST_momentum.json").read_bytes()
    saved = json.loads(before)
    assert saved["config"]["LR"] == 1e-3 and saved["data"]["n_train"] == 4000
    run(script.main, vars(script), argv=["--plot-only", f"--out-dir={tmp_path}", "--optimizers-run=['momentum']",
                                         "--progress=False"])
    assert (tmp_path / "figures" / "optimization" / "MNIST_momentum_loss_vs_time.png").stat().st_size > 1000
    assert "| momentum | teleport-transport |" in capsys.readouterr().out
    assert sorted(p.name for p in res.iterdir()) == ["MNIST_momentum.json"]
    assert (res / "MNIST_momentum.json").read_bytes() == before


def test_defaults_are_the_committed_protocol():
    """The plain command's settings are those of the committed 6-arm results; other settings are
    refused, naming the difference."""
    cfg = resolve(script, [])
    assert cfg["CONTROLS"] and cfg["OPTIMIZERS_RUN"] == ["adagrad", "momentum", "rmsprop", "adam"]
    committed = os.path.join(ROOT, "results", "optimization", "MNIST_{}.json")
    for opt in cfg["OPTIMIZERS_RUN"]:
        check_replace(committed.format(opt), script.saved_config(with_preset(cfg, script.PRESETS, "OPTIMIZER", opt)))
    check_replace(committed.format("summary"), script.saved_config(cfg))
    for args, diff in ((["--controls=False"], "CONTROLS=False"), (["--lr=0.05"], "LR=0.05"), (["--epochs=3"], "EPOCHS=3")):
        other = resolve(script, args)
        with pytest.raises(UsageError, match=diff):
            check_replace(committed.format("adam"), script.saved_config(
                with_preset(other, script.PRESETS, "OPTIMIZER", "adam")))
    check_replace(committed.format("adam"), {**script.saved_config(resolve(script, ["--epochs=3"])),
                                                  "REPLACE": True})


def test_other_settings_or_data_do_not_replace_saved_results(tmp_path, capsys):
    res = tmp_path / "results" / "optimization"
    res.mkdir(parents=True)
    for name in ("MNIST_adam.json", "MNIST_summary.json"):
        shutil.copy(os.path.join(ROOT, "results", "optimization", name), res)
    with pytest.raises(SystemExit) as exc:  # the committed protocol with 3 epochs: refused before any work
        run(script.main, vars(script), argv=["--epochs=3", f"--out-dir={tmp_path}", f"--data-dir={tmp_path}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "EPOCHS=3 (saved: 40)" in err and "--replace" in err
    write_fake(tmp_path / "small", "MNIST", n_train=100, n_test=40, seed=3)
    _tiny_run(tmp_path / "a", "--arms=['baseline']", "--epochs=1")  # 120 training images
    with pytest.raises(UsageError, match="120/40 training/test images, this run has 100/40"):  # same settings, other data
        script.main(_cfg(tmp_path / "a", arms="['baseline']", epochs=1, optimizers_run="['adam']", controls=False,
                         data_dir=tmp_path / "small"))


def _tiny_run(tmp_path, *args):
    """A --quick run of Adam alone on tiny fake MNIST; returns its saved results and the
    learning rates the optimizers were built with (read from torch's param_groups)."""
    if not (tmp_path / "data").exists():
        write_fake(tmp_path / "data", "MNIST", n_train=120, n_test=40, seed=3)
    lrs, make = [], script.make_model
    def spy(*a, **k):
        W, opt = make(*a, **k)
        lrs.append(opt.param_groups[0]["lr"])
        return W, opt
    script.make_model = spy
    try:
        cfg = _cfg(tmp_path, optimizers_run="['adam']", controls=False, **dict(a.lstrip("-").split("=", 1) for a in args))
        script.main({**cfg, "REPLACE": True})
    finally:
        script.make_model = make
    return _saved(tmp_path / "out", "adam"), lrs


def test_lr_reaches_the_optimizer_and_is_recorded(tmp_path):
    base, lrs0 = _tiny_run(tmp_path, "--arms=['baseline']", "--epochs=1")
    fast, lrs1 = _tiny_run(tmp_path, "--arms=['baseline']", "--epochs=1", "--lr=0.05")
    assert lrs0 == [script.PRESETS["OPTIMIZER"]["adam"]["LR"]] and lrs1 == [0.05]
    assert base["config"]["LR"] == 1e-4 and fast["config"]["LR"] == 0.05
    assert fast["arms"]["baseline"]["train_loss"] != base["arms"]["baseline"]["train_loss"]


def test_partial_override_keeps_the_other_presets(tmp_path):
    saved, lrs = _tiny_run(tmp_path, "--arms=['teleport']", "--epochs=2", "--tele-epoch=1", "--tele-lr=0.01")
    assert lrs == [1e-4] and saved["config"]["LR"] == 1e-4  # from the preset
    assert saved["config"]["TELE_EPOCH"] == 1 and saved["config"]["TELE_LR"] == 0.01
    assert all(r["epoch"] == 1 for r in saved["arms"]["teleport"]["teleports"])
    arm = script.declare_arms(script.with_preset(_cfg(tmp_path, tele_lr=0.01), script.PRESETS, "OPTIMIZER", "adagrad"))
    assert arm["teleport"].teleport["lr"] == 0.01 and arm["random-teleport"].teleport["lr"] == 0.01


def test_reset_only_without_moments_is_bitwise_the_baseline(tmp_path):
    write_fake(tmp_path, "MNIST", n_train=120, n_test=40, seed=3)
    data = load("MNIST", tmp_path, download=False)
    ocfg = script.with_preset({**_cfg(tmp_path), "N_RUNS": 2, "EPOCHS": 3}, script.PRESETS, "OPTIMIZER", "adam")
    arms, ckpt = script.declare_arms(ocfg), Checkpoint(ocfg, "test")
    base = script.run_arm(ocfg, data, "adam", arms["baseline"], ckpt)
    none = script.run_arm({**ocfg, "TELE_BATCHES": 0}, data, "adam", arms["reset-only"], Checkpoint(ocfg, "other"))
    assert none["train_loss"] == base["train_loss"] and none["test_loss"] == base["test_loss"]
    reset = script.run_arm(ocfg, data, "adam", arms["reset-only"], Checkpoint(ocfg, "third"))  # with its moments it does differ
    assert reset["train_loss"] != base["train_loss"] and len(reset["teleports"]) == ocfg["TELE_BATCHES"]


@pytest.mark.parametrize("args,match", [(["--optimizers-run=['lbfgs']"], "unknown optimizer 'lbfgs'"),
                                        (["--arms=['baseline','warp']"], "unknown arm 'warp'"),
                                        (["--arms=['random-teleport']", "--controls=False"], "needs the 'teleport' arm"),
                                        (["--arms=['baseline']"], "--controls=False runs the ARMS alone"),
                                        (["--dataset=SVHN"], "unknown dataset 'SVHN'"),
                                        (["--lr=-1"], "lr must be > 0"),
                                        (["--lr=fast"], "--lr: expected a number"),
                                        (["--tele-epoch=3"], "tele_epoch 3 is not below epochs = 3"),
                                        (["--optimizer-settings={}"], "unknown setting"),
                                        (["--figure=12"], "unknown setting"),
                                        (["--plot-only"], "--plot-only: no saved results")])
def test_bad_input_is_one_line_error(tmp_path, capsys, args, match):
    argv = ["--quick", f"--data-dir={tmp_path}", f"--out-dir={tmp_path}"] + args
    assert match in usage_error(capsys, script, argv)


def test_missing_data_offline_is_the_libs_one_line_error(tmp_path, capsys, monkeypatch):
    import lib.data
    monkeypatch.setattr(lib.data, "_reachable", lambda hosts, timeout=5.0: False)
    with pytest.raises(SystemExit) as exc:  # no bundled copy of FashionMNIST
        run(script.main, vars(script), argv=["--quick", "--dataset=FashionMNIST", f"--data-dir={tmp_path}",
                                             f"--out-dir={tmp_path}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: FashionMNIST not found") and "--data-dir" in err
    assert err.count("\n") == 1


def _files(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and ".progress" not in p.parts}


def test_interrupted_run_resumes_to_the_same_numbers_and_keeps_the_previous_outputs(tmp_path, capsys, monkeypatch):
    """Stopped during a later unit (Adam's teleport arm, epoch 2 of 3, with progress saved at every
    epoch), the run leaves the previous output set as it was; the same command then resumes
    (the finished units are not run again, the stopped one goes on from its last epoch) and ends
    with the numbers of an uninterrupted run."""
    write_fake(tmp_path / "data", "MNIST", n_train=120, n_test=40, seed=3)
    args = ["--quick", f"--data-dir={tmp_path / 'data'}", "--optimizers-run=adagrad,adam", "--controls=False",
            "--arms=['baseline','teleport','random-teleport']", "--checkpoint-s=0"]
    script.main(resolve(script, args + [f"--out-dir={tmp_path / 'whole'}"]))
    out = tmp_path / "out"
    shutil.copytree(tmp_path / "whole", out)  # the previous complete set
    previous = _files(out)

    class StopInAdamTeleport(script.ArmHook):
        def __call__(self, epoch, i):
            if getattr(self.opt, "name", None) == "adam" and self.arms[0].name == "teleport" and (epoch, i) == (2, 0):
                raise KeyboardInterrupt
            super().__call__(epoch, i)
    monkeypatch.setattr(script, "ArmHook", StopInAdamTeleport)
    try:
        err = interrupted(capsys, script, args + [f"--out-dir={out}"])
        assert "progress saved (adam teleport, epoch 2 of 3)" in err.splitlines()[-1]
        assert _files(out) == previous and not list(out.glob(".staging-*"))
        monkeypatch.setattr(script, "ArmHook", script.ArmHook.__mro__[1])
        built, make = [], script.make_model
        monkeypatch.setattr(script, "make_model", lambda *a, **k: built.append(a[1]) or make(*a, **k))
        script.main(resolve(script, args + [f"--out-dir={out}"]))
    finally:
        lib.progress.ACTIVE.clear()
    assert "resuming" in capsys.readouterr().err and len(built) == 2  # adam's teleport (resumed) and random-teleport
    assert not (out / ".progress" / "teleport_optimization-MNIST.pt").exists()
    for opt in ("adagrad", "adam"):
        a, b = _saved(tmp_path / "whole", opt)["arms"], _saved(out, opt)["arms"]
        assert list(a) == list(b) == ["baseline", "teleport", "random-teleport"]
        for arm in a:
            for k in ("train_loss", "test_loss", "test_acc"):
                torch.testing.assert_close(torch.tensor(b[arm][k]), torch.tensor(a[arm][k]), rtol=1e-6, atol=0)
            strip = lambda recs: [{k: v for k, v in r.items() if k != "time_s"} for r in recs]  # noqa: E731
            assert strip(b[arm]["teleports"]) == strip(a[arm]["teleports"])
    assert _files(out) != previous  # the resumed run's set replaced it


def test_divergence_is_a_result(tmp_path):
    """At lr 1e6 momentum and AdaGrad diverge: the run completes, records each run's divergence
    epoch, draws the figures and says 'diverged' instead of reporting a gain."""
    write_fake(tmp_path / "data", "MNIST", n_train=120, n_test=40, seed=3)
    script.main(_cfg(tmp_path, lr=1e6, optimizers_run="['momentum','adagrad']"))
    out = tmp_path / "out"
    for opt in ("momentum", "adagrad"):
        for kind in ("epoch", "time"):
            assert (out / "figures" / "optimization" / f"MNIST_{opt}_loss_vs_{kind}.png").stat().st_size > 1000
        arms = _saved(out, opt)["arms"]
        assert all(d is not None and 1 <= d <= 3 for h in arms.values() for d in h["diverged"])
    summ = json.loads((out / "results" / "optimization" / "MNIST_summary.json").read_text())
    md = (out / "results" / "optimization" / "MNIST_summary.md").read_text()
    for opt in ("momentum", "adagrad"):
        v = summ["verdicts"][opt]
        assert v["gain"] is None and "diverged" in v["text"] and "lowers" not in v["text"]
        assert v["diverged"] == {"baseline": 2, "teleport": 2}
    assert "| momentum | baseline | diverged / diverged |" in md and "lowers" not in md


def test_partly_diverged_runs_are_left_out_of_the_means_with_a_count(tmp_path):
    res = {arm: {"train_loss": [[1.0, 1.0], [0.5 - d, float("nan") if arm == "teleport" else 0.6],
                                [0.4 - d, float("nan") if arm == "teleport" else 0.5]],
                 "test_loss": [[1.0, 1.0]] * 3, "test_acc": [[50.0, 50.0]] * 3, "time_s": [1.0, 2.0, 3.0],
                 "teleports": []} for arm, d in (("baseline", 0.0), ("teleport", 0.1), ("reset-only", 0.05))}
    md, summ = script.summary({"DATASET": "MNIST", "N_RUNS": 2, "EPOCHS": 3, "REPORT_EPOCHS": [1, 3],
                               "CONTROL_EPOCHS": [3]}, {"adam": res})
    v = summ["verdicts"]["adam"]
    assert v["diverged"] == {"baseline": 0, "teleport": 1}
    assert v["gain"] == pytest.approx(0.2 / 3) and v["share"]["reset-only"] == pytest.approx(0.5)
    assert "the 1 of 2 runs that diverged in neither arm" in v["text"]
    assert summ["per_arm"]["adam"]["teleport"]["diverged"] == [None, 2]
    assert "| adam | teleport | 1 (1 of 2 runs) / 1 (1 of 2 runs) | 0.3 (1 of 2 runs) / 1 (1 of 2 runs) | 3.0 (0.0) " \
           "| 1 (from epoch 2) |" in md and "| adam | baseline | 1 / 1 | 0.45 / 1 |" in md
    script.plot_optimizer(res, "partly diverged", str(tmp_path / "fig"))
    assert (tmp_path / "fig_loss_vs_epoch.png").stat().st_size > 1000


def test_failed_teleports_leave_the_weights_and_do_not_stop_the_run(tmp_path, monkeypatch):
    """A teleport whose linear algebra fails (here: every one) leaves the models where they were:
    the teleport arm trains exactly as reset-only, and random-teleport moves by norm 0."""
    write_fake(tmp_path, "MNIST", n_train=120, n_test=40, seed=3)
    data = load("MNIST", tmp_path, download=False)
    def failing(W, X, Y):
        raise torch.linalg.LinAlgError("linalg.svd: the input matrix contained non-finite values")
    monkeypatch.setattr(script, "make_objective", lambda *a, **k: failing)
    ocfg = script.with_preset({**_cfg(tmp_path), "N_RUNS": 2, "EPOCHS": 3}, script.PRESETS, "OPTIMIZER", "adagrad")
    res = script.run_optimizer(ocfg, data, "adagrad", ["baseline", "teleport", "reset-only", "random-teleport"],
                               Checkpoint(ocfg, "test"))
    tele = res["teleport"]["teleports"]
    assert len(tele) == ocfg["TELE_BATCHES"] and all("error" in r and r["failed"] == [True, True] for r in tele)
    assert res["teleport"]["train_loss"] == res["reset-only"]["train_loss"]
    assert all(r["algebra_norm"] == [[0.0, 0.0]] * 2 for r in res["random-teleport"]["teleports"])
    md, summ = script.summary({**ocfg, "REPORT_EPOCHS": [1, 3], "CONTROL_EPOCHS": [3]}, {"adagrad": res})
    assert f"{ocfg['TELE_BATCHES']} teleports failed" in summ["verdicts"]["adagrad"]["text"]
