"""tune_rescaling_step_sizes.py: the step-size rule, a tiny sweep on fake MNIST files, reading
saved sweeps (infinite losses saved as null, or as the string "inf" by older files), resuming an
interrupted sweep, other settings refused."""
import glob
import json
import math
import os
import shutil

import numpy as np
import pytest

import lib.progress
import teleport_relu_rescaling as rescaling
import tune_rescaling_step_sizes as script
from lib.config import fenced_settings, resolve, run
from lib.data import write_fake
from conftest import interrupted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = sorted(glob.glob(os.path.join(ROOT, "results", "rescaling", "*_stepsize_sweep_*.json")))


def test_pick_takes_the_lowest_loss_among_the_stable_step_sizes():
    scores = {"a": [[1e-3, 0.0, 1.2], [1e-2, 0.05, 1.1], [1e-1, 0.5, 0.9], [1.0, 0.0, None]],
              "b": [[1e-3, 0.3, "inf"], [1e-2, 0.2, 2.0], [1e-1, 0.2, 1.5]],  # none stable: fewest undone
              "c": [[1e-3, 0.0, None], [1e-2, 0.0, "inf"]]}                    # all infinite: the first
    assert script.pick(scores, 0.1) == {"a": 1e-2, "b": 1e-1, "c": 1e-3}
    assert script.pick(scores, 1.0)["a"] == 1e-1


@pytest.mark.parametrize("path", COMMITTED, ids=[os.path.basename(p) for p in COMMITTED])
def test_the_rule_gives_the_committed_choices(path):
    saved = json.load(open(path))
    assert script.pick(saved["scores"], saved["config"].get("TUNE_MAX_UNDONE", 0.1)) == saved["best"]


def test_the_sweep_shares_its_protocol_settings_with_the_main_script():
    main, sweep = fenced_settings(rescaling.__file__), fenced_settings(script.__file__)
    plumbing = {"ARMS", "PLOT_ONLY", "OUT_DIR", "CHECKPOINT_S", "REPLACE"}
    assert set(script.PROTOCOL) == (set(main) & set(sweep)) - plumbing
    assert all(main[k][0] == sweep[k][0] for k in script.PROTOCOL)  # the same defaults


TINY = ["--quick", "--progress=False", "--seeds=[0]", "--arms=['gl46', 'rescale']", "--tune-lrs=[0.01, 3.0]",
        "--optimizers=['sgd']", "--tune-epochs=1", "--tele-epochs=[0]", "--tele-steps=2", "--lr=0.05"]



pytestmark = pytest.mark.usefixtures("one_thread")  # as the script uses on a CPU

@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_fake(str(tmp_path_factory.mktemp("data")), "MNIST", n_train=200, n_test=100)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("out")
    return run(script.main, vars(script), argv=[f"--data-dir={data_root}", f"--out-dir={out}", *TINY]), out


def test_a_tiny_sweep_picks_the_step_size_by_its_rule(tiny_sweep):
    res, out = tiny_sweep
    saved = json.load(open(out / "results" / "rescaling" / "MNIST_stepsize_sweep_gl46_rescale.json"))
    assert saved["best"] == res["best"] and saved["data"]["n_train"] == 200 and saved["config"]["LR"] == 0.05
    assert len(saved["rows"]) == 2 * 2 * 2  # actions x step sizes x activations (one optimizer)
    for arm, scores in saved["scores"].items():
        assert [s[0] for s in scores] == [0.01, 3.0]
        for lr, undone, loss in scores:
            rows = [r for r in saved["rows"] if r["arm"] == arm and r["tele_lr"] == lr]
            losses = [math.inf if r["diverged"] else r["train_loss_last"] for r in rows]  # a diverged seed: inf
            assert undone == pytest.approx(np.mean([r["undone"] for r in rows]))
            assert script.as_loss(loss) == pytest.approx(np.mean(losses))
        stable = [s for s in scores if s[1] <= 0.1]
        expect = min(stable, key=lambda s: script.as_loss(s[2]))[0] if stable else min(scores, key=lambda s: s[1])[0]
        assert saved["best"][arm] == expect
    # at step 3.0 some run diverges: its mean is infinite, saved as null
    assert saved["scores"]["rescale"][1][2] is None and saved["best"] == {"gl46": 0.01, "rescale": 0.01}
    assert any(r["diverged"] for r in saved["rows"] if r["tele_lr"] == 3.0)
    assert not any(r["diverged"] for r in saved["rows"] if r["tele_lr"] == 0.01)


def test_an_interrupted_sweep_resumes_to_the_same_rows(tiny_sweep, data_root, tmp_path, capsys, monkeypatch):
    """Stopped in its third run, the sweep writes nothing; the same command resumes from the two
    finished runs (each run is a unit of progress) and ends with the rows of an uninterrupted sweep."""
    argv = [f"--data-dir={data_root}", f"--out-dir={tmp_path}", *TINY, "--checkpoint-s=0"]

    class StopInThirdRun(rescaling.ArmHook):
        made = 0

        def __call__(self, epoch, i):
            if (epoch, i) == (0, 0):
                StopInThirdRun.made += 1
            if StopInThirdRun.made == 3:
                raise KeyboardInterrupt
            super().__call__(epoch, i)
    monkeypatch.setattr(rescaling, "ArmHook", StopInThirdRun)
    try:
        assert "(tune gl46 0.01 leaky_relu sgd done)" in interrupted(capsys, script, argv)
        assert not (tmp_path / "results").exists()
        monkeypatch.setattr(rescaling, "ArmHook", StopInThirdRun.__mro__[1])
        built, make = [], rescaling.make_model
        monkeypatch.setattr(rescaling, "make_model", lambda *a, **k: built.append(a) or make(*a, **k))
        res = run(script.main, vars(script), argv=argv)
    finally:
        lib.progress.ACTIVE.clear()
    assert "resuming" in capsys.readouterr().err and len(built) == 8 - 2
    name = os.path.join("results", "rescaling", "MNIST_stepsize_sweep_gl46_rescale.json")
    whole, again = json.load(open(tiny_sweep[1] / name)), json.load(open(tmp_path / name))  # nan as null
    assert again["rows"] == whole["rows"] and again["scores"] == whole["scores"] and res["best"] == whole["best"]


def test_a_sweep_of_other_settings_is_not_replaced(tiny_sweep, data_root, capsys):
    _, out = tiny_sweep
    with pytest.raises(SystemExit) as e:
        run(script.main, vars(script), argv=[f"--data-dir={data_root}", f"--out-dir={out}", *TINY, "--lr=0.1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "LR=0.1 (saved: 0.05)" in err and "--replace" in err and err.count("\n") == 1


def test_plot_only_reprints_a_saved_sweep_and_copes_with_inf(tiny_sweep, capsys):
    res, out = tiny_sweep
    again = script.main(resolve(script, ["--quick", f"--out-dir={out}", "--plot-only", "--arms=['gl46', 'rescale']"]))
    assert again["best"] == res["best"] and "chosen teleport step size" in capsys.readouterr().out
    # a committed sweep with "inf" strings, and the same sweep as strict JSON writes it (null)
    src = os.path.join(ROOT, "results", "rescaling", "MNIST_stepsize_sweep_gl46_gl46-last.json")
    res_dir = out / "results" / "rescaling"
    shutil.copy(src, res_dir / "MNIST_stepsize_sweep_old.json")
    saved = json.load(open(src))
    with_null = {**saved, "scores": {a: [[lr, u, None if loss == "inf" else loss] for lr, u, loss in s]
                                     for a, s in saved["scores"].items()}}
    (res_dir / "MNIST_stepsize_sweep_strict.json").write_text(json.dumps(with_null))
    for name in ("old", "strict"):
        got = script.main(resolve(script, [f"--out-dir={out}", "--plot-only", f"--sweep-name={name}"]))
        assert got["best"] == saved["best"]
        assert "| gl46 | 0.01 | 23.75 | inf |" in capsys.readouterr().out


def test_plot_only_without_a_saved_sweep_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(script.main, vars(script), argv=[f"--out-dir={tmp_path}", "--plot-only"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "no saved results at" in err and "\n" not in err
