"""learn-to-teleport/multi_layer_regression.py (Figure 6, Algorithm 1): the eq. (54) teleport
of the meta-optimizer is loss-preserving (the authors' Neumann-series inverse is not), --lr
drives the GD baseline and the meta learning rates drive Adam, meta-gradients reach both LSTMs,
saved meta-optimizers reload to identical curves, --test-only fails before writing anything,
--plot-only redraws the committed JSON, and a small run writes its figures and JSON."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lib.config import UsageError, resolve
from lib.models import Activation, loss_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "learn-to-teleport", "multi_layer_regression.py")
COMMITTED_JSON = os.path.join(ROOT, "learn-to-teleport", "results", "multi_layer_regression.json")
_spec = importlib.util.spec_from_file_location("multi_layer_regression", SCRIPT)
mlr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mlr)
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
    return W, X, Y, mlr.learned_teleport(W, T, X, ACT, cfg)


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
    W2 = mlr.learned_teleport(W, T, X, ACT, cfg)
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
        hist = mlr.train(method, nets, cfg, ACT, [cfg["TRAIN_SEED"]])
        assert hist["nonfinite"] == 0 and len(hist["final_loss"]) == 1
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
    mlr.train("update_tele", nets, cfg, ACT, [cfg["TRAIN_SEED"]])
    for k, lr in (("m1", cfg["M1_LR"]), ("m2", cfg["M2_LR"])):
        moved = max((a - b).abs().max().item() for a, b in zip(before[k], nets[k].parameters()))
        assert moved == pytest.approx(lr, rel=1e-3), k


def test_a_changed_m1_lr_changes_the_trained_curve():
    curves = []
    for args in ([], ["--m1-lr=1e-2"]):
        cfg = _cfg(*args)
        nets = mlr.make_nets("update", cfg)
        mlr.train("update", nets, cfg, ACT, [cfg["TRAIN_SEED"]])
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
    assert cfg["LR"] == lr
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
    mlr.train("update_tele", nets, cfg, ACT, [cfg["TRAIN_SEED"] + i for i in range(2)])
    path = str(tmp_path / "m.pt")
    mlr.save_nets(path, nets)
    ref = mlr.test("update_tele", nets, cfg, ACT, [0, 1])["loss"]
    fresh = mlr.make_nets("update_tele", _cfg("--init-seed=5"))
    assert not torch.equal(fresh["m1"].heads["f"].weight, nets["m1"].heads["f"].weight)
    mlr.load_nets(path, fresh)  # lib.io.load_tensors: torch.load(weights_only=True)
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


def test_plot_only_redraws_the_committed_json(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    shutil.copy(COMMITTED_JSON, tmp_path / "results")
    res = mlr.main(resolve(mlr, ["--plot-only", f"--out-dir={tmp_path}"]))
    for f in ("multi_layer_loss.png", "multi_layer_loss_vs_time.png", "multi_layer_meta_training.png"):
        assert os.path.getsize(tmp_path / "figures" / f) > 1000
    assert res["complete"] and "| LSTM(update,tele) | 63.27 +- 18 |" in capsys.readouterr().out
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
    assert res["complete"] and set(res["curves"]) == set(mlr.METHODS) | {mlr.CONTROL}
    # teleport is loss-preserving: switching it off cannot change the loss after the first step
    assert res["curves"][mlr.CONTROL]["loss"][0][:2] == pytest.approx(res["curves"]["update_tele"]["loss"][0][:2], rel=1e-5)
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
