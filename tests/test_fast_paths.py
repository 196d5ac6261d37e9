"""The fast paths equal the plain ones: the batched optimizer's fused update equals torch.optim, the
solve-based pseudo-inverse equals pinv, the teleport's closed-form ascent and move equal autograd
through lib.actions.GLAction(46), the compiled training step equals the eager one; the CUDA path
is chosen on CUDA only, and --device=cuda without a GPU is a one-line error."""
import pytest
import torch

from conftest import make_batch, make_weights
from lib.actions import GLAction
from lib.models import Activation, forward
from lib.optim import make_optimizer, reset_state
from lib.teleport import (_ascent, _ascent_grads, _preacts, _solve_pinv, gl46_move, grad_norm_ascent, make_objective,
                          pinv_rows, teleport)
from lib.train import eager_train_step, make_model, step_mode, train_epoch

OPTIMIZERS = ["sgd", "momentum", "adagrad", "rmsprop", "adam"]


def _grads(seed, W):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(w.shape, generator=gen, dtype=w.dtype) for w in W]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_update_equals_torch_optim(name):
    W0 = make_weights([6, 5, 4], K=3)
    Wt, Wb = ([w.clone().requires_grad_() for w in W0] for _ in range(2))
    ot, ob = make_optimizer(name, Wt, 0.03), make_optimizer(name, Wb, 0.03, batched=True)
    for t in range(6):
        for W, opt in ((Wt, ot), (Wb, ob)):
            for w, g in zip(W, _grads(t, W0)):
                w.grad = g
            opt.step()
    for a, b in zip(Wt, Wb):
        assert (a - b).abs().max() <= 1e-12 * a.abs().max()
    assert max((a - w).abs().max() for a, w in zip(Wt, W0)) > 1e-3  # the weights did move


@pytest.mark.parametrize("name", ["adam", "momentum"])
def test_batched_optimizer_resets_some_models_alone(name):
    # models 1:3 reset after 3 steps, then 3 more: those models equal a fresh torch optimizer started there
    # (Adam too: the step count is per model)
    W0 = make_weights([6, 5, 4], K=3)
    Wb = [w.clone().requires_grad_() for w in W0]
    ob = make_optimizer(name, Wb, 0.03, batched=True)
    for t in range(6):
        if t == 3:
            reset_state(ob, slice(1, 3))
            Wt = [w.detach()[1:3].clone().requires_grad_() for w in Wb]
            ot = make_optimizer(name, Wt, 0.03)
        for w, g in zip(Wb, _grads(t, W0)):
            w.grad = g
        ob.step()
        if t >= 3:
            for w, g in zip(Wt, _grads(t, W0)):
                w.grad = g[1:3]
            ot.step()
    for a, b in zip(Wt, Wb):
        assert (a - b[1:3]).abs().max() <= 1e-12 * a.abs().max()


def test_fused_training_epoch_equals_torch_optim(leaky):
    X, Y = make_batch(60, 6, 4)
    for name in ("adam", "rmsprop"):
        out = []
        for batched in (False, True):
            W, opt = make_model([6, 5, 4], [1, 2], name, 0.01, batched_optimizer=batched)
            W = [w.detach().double().requires_grad_() for w in W]
            opt = make_optimizer(name, W, 0.01, batched=batched)
            out.append((train_epoch(W, opt, X, Y, leaky, 20), W))
        assert torch.allclose(out[0][0], out[1][0], rtol=1e-12, atol=0)
        assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(out[0][1], out[1][1]))


def test_pinv_rows_equals_pinv_and_falls_back():
    A = torch.randn(4, 6, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    P, solved = pinv_rows(A)
    assert solved and torch.allclose(P, torch.linalg.pinv(A), rtol=0, atol=1e-12)
    low = A.clone()
    low[1, 5] = low[1, 0] + low[1, 2]  # one model of rank 5: pinv's answer, not the solve's
    P, solved = pinv_rows(low)
    assert not solved and torch.allclose(P, torch.linalg.pinv(low))
    dead = A.clone()
    dead[2, 3] = 0  # a dead unit: the Cholesky fails (no error raised), pinv answers
    P, solved = pinv_rows(dead)
    assert not solved and torch.allclose(P, torch.linalg.pinv(dead))
    P, solved = pinv_rows(A.mT)  # more rows than columns
    assert not solved and torch.allclose(P, torch.linalg.pinv(A.mT))
    A32 = A.float()  # float32: the solve (in float64) is at least as close to the float64 pinv as float32 pinv is
    ref = torch.linalg.pinv(A)
    err = lambda P: ((P.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(pinv_rows(A32)[0]) <= max(err(torch.linalg.pinv(A32)), 1e-7)


def _mlp_batch():
    W = make_weights([12, 7, 5, 4], K=3)  # batch 40 > widths 7, 5: sigma(z) has full row rank
    X, Y = make_batch(40, 12, 4)
    return W, X, Y


def test_closed_form_ascent_equals_autograd_through_the_action(leaky):
    W, X, Y = _mlp_batch()
    obj, grads = _ascent(make_objective("grad_norm", leaky), GLAction(46), W, X, Y, leaky)
    res = grad_norm_ascent(W, forward(W[:1], X, leaky).mT, X @ X.T, Y, leaky, "ce", [0, 1])  # columns
    assert torch.allclose(obj, res[0], rtol=1e-12)
    for a, b in zip(grads, res[1]):
        assert (a - b).norm() <= 1e-10 * a.norm() and a.norm() > 0
    Ts = [0.1 * g for g in grads]
    moved = gl46_move(W, Ts, res[2], leaky, [0, 1])[0]
    for a, b in zip(GLAction(46)(W, Ts, X, leaky), moved):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_chain_rule_ascent_gradient_equals_autograd_through_the_action(leaky):
    W, X, Y = _mlp_batch()
    obj, grads = _ascent(make_objective("grad_norm", leaky), GLAction(46), W, X, Y, leaky)
    Zs = _preacts(forward(W[:1], X, leaky).mT, W[1:], leaky)  # pre-activations in columns (K, n, B)
    Aps = [_solve_pinv(leaky(z))[0] for z in Zs]
    value, fast = _ascent_grads(Zs[0], W[1:], Zs, Aps, X @ X.T, Y, leaky, "ce", [0, 1])
    assert torch.allclose(obj, value, rtol=1e-12)
    for a, b in zip(grads, fast):
        assert (a - b).norm() <= 1e-10 * a.norm() and a.norm() > 0


def test_fast_teleport_equals_generic(leaky):
    W, X, Y = _mlp_batch()
    obj = make_objective("grad_norm", leaky)
    plain = lambda W, X, Y: obj(W, X, Y)  # noqa: E731 - no .fast: the generic path
    Wa, ra, _ = teleport(W, X, Y, leaky, obj, GLAction(46), steps=5, lr=0.5, stop_above=100.0)
    Wb, rb, _ = teleport(W, X, Y, leaky, plain, GLAction(46), steps=5, lr=0.5, stop_above=100.0)
    for a, b in zip(Wa, Wb):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
    for k in ("objective_before", "objective_after", "loss_after", "algebra_norm"):
        assert torch.allclose(torch.tensor(ra[k]), torch.tensor(rb[k]), rtol=1e-9)
    assert (torch.tensor(ra["objective_after"]) > torch.tensor(ra["objective_before"])).all()


def test_fast_teleport_falls_back_where_a_unit_is_dead():
    relu = Activation(0.0)
    W, X, Y = _mlp_batch()
    W[0][:, 2] = -1.0  # hidden unit 2 never fires: sigma(z) lacks full row rank, the general path takes over
    obj = make_objective("grad_norm", relu)
    Wa, ra, _ = teleport(W, X, Y, relu, obj, GLAction(46), steps=3, lr=0.5)
    Wb, rb, _ = teleport(W, X, Y, relu, lambda W, X, Y: obj(W, X, Y), GLAction(46), steps=3, lr=0.5)
    assert all(torch.equal(a, b) for a, b in zip(Wa, Wb)) and ra["steps"] == [3.0] * 3
    assert any((a - w).abs().max() > 1e-3 for a, w in zip(Wa, W))


def test_step_mode_selects_cuda_graphs_on_cuda_only():
    assert step_mode("cuda") == step_mode(torch.device("cuda:0")) == "reduce-overhead"
    assert step_mode("cpu") == "default"


def test_eager_step_of_the_batched_optimizer_counts_steps(leaky):
    W, opt = make_model([6, 5, 4], [1, 2], "adam", 0.01, batched_optimizer=True)
    X, Y = make_batch(20, 6, 4, dtype=torch.float32)
    for _ in range(3):
        eager_train_step(W, opt, X, Y, leaky)
    assert opt.state[W[0]]["step"].tolist() == [3.0, 3.0]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,n", [("adam", 60), ("rmsprop", 200)], ids=["steps", "chunks"])
def test_compiled_epoch_equals_eager(leaky, optimizer, n):
    """A compiled epoch of n / 20 batches (several steps per compiled call where they fit) against
    eager steps: the same losses and weights to float32 rounding."""
    X, Y = make_batch(n, 6, 4, dtype=torch.float32)
    out = []
    for compile in (False, True):
        W, opt = make_model([6, 5, 4], [1, 2], optimizer, 0.01, batched_optimizer=True)
        out.append((train_epoch(W, opt, X, Y, leaky, 20, compile=compile), W))
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(out[0][1], out[1][1]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    import teleport_optimization as script
    from lib.config import run
    with pytest.raises(SystemExit) as exc:
        run(script.main, vars(script), argv=["--quick", "--device=cuda", f"--out-dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and "no CUDA GPU" in err and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_compiled_teleport_ascent_equals_eager(leaky):
    W, X, Y = _mlp_batch()
    args = (W, forward(W[:1], X, leaky).mT, X @ X.T, Y, leaky, "ce", [0, 1])
    eager, compiled = grad_norm_ascent(*args), grad_norm_ascent(*args, compile=True)
    assert torch.allclose(eager[0], compiled[0], rtol=1e-12)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(eager[1], compiled[1]))


def test_chunked_steps_equal_single_steps_and_the_hook_acts_first(leaky, monkeypatch):
    # compile=True runs STEPS_PER_CALL steps per call where the hook does nothing (after `hooked` batches);
    # the chunking is checked with an eager stand-in for the compiled call (its calls and sizes recorded)
    import lib.train as lt
    X, Y = make_batch(260, 6, 4)  # 13 batches of 20: 2 hooked, 2 chunks of 5, 1 single
    calls, events = [], []

    def fake(W, opt, X, Y, act, loss="ce", n=1):
        bufs, steps = zip(*(opt.buffers(w) for w in W))
        calls.append(n)
        events.append(("step", n))
        scales = []
        for _ in range(n):
            for st in steps:
                st += 1
            scales.append(opt.scales(W[0], steps[0]))
        scales = None if scales[0] is None else scales
        return lt.train_steps([w.detach() for w in W], list(bufs), scales, X, Y, act, loss, opt.name, opt.lr, n)
    out = []
    for compile in (False, True):
        W, opt = make_model([6, 5, 4], [1, 2], "adam", 0.01, batched_optimizer=True)
        W = [w.detach().double().requires_grad_() for w in W]
        opt = make_optimizer("adam", W, 0.01, batched=True)
        if compile:
            monkeypatch.setattr(lt, "compiled_train_step", fake)
        loss = train_epoch(W, opt, X, Y, leaky, 20, before_batch=lambda i: events.append(("hook", i)),
                           compile=compile, hooked=2)
        out.append((loss, W))
    assert calls == [1, 1, 5, 5, 1]
    assert events[-18:] == ([("hook", 0), ("step", 1), ("hook", 1), ("step", 1)]
                            + [("hook", i) for i in range(2, 7)] + [("step", 5)]
                            + [("hook", i) for i in range(7, 12)] + [("step", 5), ("hook", 12), ("step", 1)])
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-13)
    assert all(torch.allclose(a, b, rtol=1e-13, atol=1e-15) for a, b in zip(out[0][1], out[1][1]))


def test_fused_teleport_stops_models_where_the_stepwise_path_does(leaky, monkeypatch):
    import lib.teleport as tp
    W, X, Y = _mlp_batch()
    obj = make_objective("grad_norm", leaky)
    start = tp._fast_value(W, X, Y, leaky, "ce")
    cap = float(start.max()) * 1.03  # the larger two climb past it within a few steps, the smallest not
    monkeypatch.setattr(tp, "grad_norm_ascent", None)  # the stepwise fast path is not used: all steps fused
    Wa, ra, _ = teleport(W, X, Y, leaky, obj, GLAction(46), steps=6, lr=0.5, stop_above=cap)
    monkeypatch.undo()
    Wb, rb, _ = teleport(W, X, Y, leaky, lambda W, X, Y: obj(W, X, Y), GLAction(46), steps=6, lr=0.5, stop_above=cap)
    assert ra["steps"] == rb["steps"] and len(set(ra["steps"])) > 1  # models stopped after different steps
    for a, b in zip(Wa, Wb):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
    for k in ("objective_before", "objective_after", "loss_before", "loss_after", "algebra_norm"):
        assert torch.allclose(torch.tensor(ra[k]), torch.tensor(rb[k]), rtol=1e-9), k
    stopped = ra["steps"].index(min(ra["steps"]))  # it stays exactly where its last step left it
    Wc, rc, _ = teleport(W, X, Y, leaky, obj, GLAction(46), steps=int(min(ra["steps"])), lr=0.5, stop_above=cap)
    assert all(torch.equal(a[stopped], c[stopped]) for a, c in zip(Wa, Wc))


@pytest.mark.slow
def test_compiled_fused_teleport_equals_eager(leaky):
    W, X, Y = _mlp_batch()
    obj = make_objective("grad_norm", leaky)
    (Wa, ra, _), (Wb, rb, _) = (teleport(W, X, Y, leaky, obj, GLAction(46), steps=4, lr=0.5, compile=c)
                                for c in (False, True))
    assert all(torch.allclose(a, b, rtol=0, atol=1e-10) for a, b in zip(Wa, Wb))
    assert torch.allclose(torch.tensor(ra["objective_after"]), torch.tensor(rb["objective_after"]), rtol=1e-10)
