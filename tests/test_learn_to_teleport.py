"""learn-to-teleport/multi_layer_regression.py (Figure 6, Algorithm 1) with its meta-optimizer
module _meta.py: the eq. (54) teleport of the meta-optimizer is loss-preserving (the authors'
Neumann-series inverse is not), --lr drives the GD baseline and the meta learning rates drive Adam,
meta-gradients reach both LSTMs, saved meta-optimizers reload to identical curves, --test-only
fails before writing anything, --plot-only redraws the committed JSON with the teleport-off
control, a small run writes its figures and JSON, a run stopped part-way leaves the previous
outputs and resumes to the same numbers, diverged trajectories are left out with a count, and
results of other settings are not replaced."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from lib.config import UsageError, resolve
from lib.io import load_tensors, save_json, save_tensors
from lib.models import Activation, loss_and_grads, loss_fn
from lib.progress import interrupt_message

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "learn-to-teleport", "multi_layer_regression.py")
COMMITTED_JSON = os.path.join(ROOT, "learn-to-teleport", "results", "multi_layer_regression.json")
_spec = importlib.util.spec_from_file_location("multi_layer_regression", SCRIPT)
mlr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mlr)
meta = importlib.import_module("_meta")  # the script put its folder on sys.path
ACT = Activation(0.1)
TINY = ["--steps=10", "--unroll=5", "--test-steps=10", "--hidden=16", "--lr-tele-hidden=8",
        "--n-train-update-tele=2", "--n-train-update=2", "--n-train-lr-tele=1", "--n-test=2",
        "--plot-steps=10", "--table-steps=[1,5,10]", "--progress=False"]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny LSTMs: a second intra-op thread only spins on a busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(*args):
    return resolve(mlr, list(TINY) + list(args))  # with the script's PRESETS, as its run


def _teleported(cfg, T, seeds=range(8)):
    W, X, Y = mlr.draw_problems(seeds, cfg)
    return W, X, Y, meta.learned_teleport(W, T, X, ACT, cfg)


def _train(method, nets, cfg, seeds):
    return meta.train(method, nets, cfg, ACT, seeds, mlr.draw_problems)  # the run's problems, no checkpoint


def _relative_drift(cfg, seed=0):
    T = torch.randn(8, 400, dtype=getattr(torch, cfg["DTYPE"]), generator=torch.Generator().manual_seed(seed))
    W, X, Y, W2 = _teleported(cfg, T)
    L0, L1 = loss_fn(W, X, Y, ACT, "mse"), loss_fn(W2, X, Y, ACT, "mse")
    moved = max((a - b).abs().max().item() for a, b in zip(W, W2))
    return ((L1 - L0).abs() / L0).max().item(), moved


def test_eq54_teleport_preserves_the_regression_loss():
    # X is 20 x 20 and invertible and g^-1 is exact: the action is exact (float32, as the run)
    drift, moved = _relative_drift(_cfg())
    assert drift < 1e-5 and moved > 1e-3


def test_neumann_inverse_drifts_and_exact_does_not():
    # in float64 the exact action is exact to round-off; the authors' W2 (I - T) is off by O(|T|^2)
    exact, _ = _relative_drift(_cfg("--dtype=float64"))
    neumann, _ = _relative_drift(_cfg("--dtype=float64", "--inverse=neumann"))
    assert exact < 1e-11 and neumann > 1e-7


def test_neumann_differs_from_exact_by_the_series_remainder():
    T = torch.randn(3, 400, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cfg, cfg_n = _cfg("--dtype=float64"), _cfg("--dtype=float64", "--inverse=neumann")
    W, _, _, exact = _teleported(cfg, T, [0, 1, 2])
    neumann = _teleported(cfg_n, T, [0, 1, 2])[3]
    Ts = T.view(3, 20, 20) / T.view(3, -1).norm(dim=1).view(3, 1, 1) * cfg["T_NORM"]
    g = torch.eye(20, dtype=torch.float64) + Ts
    assert torch.equal(neumann[0], exact[0])  # W1 <- s^-1(g s(W1 X)) X^+ either way
    assert torch.allclose(exact[1] @ g, W[1], atol=1e-12)  # W2 g^-1 g = W2
    assert torch.allclose(neumann[1] @ g, W[1] - W[1] @ Ts @ Ts, atol=1e-12)  # (I - T)(I + T) = I - T^2
    assert (neumann[1] - exact[1]).abs().max() > 1e-7
    zero = torch.zeros(3, 400, dtype=torch.float64)  # T = 0: g = I, both inverses are exact
    for c in (cfg, cfg_n):
        W, _, _, same = _teleported(c, zero, [0, 1, 2])
        assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(W, same))


def test_teleport_is_scaled_to_t_norm_and_matches_g_inverse():
    cfg = _cfg("--dtype=float64")
    W, X, _ = mlr.draw_problems([3], cfg)
    T = 5 * torch.randn(1, 400, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    W2 = meta.learned_teleport(W, T, X, ACT, cfg)
    Ts = T.view(1, 20, 20) / T.norm() * cfg["T_NORM"]
    g = torch.eye(20, dtype=torch.float64) + Ts
    assert torch.allclose(W2[1] @ g, W[1], atol=1e-10)  # W2 <- W2 g^-1
    h1 = ACT(W[0] @ X.mT)  # s(W1 X), column form
    assert torch.allclose(ACT(W2[0] @ X.mT), g @ h1, atol=1e-8)  # the new hidden layer is g s(W1 X)


def test_meta_gradient_reaches_both_lstms_and_lr_stays_clamped():
    cfg = _cfg()
    for method in ("update_tele", "lr_tele"):
        nets = mlr.make_nets(method, cfg)
        before = {k: [p.detach().clone() for p in n.parameters()] for k, n in nets.items()}
        hist = _train(method, nets, cfg, [cfg["TRAIN_SEED"]])
        assert hist["diverged"] == [] and len(hist["final_loss"]) == 1
        for k, net in nets.items():  # every LSTM, m2 through the eq. (54) action, has moved
            assert any(not torch.equal(a, b) for a, b in zip(before[k], net.parameters())), k
    curves = mlr.test("lr_tele", nets, cfg, ACT, [0])
    lo, hi = cfg["STEP_CLAMP"]
    assert all(lo <= e <= hi for e in curves["step_size"][0]) and len(curves["step_size"][0]) == 10


def test_meta_lrs_come_from_the_preset_unless_given():
    assert (_cfg()["M1_LR"], _cfg()["M2_LR"]) == (1e-3, 1e-4)  # the authors' code
    assert (_cfg("--paper-meta-lrs")["M1_LR"], _cfg("--paper-meta-lrs")["M2_LR"]) == (1e-4, 1e-3)
    cfg = _cfg("--paper-meta-lrs", "--m1-lr=0.02")
    assert (cfg["M1_LR"], cfg["M2_LR"]) == (0.02, 1e-3)


@pytest.mark.parametrize("args", [[], ["--m1-lr=3e-3", "--m2-lr=2e-5"], ["--paper-meta-lrs"]])
def test_adam_steps_by_the_meta_lrs(args):
    # one unroll, one Adam step: Adam's first step moves every parameter by lr * g / (|g| + eps),
    # so the largest move of each LSTM is its learning rate
    cfg = _cfg("--steps=5", "--unroll=5", *args)
    nets = mlr.make_nets("update_tele", cfg)
    before = {k: [p.detach().clone() for p in n.parameters()] for k, n in nets.items()}
    _train("update_tele", nets, cfg, [cfg["TRAIN_SEED"]])
    for k, lr in (("m1", cfg["M1_LR"]), ("m2", cfg["M2_LR"])):
        moved = max((a - b).abs().max().item() for a, b in zip(before[k], nets[k].parameters()))
        assert moved == pytest.approx(lr, rel=1e-3), k


def test_a_changed_m1_lr_changes_the_trained_curve():
    curves = []
    for args in ([], ["--m1-lr=1e-2"]):
        cfg = _cfg(*args)
        nets = mlr.make_nets("update", cfg)
        _train("update", nets, cfg, [cfg["TRAIN_SEED"]])
        curves.append(mlr.test("update", nets, cfg, ACT, [0])["loss"][0])
    assert curves[0][0] == curves[1][0] and curves[0][1:] != curves[1][1:]


@pytest.mark.parametrize("param", ["clamp", "sigmoid"])
def test_lr_tele_starts_at_eta_init(param):
    cfg = _cfg(f"--eta-param={param}", "--dtype=float64")
    etas = mlr.test("lr_tele", mlr.make_nets("lr_tele", cfg), cfg, ACT, [0])["step_size"][0]
    assert etas[0] == pytest.approx(cfg["ETA_INIT"], rel=1e-6)  # the head's weights start at 0


@pytest.mark.parametrize("args,lr", [([], 3e-4), (["--lr=1e-4"], 1e-4)])
def test_gd_curve_is_plain_gradient_descent_at_lr(args, lr):
    cfg = _cfg("--dtype=float64", *args)
    assert cfg["LR"] == lr and mlr.make_nets("gd", cfg) == {}  # GD has no meta-optimizer
    curve = mlr.test("gd", {}, cfg, ACT, [0])["loss"][0]
    W, X, Y = mlr.draw_problems([0], cfg)
    W = [w.requires_grad_() for w in W]
    L = loss_fn(W, X, Y, ACT, "mse").sum()
    grads = torch.autograd.grad(L, W)
    W1 = [w - lr * g for w, g in zip(W, grads)]
    # the run's losses and gradients come from lib.models.loss_and_grads, whose LeakyReLU slope
    # is a float32 0.1 (1.5e-8 off in float64); autograd here uses the float64 slope
    assert curve[0] == pytest.approx(L.item(), rel=1e-7)
    assert curve[1] == pytest.approx(loss_fn(W1, X, Y, ACT, "mse").item(), rel=1e-7)
    assert curve[1] != pytest.approx(loss_fn([w - 2 * lr * g for w, g in zip(W, grads)], X, Y, ACT, "mse").item(),
                                     rel=1e-3)


def test_saved_meta_optimizer_reloads_to_identical_curves(tmp_path):
    cfg = _cfg()
    nets = mlr.make_nets("update_tele", cfg)
    _train("update_tele", nets, cfg, [cfg["TRAIN_SEED"] + i for i in range(2)])
    path = str(tmp_path / "m.pt")
    save_tensors(path, meta.flat_state(nets))
    ref = mlr.test("update_tele", nets, cfg, ACT, [0, 1])["loss"]
    fresh = mlr.make_nets("update_tele", _cfg("--init-seed=5"))
    assert not torch.equal(fresh["m1"].heads["f"].weight, nets["m1"].heads["f"].weight)
    meta.load_nets(load_tensors(path), fresh)  # torch.load(weights_only=True)
    assert mlr.test("update_tele", fresh, cfg, ACT, [0, 1])["loss"] == ref
    assert ref != mlr.test("update_tele", mlr.make_nets("update_tele", cfg), cfg, ACT, [0, 1])["loss"]


@pytest.mark.parametrize("arg,msg", [("--lr=-1e-3", "LR"), ("--m1-lr=0", "M1_LR"), ("--m2-lr=-1", "M2_LR"),
                                     ("--inverse=first_order", "INVERSE"), ("--test-seed=10000", "overlap"),
                                     ("--steps=12", "multiple"), ("--slope=0", "SLOPE"),
                                     ("--eta-param=exp", "ETA_PARAM"), ("--retrain=['gd']", "RETRAIN"),
                                     ("--eta-init=1e-2", "ETA_INIT")])
def test_bad_input_is_a_one_line_error(arg, msg):
    with pytest.raises(UsageError, match=msg):
        mlr.check(_cfg(arg))


def test_test_only_without_saved_lstms_fails_before_writing(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "multi_layer_regression.json").write_text('{"kept": true}')
    with pytest.raises(UsageError, match="--test-only: no saved meta-optimizer") as e:
        mlr.main(_cfg("--test-only", f"--out-dir={tmp_path}"))
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == ["results"] and os.listdir(results) == ["multi_layer_regression.json"]
    assert (results / "multi_layer_regression.json").read_text() == '{"kept": true}'


def test_default_out_dir_is_beside_the_script_wherever_run_from(tmp_path, monkeypatch):
    here = os.path.dirname(SCRIPT)
    if any(os.path.exists(os.path.join(here, "results", f"meta_opt_{m}.pt")) for m in mlr.N_TRAIN):
        pytest.skip("saved meta-optimizers present: --test-only would run and rewrite the committed JSON")
    monkeypatch.chdir(tmp_path)
    assert _cfg()["OUT_DIR"] == ""
    with pytest.raises(UsageError) as e:
        mlr.main(_cfg("--test-only"))
    assert os.path.join(here, "results", "meta_opt_") in str(e.value) and os.listdir(tmp_path) == []


def test_plot_only_redraws_the_committed_json_with_the_control(tmp_path, capsys, monkeypatch):
    (tmp_path / "results").mkdir()
    shutil.copy(COMMITTED_JSON, tmp_path / "results")
    drawn = []  # (label, line style) of every mean curve the figures draw
    real = mlr.plot_mean_std
    monkeypatch.setattr(mlr, "plot_mean_std", lambda ax, x, L, label, color, style, **kw:
                        drawn.append((label, style)) or real(ax, x, L, label, color, style, **kw))
    res = mlr.main(resolve(mlr, ["--plot-only", f"--out-dir={tmp_path}"]))
    for f in ("multi_layer_loss.png", "multi_layer_loss_vs_time.png", "multi_layer_meta_training.png"):
        assert os.path.getsize(tmp_path / "figures" / f) > 1000
    assert res["loaded"] == [] and "| LSTM(update,tele) | 3.232e+04 +- 1.5e+04 |" in capsys.readouterr().out
    # the teleport-off control, on which the finding rests, is in both loss figures, dashed
    assert drawn.count((mlr.LABELS[mlr.CONTROL], "--")) == 2 and len(drawn) == 10
    assert sorted(os.listdir(tmp_path)) == ["figures", "results"]  # staged: no leftovers
    with pytest.raises(UsageError, match="--plot-only: no saved results"):
        mlr.main(resolve(mlr, ["--plot-only", f"--out-dir={tmp_path / 'none'}"]))


def test_quick_run_writes_figures_and_json_and_uses_lr(tmp_path, capsys):
    out = str(tmp_path)
    cmd = [sys.executable, SCRIPT, "--quick", f"--out-dir={out}", "--progress=False", "--lr=2e-4"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       cwd=os.path.dirname(SCRIPT))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| LSTM(update,tele) |" in r.stdout  # the printed table
    for f in ("multi_layer_loss.png", "multi_layer_loss_vs_time.png", "multi_layer_meta_training.png"):
        assert os.path.getsize(os.path.join(out, "figures", f)) > 1000
    with open(os.path.join(out, "results", "multi_layer_regression.json")) as fh:
        res = json.load(fh)
    q = mlr.QUICK_SETTINGS
    assert set(res["curves"]) == set(mlr.METHODS) | {mlr.CONTROL} and not any(res["diverged"].values())
    # teleport is loss-preserving: switching it off cannot change the loss after the first step
    first = [res["curves"][m]["loss"][0][:2] for m in (mlr.CONTROL, "update_tele")]
    assert first[0] == pytest.approx(first[1], rel=1e-5)
    assert len(res["curves"]["update_tele"]["loss"]) == q["N_TEST"]
    assert len(res["curves"]["gd"]["loss"][0]) == q["TEST_STEPS"] + 1
    assert len(res["training"]["update_tele"]["final_loss"]) == q["N_TRAIN_UPDATE_TELE"]
    c = res["config"]
    assert (c["LR"], c["M1_LR"], c["M2_LR"], c["INVERSE"], c["OUT_DIR"]) == (2e-4, 1e-3, 1e-4, "exact", out)
    assert c["QUICK"] and "python" in res["environment"] and "BASELINE" not in c
    cfg = resolve(mlr, ["--quick", "--lr=2e-4"])  # the GD curve of the run is GD at --lr
    assert res["curves"]["gd"]["loss"] == mlr.test("gd", {}, cfg, ACT, [0, 1])["loss"]
    assert res["curves"]["gd"]["loss"] != mlr.test("gd", {}, resolve(mlr, ["--quick"]), ACT, [0, 1])["loss"]
    with pytest.raises(SystemExit) as e:
        mlr.run(mlr.main, vars(mlr), argv=["--lr=-1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and err.count("\n") == 1


@pytest.mark.slow
def test_quick_run_test_only_reloads_identical_curves(tmp_path):
    args = ["--quick", f"--out-dir={tmp_path}", "--progress=False"]
    res = mlr.main(resolve(mlr, args))
    res2 = mlr.main(resolve(mlr, args + ["--test-only"]))  # lib.io.load_tensors: weights_only=True
    for m in mlr.METHODS + (mlr.CONTROL,):
        assert res2["curves"][m]["loss"] == res["curves"][m]["loss"]
    assert res2["training"] == json.loads(json.dumps(res["training"]))


def _files(root):
    """{relative path: bytes} of the output set under root (figures/ and results/)."""
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for sub in ("figures", "results") for d, _, fs in os.walk(os.path.join(root, sub)) for f in fs}


def test_interrupted_run_keeps_the_previous_outputs_and_resumes_to_the_same_numbers(tmp_path, monkeypatch, capsys):
    args = ["--n-train-update-tele=3", "--checkpoint-s=0"]
    # figures stand in as one small file (drawing is most of a tiny run's time; other tests draw them)
    monkeypatch.setattr(mlr, "plot", lambda res, cfg, out: save_json(os.path.join(out, "figures", "f.json"), res))
    whole = mlr.main(_cfg(*args, f"--out-dir={tmp_path / 'whole'}"))
    shutil.copytree(tmp_path / "whole", tmp_path / "run", ignore=shutil.ignore_patterns(".progress"))
    before = _files(tmp_path / "run")  # the previous complete output set
    draw, drawn = mlr.draw_problems, []

    def stop_at_third(seeds, cfg):  # Ctrl-C as LSTM(update,tele)'s third trajectory starts
        if seeds[0] == cfg["TRAIN_SEED"] + 2 and not drawn:
            drawn.append(seeds[0])
            raise KeyboardInterrupt
        return draw(seeds, cfg)
    monkeypatch.setattr(mlr, "draw_problems", stop_at_third)
    cfg = _cfg(*args, f"--out-dir={tmp_path / 'run'}")
    with pytest.raises(KeyboardInterrupt):
        mlr.main(cfg)
    assert "LSTM(update,tele), 2 of 3 trajectories" in interrupt_message(["x.py"])
    assert _files(tmp_path / "run") == before  # the previous set as it was, no staging folder left
    assert sorted(os.listdir(tmp_path / "run")) == [".progress", "figures", "results"]
    trained = []  # training trajectories drawn on resuming: LSTM(lr,tele) is done, LSTM(update,tele) resumes at 2
    monkeypatch.setattr(mlr, "draw_problems",
                        lambda seeds, c: trained.extend(s for s in seeds if s >= c["TRAIN_SEED"]) or draw(seeds, c))
    again = mlr.main(cfg)
    assert trained == [10002, 10000, 10001] and "resuming from" in capsys.readouterr().err
    close = lambda a, b: torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-6, atol=0)  # noqa: E731
    for m in mlr.METHODS + (mlr.CONTROL,):
        close(again["curves"][m]["loss"], whole["curves"][m]["loss"])
    for m in mlr.N_TRAIN:
        close(again["training"][m]["final_loss"], whole["training"][m]["final_loss"])
    assert os.listdir(tmp_path / "run" / ".progress") == []  # finished: the checkpoint is gone
    after = _files(tmp_path / "run")
    assert set(after) == set(before) and after != before
    for m in mlr.N_TRAIN:  # the saved LSTMs are those of the uninterrupted run
        a, b = (load_tensors(tmp_path / d / "results" / f"meta_opt_{m}.pt") for d in ("run", "whole"))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)
    with pytest.raises(UsageError, match="other settings: LR=0.0001") as e:  # another protocol: refused, unchanged
        mlr.main(_cfg(*args, f"--out-dir={tmp_path / 'run'}", "--lr=1e-4"))
    assert "--replace" in str(e.value) and "\n" not in str(e.value) and _files(tmp_path / "run") == after


def test_absurd_lr_diverges_and_the_run_says_so(tmp_path, capsys):
    # GD at lr 1e6 blows up at its first step; Adam at 1e12 makes m1's meta-loss non-finite
    res = mlr.main(_cfg("--lr=1e6", "--m1-lr=1e12", f"--out-dir={tmp_path}"))
    out = capsys.readouterr().out
    assert res["curves"]["gd"]["diverged_at"] == [1, 1] and res["diverged"]["gd"] == 2
    assert "| GD (2 of 2 diverged) | diverged | diverged | diverged |" in out
    # the first unroll (steps 1-5) is finite; after its Adam step the loss at step 6 is not, and
    # the next trajectory starts with NaN LSTMs
    assert res["training"]["update"]["diverged"] == [[0, 6], [1, 1]]
    assert res["diverged"]["lr_tele"] == 0 and "| LSTM(lr,tele) | " in out  # unaffected by either lr
    for f in ("multi_layer_loss.png", "multi_layer_loss_vs_time.png", "multi_layer_meta_training.png"):
        assert os.path.getsize(tmp_path / "figures" / f) > 1000
    text = (tmp_path / "results" / "multi_layer_regression.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert saved["mean_test_loss"]["gd"] == [None] * 11 and saved["diverged"]["gd"] == 2  # no GD trajectory left


def test_diverged_trajectories_are_left_out_of_the_table_with_a_count():
    nan = float("nan")
    curves = {"gd": {"loss": [[10.0, 5.0, 4.0], [10.0, 7.0, 6.0], [10.0, 2e4, nan]]},
              "update": {"loss": [[10.0, 3.0, 2.0], [10.0, nan, nan]]}}
    at, L = mlr.diverged_steps(curves["gd"]["loss"])
    assert at == [None, None, 1] and torch.isnan(torch.tensor(L[2, 1:])).all()  # 2e4 > DIVERGED x L(w_0)
    assert mlr.kept_mean(L).tolist() == [10.0, 6.0, 5.0]
    text = mlr.table(curves, [1, 2, 5])
    assert "| GD (1 of 3 diverged) | 6 +- 1 | 5 +- 1 | - |" in text
    assert "| LSTM(update) (1 of 2 diverged) | 3 +- 0 | 2 +- 0 | - |" in text


def test_defaults_are_the_committed_protocol():
    mlr.check_protocol(COMMITTED_JSON, resolve(mlr, []))  # the plain command may replace it
    with pytest.raises(UsageError, match="LR=0.0001"):
        mlr.check_protocol(COMMITTED_JSON, resolve(mlr, ["--lr=1e-4"]))


def test_results_of_other_settings_are_refused_but_the_modes_are_not(tmp_path):
    path = tmp_path / "r.json"
    save_json(path, {"config": _cfg()})
    mlr.check_protocol(str(path), _cfg("--test-only", "--retrain=['update']", "--checkpoint-s=5"))  # same protocol
    for arg in ("--lr=1e-4", "--paper-meta-lrs", "--inverse=neumann"):
        with pytest.raises(UsageError, match="--replace replaces them"):
            mlr.check_protocol(str(path), _cfg(arg))
        mlr.check_protocol(str(path), _cfg(arg, "--replace"))


def _meta_gradients(method, backprop, *args):
    """The meta-gradients of every Adam step of a training run (2 trajectories of 2 unrolls,
    2 per batch, float64): {parameter name: .grad} per step, captured as Adam is called.
    '--eta-above': LSTM(lr,tele)'s step starts clamped at its upper bound 1e-4 (head bias 1)."""
    above = "--eta-above" in args
    cfg = _cfg("--dtype=float64", "--steps=6", "--unroll=3", "--batch=2", f"--backprop={backprop}",
               *(["--step-clamp=[1e-7,1e-4]", "--eta-init=5e-5"] if above else []),
               *[a for a in args if a != "--eta-above"])
    nets, seen = mlr.make_nets(method, cfg), []
    if above:
        with torch.no_grad():
            nets["m2"].heads["eta"].bias.fill_(1.0)
    names = {p: f"{k}.{n}" for k, net in nets.items() for n, p in net.named_parameters()}
    cls = meta.MetaAdam if backprop == "manual" else torch.optim.Adam  # the optimizer class meta_adam makes
    real = cls.step

    def step(opt, *a, **kw):
        seen.append({names[p]: p.grad.clone() for g in opt.param_groups for p in g["params"]})
        return real(opt, *a, **kw)
    cls.step = step
    try:
        hist = _train(method, nets, cfg, [cfg["TRAIN_SEED"] + i for i in range(4)])
    finally:
        cls.step = real
    return seen, hist


@pytest.mark.parametrize("method,args", [("update_tele", []), ("update_tele", ["--inverse=neumann"]),
                                         ("update", []), ("lr_tele", ["--eta-param=sigmoid"]), ("lr_tele", []),
                                         ("lr_tele", ["--eta-above"])])
def test_manual_meta_gradient_equals_autograd(method, args):
    # BACKPROP='manual' (the unroll back-propagated by hand, the data's X^+ once per trajectory,
    # fused Adam) against torch autograd through _meta.update (LSTMCell modules, lib's GLAction):
    # the same meta-gradient of every parameter at every Adam step, the LSTM state carried over
    # unrolls, mean over a batch of 2
    fast, h_fast = _meta_gradients(method, "manual", *args)
    ref, h_ref = _meta_gradients(method, "autograd", *args)
    assert len(fast) == len(ref) == 4 and fast[0].keys() == ref[0].keys()
    for a, b in zip(fast, ref):
        # saturated gates leave some gradients at 1e-45 (hidden 16, raw gradients ~1e4 in): the
        # tolerance is relative to the largest gradient of the same LSTM
        scale = {net: max(v.abs().max().item() for k, v in b.items() if k.startswith(net))
                 for net in {k[:2] for k in b}}
        for k in b:
            assert scale[k[:2]] > 0, k
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-10 * scale[k[:2]], msg=k)
    torch.testing.assert_close(torch.tensor(h_fast["mean_loss"]), torch.tensor(h_ref["mean_loss"]),
                               rtol=1e-12, atol=0)


def test_lstm_group_step_is_the_stacked_cells():
    # the fast step of two LSTMs as one group against MetaLSTM.forward (two torch.nn.LSTMCell
    # and the heads) of each, from any state
    gen = torch.Generator().manual_seed(0)
    nets = [meta.MetaLSTM(12, 7, {"f": 5, "eta": 1}).double(), meta.MetaLSTM(12, 7, {"T": 4}).double()]
    xs = [torch.randn(3, 12, generator=gen, dtype=torch.float64) for _ in nets]
    states = [tuple(torch.randn(2, 3, 7, generator=gen, dtype=torch.float64) for _ in "hc") for _ in nets]
    with torch.no_grad():
        outs, (h, c) = meta.LSTMGroup(nets).step(xs, tuple(torch.stack(s, 1) for s in zip(*states)))
        for n, (net, x, state) in enumerate(zip(nets, xs, states)):
            ref, (ref_h, ref_c) = net(x, state)
            assert outs[n].keys() == ref.keys()
            for k in ref:
                torch.testing.assert_close(outs[n][k], ref[k], rtol=1e-13, atol=1e-14)
            torch.testing.assert_close(h[:, n], ref_h, rtol=1e-13, atol=1e-14)
            torch.testing.assert_close(c[:, n], ref_c, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_regression_loss_and_grads_is_lib_bitwise(dtype):
    # _meta's two-layer loss and gradients (torch.bmm for @) against lib.models.loss_and_grads:
    # the same operations, so the same bits, on weights with both signs of pre-activations
    gen = torch.Generator().manual_seed(0)
    W = [torch.rand(3, 20, 20, generator=gen, dtype=dtype) - 0.5 for _ in range(2)]
    X, Y = (torch.rand(3, 20, 20, generator=gen, dtype=dtype) for _ in range(2))
    (L, G), (L_ref, G_ref) = meta.regression_loss_and_grads(W, X, Y, ACT), loss_and_grads(W, X, Y, ACT, "mse")
    assert torch.equal(L, L_ref) and all(torch.equal(g, r) for g, r in zip(G, G_ref))


def test_series_inverse_is_exact_to_rounding():
    # (I + T)^-1 by the Neumann series to `series_order`, where the remainder bound
    # |T|^(n+1) / (1 - |T|) is below eps/4; against torch.linalg.inv in float64: in float32 below
    # float32's eps, in float64 a few float64 eps, and with fewer terms the remainder is
    # |T|^(n+1)-sized, within its bound
    assert (meta.series_order(0.01, torch.float32), meta.series_order(0.01, torch.float64)) == (3, 8)
    assert meta.series_order(0.5, torch.float32) is None
    T = torch.randn(50, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    T = T / T.flatten(1).norm(dim=1).view(-1, 1, 1) * 0.01
    exact = torch.linalg.inv(torch.eye(20, dtype=torch.float64) + T)
    def err(n, dtype=torch.float64):
        return (meta.inverse(T.to(dtype), n).double() - exact).abs().max().item()
    assert err(3, torch.float32) < torch.finfo(torch.float32).eps
    assert err(8) < 8 * torch.finfo(torch.float64).eps
    for n in (1, 2, 3, 4):
        assert 1e-3 * 0.01 ** (n + 1) < err(n) < 0.01 ** (n + 1) / 0.99
    assert torch.equal(meta.inverse(T, None), exact)


@pytest.mark.parametrize("method", ["update_tele", "update", "lr_tele"])
def test_test_curves_of_the_fast_steps_equal_update(method):
    # the test trajectories by _meta.Unroll's steps (the default) and by _meta.update: the same
    # losses and step sizes in float64, from meta-optimizers trained one trajectory
    cfg = _cfg("--dtype=float64")
    nets = mlr.make_nets(method, cfg)
    _train(method, nets, cfg, [cfg["TRAIN_SEED"]])
    fast, ref = (mlr.test(method, nets, {**cfg, "BACKPROP": b}, ACT, [0, 1]) for b in ("manual", "autograd"))
    torch.testing.assert_close(torch.tensor(fast["loss"]), torch.tensor(ref["loss"]), rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.tensor(fast["step_size"]), torch.tensor(ref["step_size"]), rtol=1e-10, atol=0)
    assert fast["loss"][0][-1] != fast["loss"][0][0]


def test_meta_lstm_keeps_torch_s_init_in_the_transposed_layout():
    # MetaLSTM stores its input and head weights transposed (transposed_layout): the same values
    # as torch's own LSTMCell / Linear init from the same seed, and the same outputs
    torch.manual_seed(3)
    net = meta.MetaLSTM(12, 7, {"f": 5})
    torch.manual_seed(3)
    cells, head = [torch.nn.LSTMCell(12, 7), torch.nn.LSTMCell(7, 7)], torch.nn.Linear(7, 5)
    for c, ref in zip(net.cells, cells):
        assert not c.weight_ih.is_contiguous() and c.weight_ih.T.is_contiguous() and c.weight_hh.is_contiguous()
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            assert torch.equal(getattr(c, name), getattr(ref, name)), name
    assert torch.equal(net.heads["f"].weight, head.weight) and net.heads["f"].weight.T.is_contiguous()


def test_meta_adam_is_torch_s_fused_adam_on_the_transposed_layout():
    # BACKPROP='manual': set_grad writes each gradient in its parameter's layout and MetaAdam hands
    # the fused kernel the contiguous transposes; against torch.optim.Adam(fused=True) on plain
    # contiguous copies with the same gradients a @ b: the same parameters and moments to rounding
    # (the gradient of a transposed weight is b^T a^T, summed in another order; a gradient in the
    # wrong layout, or the kernel fed mismatched layouts, moves the wrong entries: O(1) errors)
    gen = torch.Generator().manual_seed(0)
    net = meta.MetaLSTM(12, 7, {"f": 5}).double()
    ref = [torch.nn.Parameter(p.detach().contiguous().clone()) for p in net.parameters()]
    opt = meta.meta_adam({"m1": net}, {"M1_LR": 1e-2, "M2_LR": 1e-3, "BACKPROP": "manual"})
    opt_ref = torch.optim.Adam(ref, lr=1e-2, fused=True)
    for _ in range(3):
        for p, q in zip(net.parameters(), ref):
            a = torch.randn(p.shape[0], 4, generator=gen, dtype=torch.float64)
            b = torch.randn(4, p.shape[1], generator=gen, dtype=torch.float64) if p.dim() == 2 else None
            meta.set_grad(p, a, b)
            q.grad = a @ b if b is not None else a.sum(1)
        opt.step()
        opt_ref.step()
    assert any(not p.is_contiguous() for p in net.parameters())
    for p, q in zip(net.parameters(), ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-13, atol=1e-15)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[p][k], opt_ref.state[q][k], rtol=1e-12, atol=1e-15, msg=k)
    assert opt.state_dict()["state"].keys() == opt_ref.state_dict()["state"].keys()


def test_a_late_breakdown_of_the_meta_training_is_flagged():
    # breakdown(): the median final loss of the last 100 trajectories against the best 100's. A
    # falling curve, or one with isolated spikes, is not flagged; one that rises tenfold at the end is.
    # On the committed runs: the default run's LSTM(update,tele) broke down (README, Figure 6),
    # its LSTM(update) and the committed replicates did not
    falling = 1e4 * 0.99 ** np.arange(700)
    spiky = falling.copy()
    spiky[650::10] = 1e6
    risen = np.concatenate([falling[:630], np.geomspace(20, 1e7, 70)])
    assert mlr.breakdown(falling) is None and mlr.breakdown(spiky) is None and mlr.breakdown(falling[:150]) is None
    best, last = mlr.breakdown(risen)
    assert best == pytest.approx(np.median(falling[500:600])) and last == pytest.approx(np.median(risen[-100:]))
    res = json.load(open(COMMITTED_JSON))
    assert mlr.breakdown(res["training"]["update_tele"]["final_loss"]) is not None
    assert mlr.breakdown(res["training"]["update"]["final_loss"]) is None
    folder = os.path.join(os.path.dirname(COMMITTED_JSON), "replicates")
    for f in os.listdir(folder):
        rep = json.load(open(os.path.join(folder, f)))
        assert all(mlr.breakdown(h["final_loss"]) is None for h in rep["training"].values() if h), f
