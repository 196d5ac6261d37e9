"""teleport_cnn.py: a tiny run on fake MNIST files through the real loading code; every recorded
field read back; the teleport raises ||grad L||^2 and keeps the loss (exact rescaling); the
random arm takes the teleport's size; reset-only resets the optimizer state and does nothing
else; --lr and --tele-lr reach the run; resume after an interruption ends with the numbers of
an uninterrupted run; --plot-only; other settings do not replace saved results; one-line errors."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

import lib.progress
from lib.config import UsageError, resolve, run
from lib.data import load, write_fake
from lib.optim import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import teleport_cnn as script  # noqa: E402
from conftest import interrupted, usage_error  # noqa: E402

TINY = ["--epochs=2", "--n-runs=2", "--batch-size=32", "--tele-batch-size=16", "--tele-steps=2",
        "--tele-epochs=[0,1]", "--tele-batches=1", "--report-epochs=[1,2]", "--progress=False"]


def _args(tmp, *extra):
    return ["--quick", f"--data-dir={tmp / 'data'}", f"--out-dir={tmp / 'out'}", *TINY, *extra]


def _saved(out, name):
    return json.loads((out / "results" / "cnn" / f"MNIST_{name}.json").read_text())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One tiny run of both optimizers and all four arms on fake MNIST files, in process."""
    tmp = tmp_path_factory.mktemp("cnn")
    write_fake(tmp / "data", "MNIST", n_train=96, n_test=48, seed=0)
    cfg = resolve(script, _args(tmp))
    script.main(cfg)
    return tmp / "out", cfg


def test_outputs_and_every_recorded_field(quick_run):
    out, cfg = quick_run
    E, R = cfg["EPOCHS"], cfg["N_RUNS"]
    for opt in ("momentum", "adam"):
        for kind in ("epoch", "time"):
            png = out / "figures" / "cnn" / f"MNIST_{opt}_loss_vs_{kind}.png"
            assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
        res = _saved(out, opt)
        assert res["config"]["LR"] == script.PRESETS["OPTIMIZER"][opt]["LR"] and res["config"]["EPOCHS"] == E
        assert res["config"]["TELE_LR"] == script.PRESETS["OPTIMIZER"][opt]["TELE_LR"]
        assert res["environment"]["torch"] == torch.__version__ and res["optimizer"] == opt
        assert res["data"] == {"name": "MNIST", "source": "data_dir", "n_train": 96, "n_test": 48,
                               "label": "MNIST (96 train)"}
        assert res["model"] == repr(script.make_cnn(0)) and "Linear(in_features=400" in res["model"]
        assert list(res["arms"]) == script.ARM_NAMES
        for arm, h in res["arms"].items():
            for k in ("train_loss", "test_loss", "test_acc", "time_s"):
                assert np.asarray(h[k]).shape == (E, R), (arm, k)
            assert np.all(np.diff(np.asarray(h["time_s"]), axis=0) > 0) and np.all(np.asarray(h["test_acc"]) <= 100)
            assert len(h["test_loss_init"]) == R and h["seeds"] == [cfg["SEED_BASE"] + r for r in range(R)]
            assert all(s > 0 for s in h["step_median_s"]) and h["diverged"] == [None] * R
            assert len(h["teleports"]) == R
            for recs, med in zip(h["teleports"], h["step_median_s"]):
                assert [(m["epoch"], m["batch"]) for m in recs] == ([] if arm == "baseline" else [(0, 0), (1, 0)])
                for m in recs:
                    assert m["wall_s"] > 0 and m["cost_steps"] == pytest.approx(m["wall_s"] / med)
            if arm in ("teleport", "random-teleport"):
                m = h["teleports"][0][0]
                for k in ("loss_before", "loss_after", "heldout_loss_before", "heldout_loss_after", "size", "time_s"):
                    assert np.isfinite(m[k]), (arm, k)
                assert m["group"] == "rescale" and m["state"] == "reset" and m["wall_s"] >= m["time_s"]
            if arm == "teleport":
                assert np.isfinite(m["objective_before"]) and np.isfinite(m["objective_after"])
                assert m["objective"] == "log_grad_norm" and m["steps"] == 2 and m["lr"] == res["config"]["TELE_LR"]
                assert m["maximize"] is True and m["units"] == 8 + 16 and m["notices"] == []
    summ = json.loads((out / "results" / "cnn" / "MNIST_summary.json").read_text())
    md = (out / "results" / "cnn" / "MNIST_summary.md").read_text()
    assert summ["config"]["N_RUNS"] == R and summ["environment"]["torch"] == torch.__version__
    for opt in ("momentum", "adam"):
        s, arms = summ[opt], _saved(out, opt)["arms"]
        base = s["per_arm"]["baseline"]
        assert base["train_loss"]["2"] == pytest.approx(
            [np.mean(arms["baseline"]["train_loss"][1]), np.std(arms["baseline"]["train_loss"][1]), R])
        assert base["time_s"] == pytest.approx(np.mean(arms["baseline"]["time_s"][-1])) and base["moment_time_s"] == 0
        assert s["per_arm"]["teleport"]["moment_time_s"] > 0 and base["diverged"] == [None] * R
        diff = np.subtract(arms["teleport"]["test_loss"][1], arms["reset-only"]["test_loss"][1])
        assert s["paired"]["reset-only"]["test_loss"]["2"] == pytest.approx([diff.mean(), diff.std(), R])
        t = s["teleport"]
        assert t["n"] == 2 * R and set(t) >= {"grad_norm_ratio", "loss_drift", "heldout_loss_drift", "size", "wall_s",
                                               "cost_steps", "step_median_s", "notices"}
        recs = [m for rs in arms["teleport"]["teleports"] for m in rs]
        assert t["grad_norm_ratio"]["median"] == pytest.approx(np.median([np.exp(m["objective_after"] - m["objective_before"])
                                                                          for m in recs]))
        assert t["size"]["max"] == max(m["size"] for m in recs) and isinstance(t["notices"], list)
        costs = [m["cost_steps"] for m in recs]
        assert t["cost_steps"] == pytest.approx({"median": np.median(costs), "min": min(costs), "max": max(costs)})
        assert t["step_median_s"] == pytest.approx(np.median(arms["teleport"]["step_median_s"]))
        assert f"## {opt}: train / test loss" in md and "| teleport − random-teleport |" in md
    assert "optimizer steps of" in md


def test_teleport_raises_grad_norm_and_keeps_the_loss(quick_run):
    out, _ = quick_run
    for opt in ("momentum", "adam"):
        recs = [m for rs in _saved(out, opt)["arms"]["teleport"]["teleports"] for m in rs]
        assert all(m["objective_after"] > m["objective_before"] for m in recs)
        for m in recs:  # a rescaling is exact on every input: the loss moves by float32 round-off only
            assert abs(m["loss_after"] - m["loss_before"]) < 1e-4 * m["loss_before"]
            assert abs(m["heldout_loss_after"] - m["heldout_loss_before"]) < 1e-4 * m["heldout_loss_before"]


def test_random_arm_takes_the_size_of_the_teleport_of_its_seed_and_moment(quick_run):
    out, _ = quick_run
    for opt in ("momentum", "adam"):
        arms = _saved(out, opt)["arms"]
        tele, rand = arms["teleport"]["teleports"], arms["random-teleport"]["teleports"]
        sizes = [[m["size"] for m in rs] for rs in tele]
        assert len({s for rs in sizes for s in rs}) == len(sizes) * len(sizes[0])  # one size per seed and moment
        np.testing.assert_allclose([[m["size"] for m in rs] for rs in rand], sizes, rtol=1e-5)
        # the first moment comes before any step: same weights, same batch in both arms
        assert [rs[0]["loss_before"] for rs in rand] == [rs[0]["loss_before"] for rs in tele]
        assert arms["random-teleport"]["train_loss"] != arms["teleport"]["train_loss"]


def test_reset_only_resets_the_state_and_moves_nothing(quick_run, tmp_path):
    out, cfg = quick_run
    data = load("MNIST", out.parent / "data", download=False)
    for name in ("adam", "momentum"):
        model = script.make_cnn(3)
        opt = make_optimizer(name, model.parameters(), 1e-3)
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(data.x_train[:8].view(-1, 1, 28, 28)), data.y_train[:8]).backward()
            opt.step()
        before = [p.detach().clone() for p in model.parameters()]
        assert len(opt.state) == len(before)
        rec = script.act("reset-only", model, opt, data, cfg, 1, 0, 3, None)
        assert len(opt.state) == 0 and set(rec) == {"epoch", "batch", "wall_s"}
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x_train[:8].view(-1, 1, 28, 28)), data.y_train[:8]).backward()
        opt.step()
        if name == "adam":  # a fresh state: Adam's step count starts again
            assert all(float(s["step"]) == 1 for s in opt.state.values())
    for name in ("momentum", "adam"):  # in the run: the epoch-0 moment meets a fresh optimizer (nothing to
        arms = _saved(out, name)["arms"]  # reset), the epoch-1 one a trained one
        assert arms["reset-only"]["train_loss"][0] == arms["baseline"]["train_loss"][0]
        assert arms["reset-only"]["train_loss"][1] != arms["baseline"]["train_loss"][1]


def test_lr_and_teleport_settings_reach_the_run(tmp_path, monkeypatch):
    write_fake(tmp_path / "data", "MNIST", n_train=64, n_test=32, seed=1)
    lrs, calls, make, tele = [], [], script.make_optimizer, script.teleport_module
    monkeypatch.setattr(script, "make_optimizer", lambda *a, **k: lrs.append(a[2]) or make(*a, **k))
    monkeypatch.setattr(script, "teleport_module", lambda *a, **k: calls.append(k) or tele(*a, **k))
    script.main(resolve(script, _args(tmp_path, "--optimizers-run=adam", "--arms=baseline,teleport", "--n-runs=1",
                                      "--lr=0.05", "--tele-lr=0.003", "--tele-steps=3")))
    res = _saved(tmp_path / "out", "adam")
    assert lrs == [0.05] * 3 and res["config"]["LR"] == 0.05 and res["config"]["TELE_LR"] == 0.003
    assert [(k["lr"], k["steps"], k["objective"], k["group"], k["state"]) for k in calls] == [
        (0.003, 3, "log_grad_norm", "rescale", "reset")] * 3  # the untimed warm-up's and the arm's two
    assert res["arms"]["teleport"]["teleports"][0][0]["steps"] == 3


def _files(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and ".progress" not in p.parts}


def test_interrupted_run_resumes_to_the_same_numbers(tmp_path, capsys, monkeypatch):
    """Stopped in a later unit (Adam, run 1 of the teleport arm, at the end of epoch 2 of 2, with
    progress saved at every epoch and the teleports in epoch 1 only, so the resumed epoch needs
    the saved optimizer state), the run leaves the previous outputs as they were; the same
    command resumes (finished units are not run again) and ends with an uninterrupted run's numbers."""
    write_fake(tmp_path / "data", "MNIST", n_train=96, n_test=48, seed=3)
    args = _args(tmp_path, "--optimizers-run=adam", "--arms=baseline,teleport,random-teleport", "--checkpoint-s=0",
                 "--tele-epochs=[0]")
    whole = tmp_path / "whole"
    script.main(resolve(script, args + [f"--out-dir={whole}"]))
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    previous, evaluate, calls = _files(out), script.evaluate, []

    def stop(*a):  # 3 evaluations per unit (before training, after each epoch): the 15th ends unit 5's epoch 2
        calls.append(1)  # (units: baseline, teleport, random-teleport of run 0, then of run 1)
        if len(calls) == 15:
            raise KeyboardInterrupt
        return evaluate(*a)
    monkeypatch.setattr(script, "evaluate", stop)
    try:
        err = interrupted(capsys, script, args)
        assert "progress saved (adam seed 1 teleport, epoch 1 of 2)" in err.splitlines()[-1]
        assert _files(out) == previous and not list(out.glob(".staging-*"))
        monkeypatch.setattr(script, "evaluate", evaluate)
        built, make = [], script.make_cnn
        monkeypatch.setattr(script, "make_cnn", lambda seed: built.append(seed) or make(seed))
        script.main(resolve(script, args))
    finally:
        lib.progress.ACTIVE.clear()
    assert "resuming" in capsys.readouterr().err and built == [0, 0, 1, 1]  # architecture, warm-up, teleport and random-teleport of run 1
    assert not (out / ".progress" / "teleport_cnn-MNIST.pt").exists()
    a, b = _saved(whole, "adam")["arms"], _saved(out, "adam")["arms"]
    timing = {"time_s", "wall_s", "cost_steps"}
    for arm in a:
        for k in ("train_loss", "test_loss", "test_acc", "test_loss_init", "seeds", "diverged"):
            assert b[arm][k] == a[arm][k], (arm, k)
        strip = lambda recs: [[{k: v for k, v in m.items() if k not in timing} for m in rs] for rs in recs]  # noqa: E731
        assert strip(b[arm]["teleports"]) == strip(a[arm]["teleports"])
    assert _files(out) != previous


def test_plot_only_redraws_from_saved_results(quick_run, tmp_path, capsys):
    out, cfg = quick_run
    png = out / "figures" / "cnn" / "MNIST_adam_loss_vs_time.png"
    png.unlink()
    before = (out / "results" / "cnn" / "MNIST_summary.md").read_bytes()
    script.main({**cfg, "PLOT_ONLY": True, "OPTIMIZERS_RUN": ["adam"], "DATA_DIR": str(tmp_path / "nothing")})
    assert png.stat().st_size > 1000 and "| teleport − baseline |" in capsys.readouterr().out
    assert (out / "results" / "cnn" / "MNIST_summary.md").read_bytes() == before


def test_other_settings_do_not_replace_saved_results(quick_run, capsys):
    out, _ = quick_run
    # --quick into another folder than runs/quick: saved results are kept
    argv = [a for a in _args(out.parent) if a != "--epochs=2"] + ["--epochs=3"]
    assert "EPOCHS=3 (saved: 2)" in usage_error(capsys, script, argv)


@pytest.mark.parametrize("args,match", [(["--optimizers-run=lbfgs"], "unknown optimizer 'lbfgs'"),
                                        (["--arms=baseline,warp"], "unknown arm 'warp'"),
                                        (["--arms=random-teleport"], "needs the 'teleport' arm"),
                                        (["--dataset=CIFAR10"], "unknown dataset 'CIFAR10'"),
                                        (["--lr=-1"], "lr must be > 0"),
                                        (["--tele-epochs=[5]"], "tele_epochs [5] are not 0-based epochs below"),
                                        (["--plot-only"], "--plot-only: no saved results")])
def test_bad_input_is_one_line_error(tmp_path, capsys, args, match):
    argv = ["--quick", f"--data-dir={tmp_path}", f"--out-dir={tmp_path}"] + args
    assert match in usage_error(capsys, script, argv)


def test_defaults_are_the_documented_protocol():
    cfg = resolve(script, [])
    assert (cfg["EPOCHS"], cfg["N_RUNS"], cfg["BATCH_SIZE"], cfg["TELE_BATCH_SIZE"]) == (10, 5, 64, 200)
    assert cfg["OPTIMIZERS_RUN"] == ["momentum", "adam"] and cfg["ARMS"] == script.ARM_NAMES
    assert sum(p.numel() for p in script.make_cnn(0).parameters()) == 5258
    committed = os.path.join(ROOT, "results", "cnn", "MNIST_summary.json")
    if os.path.exists(committed):  # the plain command is the protocol of the committed results
        from lib.io import check_replace
        check_replace(committed, script.saved_config(cfg))
        with pytest.raises(UsageError, match="EPOCHS=3"):
            check_replace(committed, script.saved_config({**cfg, "EPOCHS": 3}))


@pytest.mark.slow
def test_quick_run_as_a_subprocess(tmp_path):
    """The command as a user types it: --quick on fake MNIST files into a temp dir, exit 0, the
    outputs there, the progress file gone."""
    import subprocess
    write_fake(tmp_path / "data", "MNIST", n_train=96, n_test=48, seed=2)
    out = subprocess.run([sys.executable, "teleport_cnn.py", "--quick", f"--data-dir={tmp_path / 'data'}",
                          f"--out-dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| teleport − reset-only |" in out.stdout and "optimizer steps of" in out.stdout
    names = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert names == sorted([f"MNIST_{o}_loss_vs_{k}.png" for o in ("momentum", "adam") for k in ("epoch", "time")]
                           + ["MNIST_momentum.json", "MNIST_adam.json", "MNIST_summary.json", "MNIST_summary.md"])


def test_committed_tables_follow_from_the_committed_results(tmp_path, capsys):
    """--plot-only on a copy of the committed results prints the committed summary exactly and
    leaves the results files as they were."""
    res = tmp_path / "results" / "cnn"
    res.mkdir(parents=True)
    for opt in ("momentum", "adam"):
        shutil.copy(os.path.join(ROOT, "results", "cnn", f"MNIST_{opt}.json"), res)
    before = {p.name: p.read_bytes() for p in res.iterdir()}
    run(script.main, vars(script), argv=["--plot-only", f"--out-dir={tmp_path}", "--progress=False"])
    committed = open(os.path.join(ROOT, "results", "cnn", "MNIST_summary.md")).read()
    assert committed in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in res.iterdir()} == before
    assert (tmp_path / "figures" / "cnn" / "MNIST_adam_loss_vs_time.png").stat().st_size > 1000
