"""teleport_optimization.py: quick runs through the real loading code on tiny IDX files, the
control arms, per-optimizer presets that yield to --lr/--tele-lr/--tele-epoch, --plot-only on
the committed results, and one-line errors."""
import json
import os
import shutil
import sys

import pytest
import torch

from lib.config import resolve, run
from lib.data import load, write_fake

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import teleport_optimization as script  # noqa: E402


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
    """The committed files were saved before the presets (their configs hold OPTIMIZER_SETTINGS,
    F12_* names, no data record): --plot-only still redraws them, into a copy."""
    res = tmp_path / "results" / "optimization"
    res.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "results", "optimization", "MNIST_momentum.json"), res)
    saved = json.loads((res / "MNIST_momentum.json").read_text())
    assert "OPTIMIZER_SETTINGS" in saved["config"] and "data" not in saved
    run(script.main, vars(script), argv=["--plot-only", f"--out-dir={tmp_path}", "--optimizers-run=['momentum']",
                                         "--progress=False"])
    assert (tmp_path / "figures" / "optimization" / "MNIST_momentum_loss_vs_time.png").stat().st_size > 1000
    assert "| momentum | teleport-transport |" in (res / "MNIST_summary.md").read_text()


def _tiny_run(tmp_path, *args):
    """One optimizer, few arms, 1-2 epochs on tiny fake MNIST; returns its saved results and the
    learning rates the optimizers were built with (read from torch's param_groups)."""
    if not (tmp_path / "data").exists():
        write_fake(tmp_path / "data", "MNIST", n_train=120, n_test=40, seed=3)
    lrs, fit = [], script.fit
    def spy(W, opt, *a, **k):
        lrs.append(opt.param_groups[0]["lr"])
        return fit(W, opt, *a, **k)
    script.fit = spy
    try:
        cfg = _cfg(tmp_path, optimizers_run="['adam']", **dict(a.lstrip("-").split("=", 1) for a in args))
        script.main(cfg)
    finally:
        script.fit = fit
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
    arms = script.declare_arms(ocfg)
    base = script.run_arm(ocfg, data, "adam", arms["baseline"])
    none = script.run_arm({**ocfg, "TELE_BATCHES": 0}, data, "adam", arms["reset-only"])
    assert none["train_loss"] == base["train_loss"] and none["test_loss"] == base["test_loss"]
    reset = script.run_arm(ocfg, data, "adam", arms["reset-only"])  # with its moments it does differ
    assert reset["train_loss"] != base["train_loss"] and len(reset["teleports"]) == ocfg["TELE_BATCHES"]


@pytest.mark.parametrize("args,match", [(["--optimizers-run=['lbfgs']"], "unknown optimizer 'lbfgs'"),
                                        (["--arms=['baseline','warp']"], "unknown arm 'warp'"),
                                        (["--arms=['random-teleport']"], "needs the 'teleport' arm"),
                                        (["--dataset=SVHN"], "unknown dataset 'SVHN'"),
                                        (["--lr=-1"], "lr must be > 0"),
                                        (["--lr=fast"], "--lr: expected a number"),
                                        (["--tele-epoch=3"], "tele_epoch 3 is not below epochs = 3"),
                                        (["--optimizer-settings={}"], "unknown setting"),
                                        (["--figure=12"], "unknown setting"),
                                        (["--plot-only"], "--plot-only: no saved results")])
def test_bad_input_is_one_line_error(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as exc:
        run(script.main, vars(script), argv=["--quick", f"--data-dir={tmp_path}", f"--out-dir={tmp_path}"] + args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and match in err and err.count("\n") == 1


def test_missing_data_offline_is_the_libs_one_line_error(tmp_path, capsys, monkeypatch):
    import lib.data
    monkeypatch.setattr(lib.data, "_reachable", lambda hosts, timeout=5.0: False)
    with pytest.raises(SystemExit) as exc:  # no bundled copy of FashionMNIST
        run(script.main, vars(script), argv=["--quick", "--dataset=FashionMNIST", f"--data-dir={tmp_path}",
                                             f"--out-dir={tmp_path}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: FashionMNIST not found") and "--data-dir" in err
    assert err.count("\n") == 1
