"""learn-to-teleport/multi_layer_regression.py (Figure 6, Algorithm 1): the eq. (54) teleport
of the meta-optimizer is loss-preserving, meta-gradients reach both LSTMs, saved
meta-optimizers reload to identical curves, and a small run writes its figures and JSON."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from lib.config import UsageError, configure
from lib.models import Activation, loss_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "learn-to-teleport", "multi_layer_regression.py")
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
    return configure(vars(mlr), list(TINY) + list(args))


def _relative_drift(cfg, seed=0):
    W, X, Y = mlr.draw_problems(range(8), cfg)
    T = torch.randn(8, 400, dtype=W[0].dtype, generator=torch.Generator().manual_seed(seed))
    W2 = mlr.teleport(W, T, X, ACT, cfg)
    L0, L1 = loss_fn(W, X, Y, ACT, "mse"), loss_fn(W2, X, Y, ACT, "mse")
    moved = max((a - b).abs().max().item() for a, b in zip(W, W2))
    return ((L1 - L0).abs() / L0).max().item(), moved


def test_eq54_teleport_preserves_the_regression_loss():
    # X is 20 x 20 and invertible and g^-1 is exact: the action is exact (float32, as the run)
    drift, moved = _relative_drift(_cfg())
    assert drift < 1e-5 and moved > 1e-3


def test_first_order_inverse_drifts_and_exact_does_not():
    # in float64 the exact action is exact to round-off; the authors' W2 (I - T) is off by O(|T|^2)
    exact, _ = _relative_drift(_cfg("--dtype=float64"))
    first, _ = _relative_drift(_cfg("--dtype=float64", "--inverse=first_order"))
    assert exact < 1e-11 and first > 1e-7


def test_teleport_is_scaled_to_t_norm_and_matches_g_inverse():
    cfg = _cfg("--dtype=float64")
    W, X, _ = mlr.draw_problems([3], cfg)
    T = 5 * torch.randn(1, 400, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    W2 = mlr.teleport(W, T, X, ACT, cfg)
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


@pytest.mark.parametrize("param", ["clamp", "sigmoid"])
def test_lr_tele_starts_at_eta_init(param):
    cfg = _cfg(f"--eta-param={param}", "--dtype=float64")
    etas = mlr.test("lr_tele", mlr.make_nets("lr_tele", cfg), cfg, ACT, [0])["step_size"][0]
    assert etas[0] == pytest.approx(cfg["ETA_INIT"], rel=1e-6)  # the head's weights start at 0


def test_gd_curve_is_plain_gradient_descent():
    cfg = _cfg("--dtype=float64")
    curve = mlr.test("gd", {}, cfg, ACT, [0])["loss"][0]
    W, X, Y = mlr.draw_problems([0], cfg)
    W = [w.requires_grad_() for w in W]
    L = loss_fn(W, X, Y, ACT, "mse").sum()
    grads = torch.autograd.grad(L, W)
    W1 = [w - 3e-4 * g for w, g in zip(W, grads)]
    assert curve[0] == pytest.approx(L.item(), rel=1e-12)
    assert curve[1] == pytest.approx(loss_fn(W1, X, Y, ACT, "mse").item(), rel=1e-12)


def test_saved_meta_optimizer_reloads_to_identical_curves(tmp_path):
    cfg = _cfg()
    nets = mlr.make_nets("update_tele", cfg)
    mlr.train("update_tele", nets, cfg, ACT, [cfg["TRAIN_SEED"] + i for i in range(2)])
    path = str(tmp_path / "m.pt")
    mlr.save_nets(path, nets)
    ref = mlr.test("update_tele", nets, cfg, ACT, [0, 1])["loss"]
    fresh = mlr.make_nets("update_tele", _cfg("--init-seed=5"))
    assert not torch.equal(fresh["m1"].heads["f"].weight, nets["m1"].heads["f"].weight)
    mlr.load_nets(path, fresh)  # torch.load(weights_only=True)
    assert mlr.test("update_tele", fresh, cfg, ACT, [0, 1])["loss"] == ref
    assert ref != mlr.test("update_tele", mlr.make_nets("update_tele", cfg), cfg, ACT, [0, 1])["loss"]


@pytest.mark.parametrize("arg,msg", [("--gd-lr=-1e-3", "GD_LR"), ("--lr-source=book", "LR_SOURCE"),
                                     ("--inverse=second", "INVERSE"), ("--test-seed=10000", "overlap"),
                                     ("--steps=12", "multiple"),
                                     ("--eta-param=exp", "ETA_PARAM"), ("--retrain=['gd']", "RETRAIN"),
                                     ("--eta-init=1e-2", "ETA_INIT")])
def test_bad_input_is_a_one_line_error(arg, msg):
    with pytest.raises(UsageError, match=msg):
        mlr.check(_cfg(arg))


def test_quick_run_writes_figures_and_json(tmp_path, capsys):
    out = str(tmp_path)
    cmd = [sys.executable, SCRIPT, "--quick", f"--out-dir={out}", "--progress=False"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       cwd=os.path.dirname(SCRIPT))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| LSTM(update,tele) |" in r.stdout  # the printed table
    for f in ("multi_layer_loss.png", "multi_layer_loss_vs_time.png", "multi_layer_meta_training.png"):
        assert os.path.getsize(os.path.join(out, "figures", f)) > 1000
    with open(os.path.join(out, "results", "multi_layer_regression.json")) as fh:
        res = json.load(fh)
    q = mlr._QUICK
    assert res["complete"] and set(res["curves"]) == set(mlr.METHODS) | {mlr.CONTROL}
    # teleport is loss-preserving: switching it off cannot change the loss after the first step
    assert res["curves"][mlr.CONTROL]["loss"][0][:2] == pytest.approx(res["curves"]["update_tele"]["loss"][0][:2], rel=1e-5)
    assert len(res["curves"]["update_tele"]["loss"]) == q["N_TEST"]
    assert len(res["curves"]["gd"]["loss"][0]) == q["TEST_STEPS"] + 1
    assert res["config"]["LR_SOURCE"] == "code" and "python" in res["environment"]
    assert len(res["training"]["update_tele"]["final_loss"]) == q["N_TRAIN_UPDATE_TELE"]
    with pytest.raises(SystemExit) as e:
        mlr.run(mlr.main, vars(mlr), mlr._QUICK, argv=["--gd-lr=-1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and err.count("\n") == 1


@pytest.mark.slow
def test_quick_run_test_only_reloads_identical_curves(tmp_path):
    args = ["--quick", f"--out-dir={tmp_path}", "--progress=False"]
    res = mlr.main(configure(vars(mlr), args, mlr._QUICK))
    res2 = mlr.main(configure(vars(mlr), args + ["--test-only"], mlr._QUICK))  # weights_only=True
    for m in mlr.METHODS + (mlr.CONTROL,):
        assert res2["curves"][m]["loss"] == res["curves"][m]["loss"]
    assert res2["training"] == json.loads(json.dumps(res["training"]))
