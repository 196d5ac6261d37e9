"""teleport_state_strategies.py (Figure 12): a quick run writes both figures and its results,
the arms agree until the teleport, the teleport keeps the loss (batch 4 <= hidden widths), the
plotted loss is ||Y - f(X)||_F^2, presets yield to --lr, --plot-only reads the committed file
and leaves it unchanged, the defaults are the committed protocol (other settings do not replace
it), the outputs replace the previous ones only as a whole, and a failed teleport is a result."""
import json
import os
import shutil
import sys

import pytest
import torch

from lib.config import resolve, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import teleport_state_strategies as script  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig12")
    cfg = resolve(script, ["--quick", f"--out-dir={out}"])
    return out, cfg, script.main(cfg)


def test_quick_writes_both_figures_and_results(quick):
    out, cfg, saved = quick
    figs = out / "figures" / "optimization"
    for name in ("momentum_strategies.png", "adagrad_objectives.png"):
        assert (figs / name).read_bytes()[:4] == b"\x89PNG"
    assert set(saved["momentum"]) == {"no teleport", "transport", "keep", "reset"}
    assert set(saved["adagrad"]) == {"no teleport", "||grad L||^2", "||grad L||_A^2"}
    for name, c in {**saved["momentum"], **saved["adagrad"]}.items():
        c = torch.tensor(c)
        assert c.shape == (cfg["RUNS"], cfg["EPOCHS"] + 1), name
        if name != "transport":  # the transported momentum can blow up here (see the docstring)
            assert torch.isfinite(c).all(), name
    e = cfg["TELE_EPOCH"]  # all arms agree until the teleport
    for part in ("momentum", "adagrad"):
        first = torch.tensor(saved[part]["no teleport"])[:, :e + 1]
        assert all(torch.equal(torch.tensor(c)[:, :e + 1], first) for c in saved[part].values())
    assert set(saved["teleports"]) == {"momentum-transport", "momentum-keep", "momentum-reset",
                                       "adagrad-grad_norm", "adagrad-a_norm"}
    for rec in saved["teleports"].values():  # batch 4 <= hidden widths 6, 7: eq. (46) keeps the loss
        assert torch.allclose(torch.tensor(rec["loss_after"]), torch.tensor(rec["loss_before"]), rtol=1e-3)
        assert rec["objective_after"] != rec["objective_before"]
    on_disk = json.loads((out / "results" / "optimization" / "figure12.json").read_text())
    assert on_disk["configs"]["momentum"]["LR"] == 5e-4 and on_disk["configs"]["adagrad"]["LR"] == 3.0
    assert on_disk["configs"]["adagrad"]["TELE_LR"] == 1e-9 and on_disk["config"]["LR"] is None


def test_loss_is_the_sum_of_squared_errors():
    W, X, Y = script.problem([0, 1], "cpu")
    out = X
    for i, w in enumerate(W):
        out = out @ w.transpose(1, 2)
        out = script.ACT(out) if i < len(W) - 1 else out
    torch.testing.assert_close(script.loss(W, X, Y), ((Y - out) ** 2).sum((1, 2)))


def test_lr_overrides_both_presets_and_reaches_the_optimizer(monkeypatch, tmp_path):
    cfg = resolve(script, ["--quick", "--lr=1e-4", "--epochs=2", "--tele-epoch=1", "--tele-lr=1e-13",
                          "--anorm-tele-lr=1e-8", f"--out-dir={tmp_path}"])
    built, make = [], script.make_optimizer
    monkeypatch.setattr(script, "make_optimizer", lambda name, W, lr: built.append((name, lr)) or make(name, W, lr))
    saved = script.main(cfg)
    assert {lr for _, lr in built} == {1e-4} and {n for n, _ in built} == {"momentum", "adagrad"}
    assert saved["configs"]["adagrad"]["LR"] == 1e-4 and saved["configs"]["adagrad"]["TELE_LR"] == 1e-13
    cfg = resolve(script, ["--lr=1e-4"])  # the other presets stay
    assert script.check(cfg)["momentum"]["TELE_LR"] == 1e-11 and script.check(cfg)["adagrad"]["TELE_LR"] == 1e-9


def test_plot_only_copes_with_the_committed_results(tmp_path):
    """--plot-only redraws the committed results (non-finite values saved as null), into a copy,
    and leaves them byte for byte as they were."""
    res = tmp_path / "results" / "optimization"
    res.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "results", "optimization", "figure12.json"), res)
    before = (res / "figure12.json").read_bytes()
    saved = script.main(resolve(script, ["--plot-only", f"--out-dir={tmp_path}"]))
    assert saved["config"]["TELE_EPOCH"] == 5 and "null" in (res / "figure12.json").read_text()
    for name in ("momentum_strategies.png", "adagrad_objectives.png"):
        assert (tmp_path / "figures" / "optimization" / name).stat().st_size > 1000
    assert (res / "figure12.json").read_bytes() == before and [p.name for p in res.iterdir()] == ["figure12.json"]


def test_defaults_are_the_committed_protocol(tmp_path, capsys):
    committed = os.path.join(ROOT, "results", "optimization", "figure12.json")
    script.check_saved(committed, {**resolve(script, []), "OUT_DIR": "."})
    res = tmp_path / "results" / "optimization"
    res.mkdir(parents=True)
    shutil.copy(committed, res)
    with pytest.raises(SystemExit) as exc:  # refused before any work
        run(script.main, vars(script), argv=["--quick", f"--out-dir={tmp_path}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "EPOCHS=20 (saved: 300)" in err and "--replace" in err
    script.main(resolve(script, ["--quick", "--replace", f"--out-dir={tmp_path}"]))
    assert json.loads((res / "figure12.json").read_text())["config"]["EPOCHS"] == 20


def test_an_interrupted_run_leaves_the_previous_outputs(quick, monkeypatch):
    out, cfg, _ = quick
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = []
    def stop_at_second(*a, **k):  # the second figure: the first one and the JSON are written by then
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return save(*a, **k)
    save = script.save_figure
    monkeypatch.setattr(script, "save_figure", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        script.main(cfg)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_failed_teleport_marks_its_repeats_diverged(tmp_path, capsys):
    """--lr=1e-4 --epochs=7: AdaGrad's teleports overflow (their linear algebra fails); the run
    completes, the error is recorded and those arms' losses are non-finite after the teleport."""
    saved = script.main(resolve(script, ["--quick", "--lr=1e-4", "--epochs=7", f"--out-dir={tmp_path}"]))
    assert "the teleport failed" in capsys.readouterr().out
    for name, obj in (("||grad L||^2", "grad_norm"), ("||grad L||_A^2", "a_norm")):
        assert "error" in saved["teleports"][f"adagrad-{obj}"]
        c = torch.tensor(saved["adagrad"][name])
        assert torch.isfinite(c[:, :6]).all() and not torch.isfinite(c[:, 6:]).any()
    for name in ("momentum_strategies.png", "adagrad_objectives.png"):
        assert (tmp_path / "figures" / "optimization" / name).stat().st_size > 1000


@pytest.mark.parametrize("args,match", [(["--tele-epoch=20"], "tele_epoch 20 is not below epochs = 20"),
                                        (["--lr=0"], "lr must be > 0"),
                                        (["--f12-epochs=3"], "did you mean --epochs"),
                                        (["--plot-only"], "--plot-only: no saved results")])
def test_bad_input_is_one_line_error(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as exc:
        run(script.main, vars(script), argv=["--quick", f"--out-dir={tmp_path}"] + args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and match in err and err.count("\n") == 1
