"""Known answers for lib functions that had none: each test fails when the function is broken
(checked by breaking it: the AdaGrad exponent -1 instead of -1/2, the held-out drift taken on the
teleport batch, the last partial mini-batch dropped, ...). Everything in float64 where it is exact."""
import math
import os

import numpy as np
import pytest
import torch

from conftest import make_batch, make_weights
from lib.actions import GLAction, RescaleAction, group_element
from lib.models import Activation, evaluate, forward, hidden_columns, loss_fn, losses_per_model
from lib.optim import make_optimizer

ACT = Activation(0.1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- lib.metrics.adagrad_preconditioner: A = (eps + G)^{-1/2} (App. F.1) -------------------------
def _adagrad_steps(opt, W, X, Y, lr, steps=4):
    """(step taken by opt, lr * A * g) per parameter after each of `steps` steps."""
    from lib.metrics import adagrad_preconditioner
    out = []
    for step in range(steps):
        opt.zero_grad()
        loss_fn(W, X[5 * step:5 * step + 10], Y[5 * step:5 * step + 10], ACT).sum().backward()
        before, grads = [w.detach().clone() for w in W], [w.grad.clone() for w in W]
        opt.step()
        A = adagrad_preconditioner(opt, W)
        out += [(b - w.detach(), lr * a * g, g) for w, b, g, a in zip(W, before, grads, A)]
    return out


def test_adagrad_preconditioner_is_the_step_torch_adagrad_takes():
    """torch.optim.Adagrad steps p <- p - lr * g / (sqrt(G) + eps), G the sum of the squared
    gradients so far (this one included); A = (eps + G)^{-1/2} puts eps inside the root. With a
    negligible eps the step must be lr * A * g to round-off; with torch's default eps = 1e-10 (the
    project's optimizer) to 1e-3 wherever |g| > 1e-6 (the eps placement moves it by ~1e-10 / |g|)."""
    W = [w.requires_grad_() for w in make_weights([6, 5, 3], K=2)]
    X, Y = make_batch(20, 6, 3)
    for taken, want, _ in _adagrad_steps(torch.optim.Adagrad(W, lr=0.1, eps=1e-30), W, X, Y, 0.1):
        torch.testing.assert_close(taken, want, rtol=1e-9, atol=1e-15)
    for taken, want, g in _adagrad_steps(make_optimizer("adagrad", W, 0.1), W, X, Y, 0.1):
        big = g.abs() > 1e-6
        assert big.float().mean() > 0.5
        torch.testing.assert_close(taken[big], want[big], rtol=1e-3, atol=0)
    # one step from a fresh state: G = g^2, so A g = g / sqrt(g^2 + eps) = sign(g) where |g| >> 1e-5
    from lib.metrics import adagrad_preconditioner
    opt = make_optimizer("adagrad", W, 0.1)
    opt.zero_grad()
    loss_fn(W, X, Y, ACT).sum().backward()
    opt.step()
    for a, w in zip(adagrad_preconditioner(opt, W), W):
        big = w.grad.abs() > 1e-3
        torch.testing.assert_close((a * w.grad)[big], w.grad.sign()[big], rtol=0, atol=1e-4)


def test_adagrad_preconditioner_of_the_batched_optimizer():
    """lib.optim's batched optimizer (make_optimizer(..., batched=True)): A must be read from it
    too, the step it takes being lr * A * g to 1e-3 wherever |g| > 1e-3 (eps = 1e-10 inside the
    root against torch's outside moves it by ~eps / G, up to 1e-2 at |g| = 1e-4)."""
    W = [w.requires_grad_() for w in make_weights([6, 5, 3], K=2)]
    X, Y = make_batch(20, 6, 3)
    for taken, want, g in _adagrad_steps(make_optimizer("adagrad", W, 0.1, batched=True), W, X, Y, 0.1):
        big = g.abs() > 1e-3
        assert big.float().mean() > 0.5
        torch.testing.assert_close(taken[big], want[big], rtol=1e-3, atol=0)


# --- the held-out loss drift of a teleport (lib.teleport, lib.arms) ---------------------------
def test_heldout_drift_is_measured_on_the_heldout_batch():
    """Eq. (46) on a batch of 8 <= every hidden width is exact on that batch but not on another
    batch: the teleport batch's loss must not move, the held-out one must, and both records
    must equal the losses recomputed on their own batch."""
    from lib.teleport import make_objective, random_teleport, teleport
    W = make_weights([10, 12, 9, 3], K=2)
    X, Y = make_batch(8, 10, 3)
    Xh, Yh = make_batch(30, 10, 3, seed=4)
    W2, rec, _ = teleport(W, X, Y, ACT, make_objective("grad_norm", ACT), GLAction(46), steps=3, lr=0.5,
                          heldout=(Xh, Yh))
    for key, WW, XX, YY in (("loss_before", W, X, Y), ("loss_after", W2, X, Y),
                            ("heldout_loss_before", W, Xh, Yh), ("heldout_loss_after", W2, Xh, Yh)):
        torch.testing.assert_close(torch.tensor(rec[key], dtype=torch.float64), loss_fn(WW, XX, YY, ACT),
                                   rtol=1e-12, atol=0)
    drift = np.subtract(rec["loss_after"], rec["loss_before"])
    held = np.subtract(rec["heldout_loss_after"], rec["heldout_loss_before"])
    assert np.abs(drift).max() < 1e-10 and np.abs(held).min() > 1e-4
    # the random teleport records the held-out drift the same way
    norms = torch.full((2, 2), 0.5, dtype=torch.float64)
    W3, rec, _ = random_teleport(W, X, Y, ACT, GLAction(46), norms, gen(1), heldout=(Xh, Yh))
    torch.testing.assert_close(torch.tensor(rec["heldout_loss_after"], dtype=torch.float64),
                               loss_fn(W3, Xh, Yh, ACT), rtol=1e-12, atol=0)
    assert np.abs(np.subtract(rec["heldout_loss_after"], rec["heldout_loss_before"])).min() > 1e-4
    assert np.abs(np.subtract(rec["loss_after"], rec["loss_before"])).max() < 1e-10


def test_arm_hook_measures_the_drift_on_a_second_batch_of_fresh_images():
    """ArmHook draws one permutation per moment: the teleport batch is its first batch_size images,
    the held-out batch the next batch_size (Moments' docstring). Recompute both from the seed."""
    from lib.arms import Arm, ArmHook, Moments
    from lib.data import Data, synthetic
    from lib.teleport import make_objective
    d = synthetic("MNIST", 60, 20, seed=2)
    data = Data(d.x_train.double(), d.y_train, d.x_test.double(), d.y_test)
    W = [w.requires_grad_() for w in make_weights([784, 12, 10, 10], K=2)]
    opt = make_optimizer("sgd", W, 0.1)
    tele = dict(objective=make_objective("grad_norm", ACT), action=GLAction(46), steps=2, lr=0.05)
    hook = ArmHook(W, opt, data, ACT, [Arm("t", "teleport", "reset", teleport=tele)], Moments((0,), 1, 10, 7),
                   test_drift=True)
    before = [w.detach().clone() for w in W]
    hook(0, 0)
    rec, after = hook.records["t"][0], [w.detach() for w in W]
    idx = torch.randperm(60, generator=gen(7))
    batch, held = idx[:10], idx[10:20]
    for key, WW, rows in (("loss_before", before, batch), ("loss_after", after, batch),
                          ("heldout_loss_before", before, held), ("heldout_loss_after", after, held)):
        torch.testing.assert_close(torch.tensor(rec[key], dtype=torch.float64),
                                   loss_fn(WW, data.x_train[rows], data.y_train[rows], ACT), rtol=1e-12, atol=0)
    assert rec["heldout_loss_before"] != rec["loss_before"]
    for key, WW in (("test_loss_before", before), ("test_loss_after", after)):  # test_drift=True: the whole test set
        torch.testing.assert_close(torch.tensor(rec[key], dtype=torch.float64),  # evaluate sums in float32
                                   loss_fn(WW, data.x_test, data.y_test, ACT), rtol=1e-6, atol=0)
    assert (rec["epoch"], rec["batch"]) == (0, 0)


# --- lib.train.train_epoch: every example, the last partial batch included -----------------------
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("n", [25, 30])
def test_train_epoch_uses_every_example_including_a_last_partial_batch(n, batched):
    """An epoch of plain SGD (lr 0.1) on n examples in batches of 10 equals a hand loop over
    X[0:10], X[10:20], X[20:n]: the same weights and the mean of the batch losses (torch's SGD and
    lib.optim's batched one, which train_epoch steps its own way)."""
    import inspect

    from lib.train import train_epoch
    if batched and "batched" not in inspect.signature(make_optimizer).parameters:
        pytest.skip("lib.optim has no batched optimizer")
    W0 = make_weights([6, 5, 3], K=2)
    X, Y = make_batch(n, 6, 3)
    W = [w.clone().requires_grad_() for w in W0]
    seen = []
    opt = make_optimizer("sgd", W, 0.1, **({"batched": True} if batched else {}))
    mean = train_epoch(W, opt, X, Y, ACT, 10, before_batch=seen.append)
    V, losses = [w.clone().requires_grad_() for w in W0], []
    for i in range(0, n, 10):
        loss = loss_fn(V, X[i:i + 10], Y[i:i + 10], ACT)
        grads = torch.autograd.grad(loss.sum(), V)
        V = [(v - 0.1 * g).detach().requires_grad_() for v, g in zip(V, grads)]
        losses.append(loss.detach())
    assert seen == list(range(3))
    for w, v in zip(W, V):
        torch.testing.assert_close(w.detach(), v.detach(), rtol=1e-12, atol=1e-14)
    # the epoch's mean loss is accumulated in float32 whatever the weights' dtype
    torch.testing.assert_close(mean.double(), torch.stack(losses).mean(0), rtol=1e-6, atol=0)


# --- lib.teleport.teleport: Algorithm 1's inner loop by hand, and every field of its record -------
def _ascent_by_hand(W, X, Y, action, lr, steps):
    """W_{s+1} = (I + lr dF/dT).W_s with F(T) = ||grad L(action(W_s, T))||^2 differentiated by
    autograd through lib.actions (pseudo-inverse included); returns the weights and the product
    of the group elements per pair."""
    from lib.metrics import grad_norm_sq
    G = None
    for _ in range(steps):
        Ts = [torch.zeros(s, dtype=W[0].dtype, requires_grad=True) for s in action.algebra_shapes(W)]
        moved = [w if w.requires_grad else w.requires_grad_() for w in action(W, Ts, X, ACT)]
        grads = torch.autograd.grad(grad_norm_sq(moved, X, Y, ACT).sum(), Ts)
        step = [lr * g for g in grads]
        W = [w.detach() for w in action(W, step, X, ACT)]
        gs = [torch.eye(s.shape[-1], dtype=W[0].dtype) + s for s in step]
        G = gs if G is None else [g @ h for g, h in zip(gs, G)]
    return W, G


def test_teleport_is_gradient_ascent_on_the_algebra_and_records_what_it_did():
    """Two steps of teleport() (eq. 46, all pairs, batch 30 >= every width, as the paper's
    protocols) against the same two steps by hand; the record's every field recomputed."""
    from lib.metrics import grad_norm_sq
    from lib.teleport import make_objective, teleport
    W = make_weights([6, 5, 4, 3], K=2)
    X, Y = make_batch(30, 6, 3)
    Xh, Yh = make_batch(20, 6, 3, seed=8)
    action, lr = GLAction(46), 0.05
    W2, rec, _ = teleport(W, X, Y, ACT, make_objective("grad_norm", ACT), action, steps=2, lr=lr, heldout=(Xh, Yh))
    Wh, G = _ascent_by_hand(W, X, Y, action, lr, 2)
    for a, b in zip(W2, Wh):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert min(((a - b).norm() / b.norm()).item() for a, b in zip(W2, W)) > 1e-4  # it moved
    value = lambda V: grad_norm_sq([v.clone().requires_grad_() for v in V], X, Y, ACT).detach()  # noqa: E731
    want = {"objective_before": value(W), "objective_after": value(Wh),
            "loss_before": loss_fn(W, X, Y, ACT), "loss_after": loss_fn(Wh, X, Y, ACT),
            "heldout_loss_before": loss_fn(W, Xh, Yh, ACT), "heldout_loss_after": loss_fn(Wh, Xh, Yh, ACT),
            "algebra_norm": torch.stack([(g - torch.eye(g.shape[-1], dtype=g.dtype)).flatten(1).norm(dim=1)
                                         for g in G], 1),
            "steps": torch.tensor([2.0, 2.0], dtype=torch.float64)}
    assert set(rec) == set(want) | {"time_s"} and rec["time_s"] > 0
    for k, v in want.items():
        torch.testing.assert_close(torch.tensor(rec[k], dtype=torch.float64), v, rtol=1e-7, atol=1e-12, msg=k)
    assert rec["objective_after"][0] > rec["objective_before"][0]
    # maximize=False descends: the first step is the opposite one
    W3, rec, _ = teleport(W, X, Y, ACT, make_objective("grad_norm", ACT), action, steps=1, lr=lr, maximize=False)
    Wd, _ = _ascent_by_hand(W, X, Y, action, -lr, 1)
    for a, b in zip(W3, Wd):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_teleport_with_rescaling_accumulates_the_algebra_element():
    """Rescaling composes additively: after several steps algebra_norm = ||sum_s a_s|| per hidden
    layer, which the weights give back: a = log(W_m' / W_m) row by row (first layer)."""
    from lib.teleport import make_objective, teleport
    W = make_weights([6, 5, 4, 3], K=2)
    X, Y = make_batch(30, 6, 3)
    W2, rec, _ = teleport(W, X, Y, ACT, make_objective("grad_norm", ACT), RescaleAction(), steps=3, lr=0.5)
    a0 = (W2[0][:, :, 0] / W[0][:, :, 0]).log()
    torch.testing.assert_close(torch.tensor(rec["algebra_norm"], dtype=torch.float64)[:, 0], a0.norm(dim=1),
                               rtol=1e-9, atol=0)
    assert rec["steps"] == [3.0, 3.0] and a0.norm(dim=1).min() > 1e-3


# --- lib.teleport.make_objective: each objective is the metric it names --------------------------
def test_objectives_are_the_metrics_they_name():
    from lib.metrics import curvature, grad_norm_sq, random_directions, random_lie_elements, sharpness
    from lib.teleport import make_objective
    W = [w.requires_grad_() for w in make_weights([6, 5, 4, 3], K=2)]
    X, Y = make_batch(4, 6, 3)
    A = [torch.rand(w.shape, generator=gen(k), dtype=w.dtype) for k, w in enumerate(W)]
    torch.testing.assert_close(make_objective("a_norm", ACT, precond=A)(W, X, Y), grad_norm_sq(W, X, Y, ACT, precond=A))
    ts = [0.1, 0.5, 1.0]
    got = make_objective("sharpness", ACT, ts=ts, generator=gen(3))(W, X, Y)
    torch.testing.assert_close(got, sharpness(W, X, Y, ACT, ts, random_directions(W, 3, "sphere", gen(3))))
    got = make_objective("curvature", ACT, generator=gen(4), n_curves=2)(W, X, Y)
    g = gen(4)
    want = (curvature(W, X, ACT, random_lie_elements(W, g)) + curvature(W, X, ACT, random_lie_elements(W, g))) / 2
    torch.testing.assert_close(got, want)
    from lib.config import UsageError
    with pytest.raises(UsageError, match="preconditioner"):
        make_objective("a_norm", ACT)


# --- lib.actions.group_element ------------------------------------------------------------------
def test_group_element_known_answers():
    from lib.config import UsageError
    theta = 0.7
    T = torch.tensor([[[0.0, -theta], [theta, 0.0]]], dtype=torch.float64)  # so(2): exp is a rotation
    g, g_inv = group_element(T, "exp")
    rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    torch.testing.assert_close(g[0], rot, rtol=0, atol=1e-14)
    torch.testing.assert_close(g_inv[0], rot.T, rtol=0, atol=1e-14)
    g, g_inv = group_element(T, "first_order")
    torch.testing.assert_close(g[0], torch.eye(2, dtype=torch.float64) + T[0])
    torch.testing.assert_close(g_inv[0], torch.eye(2, dtype=torch.float64) / (1 + theta ** 2) - T[0] / (1 + theta ** 2))
    with pytest.raises(UsageError, match="first_order, exp"):
        group_element(T, "cayley")


# --- lib.models: forward, hidden_columns, losses, evaluate, init_mlp, activations ---------------
@pytest.mark.parametrize("shared", [True, False])
def test_forward_and_hidden_columns_equal_a_plain_loop_per_model(shared):
    W = make_weights([5, 4, 3, 2], K=3)
    X, _ = make_batch(7, 5, 2)
    X = X - 0.5
    Xk = X.expand(3, -1, -1) if shared else X + 0.1 * torch.randn(3, 7, 5, generator=gen(1), dtype=X.dtype)
    out, hs = forward(W, X if shared else Xk, ACT), hidden_columns(W, X if shared else Xk, ACT)
    for k in range(3):
        h = Xk[k]
        for j, w in enumerate(W):
            if j < len(hs):  # hs = [X^T, h_1, ..., h_{L-1}] in columns
                torch.testing.assert_close(hs[j][k], h.T, rtol=1e-14, atol=1e-15)
            z = h @ w[k].T
            h = torch.where(z > 0, z, 0.1 * z) if j < len(W) - 1 else z
        torch.testing.assert_close(out[k], h, rtol=1e-13, atol=1e-14)


def test_losses_per_model_known_answers():
    out = torch.zeros(2, 4, 5, dtype=torch.float64)  # uniform logits: cross-entropy log 5
    torch.testing.assert_close(losses_per_model(out, torch.tensor([0, 1, 2, 3]), "ce"),
                               torch.full((2,), math.log(5), dtype=torch.float64))
    out = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]], dtype=torch.float64)
    torch.testing.assert_close(losses_per_model(out, torch.tensor([0]), "ce"),
                               torch.tensor([math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))],
                                            dtype=torch.float64))
    Y = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(losses_per_model(out, Y, "mse"), torch.tensor([0.5 * (1 + 1), 0.5 * (1 + 9)],
                                                                             dtype=torch.float64))


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_evaluate_over_chunks_is_the_loss_over_the_whole_set(loss):
    """25 examples in chunks of 7 (a last partial chunk): the mean cross-entropy (sum for mse)
    over the whole set, and the accuracy counted by hand."""
    W = make_weights([5, 4, 3], K=2)
    X, labels = make_batch(25, 5, 3)
    Y = labels if loss == "ce" else torch.randn(25, 3, generator=gen(2), dtype=X.dtype)
    got, acc = evaluate(W, X, Y, ACT, loss, chunk=7)
    torch.testing.assert_close(got.double(), loss_fn(W, X, Y, ACT, loss), rtol=1e-6, atol=0)
    if loss == "ce":
        want = 100 * (forward(W, X, ACT).argmax(-1) == labels).double().mean(1)
        torch.testing.assert_close(acc.double(), want)
    else:
        assert acc.isnan().all()


@pytest.mark.parametrize("which", ["evaluate", "train_epoch"])
def test_losses_keep_the_models_dtype(which):
    from lib.train import train_epoch
    W = [w.requires_grad_() for w in make_weights([5, 4, 3], K=2)]
    X, Y = make_batch(25, 5, 3)
    if which == "evaluate":
        got = evaluate(W, X, Y, ACT)[0]
    else:
        got = train_epoch(W, make_optimizer("sgd", W, 0.0), X, Y, ACT, 25)  # lr 0: the loss at W
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, loss_fn(W, X, Y, ACT).detach(), rtol=1e-13, atol=0)


def test_init_mlp_is_torch_linear_s_range_and_batched_equals_separate():
    from lib.models import init_mlp
    W = init_mlp([400, 30, 2], [7, 8])
    alone = init_mlp([400, 30, 2], [8])
    for w, a in zip(W, alone):
        assert torch.equal(w[1], a[0]) and not torch.equal(w[0], w[1])
    for w, fan_in in zip(W, (400, 30)):
        bound = 1 / math.sqrt(fan_in)
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert abs(W[0].std().item() * math.sqrt(3) * math.sqrt(400) - 1) < 0.02  # uniform(-b, b): std b / sqrt(3)
    assert W[0].dtype == torch.float32 and init_mlp([3, 2], [0], dtype=torch.float64)[0].dtype == torch.float64


def test_activation_by_name_inverse_and_derivative():
    from lib.config import UsageError
    from lib.models import activation
    assert activation("leaky_relu").slope == 0.1 and activation("relu").slope == 0.0
    with pytest.raises(UsageError, match="leaky_relu, relu"):
        activation("tanh")
    x = torch.tensor([-2.0, -0.5, 0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(ACT(x), torch.tensor([-0.2, -0.05, 0.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(ACT.inverse(ACT(x)), x)
    torch.testing.assert_close(ACT.derivative(x), torch.tensor([0.1, 0.1, 0.1, 1.0], dtype=torch.float64))
    torch.testing.assert_close(Activation(0.0)(x), torch.tensor([0.0, 0.0, 0.0, 3.0], dtype=torch.float64))


# --- lib.optim ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,cls,hyper,moment", [("sgd", torch.optim.SGD, {"momentum": 0}, None),
                                                   ("momentum", torch.optim.SGD, {"momentum": 0.9}, "momentum_buffer"),
                                                   ("adagrad", torch.optim.Adagrad, {"eps": 1e-10}, None),
                                                   ("rmsprop", torch.optim.RMSprop, {"alpha": 0.99}, None),
                                                   ("adam", torch.optim.Adam, {"betas": (0.9, 0.999)}, "exp_avg")])
def test_make_optimizer_is_torch_s_with_its_defaults_and_first_moments_are_its_buffers(name, cls, hyper, moment):
    """One step of momentum from a fresh state: buffer = g, w <- w - lr g (torch's SGD); the
    first moments are the momentum / exp_avg buffers, None for the others."""
    from lib.optim import first_moments
    W = [w.requires_grad_() for w in make_weights([4, 3, 2], K=2)]
    opt = make_optimizer(name, W, 0.05)
    assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.05
    assert all(opt.param_groups[0][k] == v for k, v in hyper.items())
    X, Y = make_batch(6, 4, 2)
    loss_fn(W, X, Y, ACT).sum().backward()
    opt.step()
    bufs = first_moments(opt, W)
    if moment is None:
        assert bufs == [None, None]
    else:
        for b, w in zip(bufs, W):
            assert b is opt.state[w][moment]
            torch.testing.assert_close(b, w.grad * (1 if name == "momentum" else 0.1))  # adam: (1 - b1) g


# --- lib.train.fit and teleport_model -----------------------------------------------------------
def test_fit_equals_epochs_by_hand_and_records_its_curves():
    from lib.data import Data
    from lib.train import fit, train_epoch
    X, Y = make_batch(25, 6, 3)
    Xt, Yt = make_batch(11, 6, 3, seed=5)
    data = Data(X, Y, Xt, Yt)
    W0 = make_weights([6, 5, 3], K=2)
    W = [w.clone().requires_grad_() for w in W0]
    calls = []
    hist = fit(W, make_optimizer("adagrad", W, 0.1), data, ACT, 2, 10, hook=lambda e, i: calls.append((e, i)),
               progress=False)
    V = [w.clone().requires_grad_() for w in W0]
    opt = make_optimizer("adagrad", V, 0.1)
    init = evaluate(V, Xt, Yt, ACT)
    want = {"test_loss_init": init[0].tolist(), "test_acc_init": init[1].tolist(),
            "train_loss": [], "test_loss": [], "test_acc": []}
    for _ in range(2):
        want["train_loss"].append(train_epoch(V, opt, X, Y, ACT, 10).tolist())
        te, acc = evaluate(V, Xt, Yt, ACT)
        want["test_loss"].append(te.tolist())
        want["test_acc"].append(acc.tolist())
    assert calls == [(e, i) for e in range(2) for i in range(3)]
    assert set(hist) == set(want) | {"time_s"}
    for k, v in want.items():
        np.testing.assert_allclose(hist[k], v, rtol=1e-6, atol=0, err_msg=k)
    assert len(hist["time_s"]) == 2 and 0 < hist["time_s"][0] <= hist["time_s"][1]
    for a, b in zip(W, V):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-9, atol=1e-12)


def test_teleport_model_random_move_and_strategies():
    """teleport_model with random_norms acts in place by random_teleport's move (same generator),
    keeps the held-out batch, and resets the optimizer state ('reset') or leaves it ('keep')."""
    from lib.teleport import random_teleport
    from lib.train import teleport_model
    X, Y = make_batch(30, 6, 3)
    Xh, Yh = make_batch(9, 6, 3, seed=3)
    norms = torch.tensor([[0.1, 0.2], [0.3, 0.05]], dtype=torch.float64)
    W0 = make_weights([6, 5, 4, 3], K=2)
    want, rec_want, _ = random_teleport(W0, X, Y, ACT, RescaleAction(), norms, gen(4), heldout=(Xh, Yh))
    for strategy in ("reset", "keep"):
        W = [w.clone().requires_grad_() for w in W0]
        opt = make_optimizer("adagrad", W, 0.1)
        loss_fn(W, X, Y, ACT).sum().backward()
        opt.step()
        summed = [opt.state[w]["sum"].clone() for w in W]
        after_step = [w.detach().clone() for w in W]
        rec = teleport_model(W, opt, X, Y, ACT, strategy, random_norms=norms, generator=gen(4),
                             action=RescaleAction(), heldout=(Xh, Yh))
        moved, _, _ = random_teleport(after_step, X, Y, ACT, RescaleAction(), norms, gen(4), heldout=(Xh, Yh))
        for w, m in zip(W, moved):
            torch.testing.assert_close(w.detach(), m, rtol=1e-12, atol=0)
        assert set(rec) == set(rec_want) and rec["algebra_norm"] == norms.tolist()
        for w, s in zip(W, summed):
            assert torch.equal(opt.state[w]["sum"], torch.zeros_like(s) if strategy == "reset" else s)


# --- lib.report ---------------------------------------------------------------------------------
def test_rows_and_tables_known_answers(tmp_path):
    from lib.report import format_row, markdown_table, save_table
    assert format_row({"epoch": 3, "loss": 0.123456}) == "epoch         3  loss    0.1235"
    assert format_row({"a": 1.0}, {"a": 3}) == "a   1"
    md = markdown_table(["arm", "loss"], [["baseline", 0.123456], ["teleport", 2]])
    assert md == "| arm | loss |\n|---|---|\n| baseline | 0.1235 |\n| teleport | 2 |"
    stem = str(tmp_path / "t")
    assert save_table(stem, ["arm", "loss"], [["b", 0.1234567]], "Title", "note") == \
        "# Title\n\n| arm | loss |\n|---|---|\n| b | 0.1235 |\n\nnote"
    assert (tmp_path / "t.csv").read_text().splitlines() == ["arm,loss", "b,0.123457"]


def test_diverged_and_diverged_epochs_known_answers():
    from lib.report import diverged, diverged_epochs, finite_stats
    curves = [[1.0, 0.5, 0.4], [1.0, float("nan"), 0.3], [2e6, 1.0, 1.0], [1.0, None, 1.0]]
    assert diverged(curves) == [None, 2, 1, 2]
    assert diverged(curves, limit=1.5) == [None, 2, 1, 2]
    assert diverged([[1.0, 3.0]], limit=2.0) == [2]
    # values measured after the last epoch count as that epoch's
    assert diverged_epochs([[1.0, 0.5], [1.0, 0.5], [float("inf"), 1.0]], [0.4, float("nan"), 0.4]) == [None, 2, 1]
    assert finite_stats([1.0, 3.0, float("nan")]) == (2.0, 1.0, 2)


# --- lib.arms.failed_models ---------------------------------------------------------------------
def test_failed_models_known_answers():
    from lib.arms import Arm, failed_models
    arm = Arm("t", "teleport", "reset", guard=0.1)
    W = [torch.ones(3, 2, 2), torch.ones(3, 2, 2)]
    rec = {"loss_before": [1.0, 1.0, 1.0], "loss_after": [1.05, 1.2, 0.95], "objective_after": [1.0, 1.0, 1.0]}
    assert failed_models(arm, W, rec).tolist() == [False, True, False]  # a drift of 20% > 10%
    rec["objective_after"] = [float("nan"), 1.0, 1.0]
    assert failed_models(arm, W, rec).tolist() == [True, True, False]
    W[1][2, 0, 0] = float("inf")  # non-finite weights
    assert failed_models(arm, W, rec).tolist() == [True, True, True]
    assert failed_models(arm, [torch.ones(2, 1, 1)], {"error": "pinv failed"}).tolist() == [True, True]
    # a perturbation has no objective: only its weights are checked
    assert failed_models(arm, [torch.ones(2, 1, 1)], {"drift": [5.0, 5.0]}).tolist() == [False, False]


def _momentum_after_one_step(K):
    """K models of a 4-3-2 MLP and their momentum optimizer after one step (non-zero buffers)."""
    W = [w.requires_grad_() for w in make_weights([4, 3, 2], K=K)]
    opt = make_optimizer("momentum", W, 0.1)
    X, Y = make_batch(6, 4, 2)
    loss_fn(W, X, Y, ACT).sum().backward()
    opt.step()
    return W, opt


def test_branch_copies_models_and_state_arm_major():
    from lib.arms import branch
    W, opt = _momentum_after_one_step(K=2)
    W3, opt3 = branch(W, opt, 3, "momentum", 0.1)
    for w, w3 in zip(W, W3):
        assert w3.shape[0] == 6 and all(torch.equal(w3[2 * a:2 * a + 2], w.detach()) for a in range(3))
        buf, buf3 = opt.state[w]["momentum_buffer"], opt3.state[w3]["momentum_buffer"]
        assert all(torch.equal(buf3[2 * a:2 * a + 2], buf) for a in range(3)) and buf3.data_ptr() != buf.data_ptr()


# --- lib.stats.draw_means -----------------------------------------------------------------------
def test_draw_means_is_the_mean_over_draws_and_resumes_to_it():
    from lib.stats import draw_means
    def draw(j):
        return {"a": torch.tensor([j, 2.0 * j], dtype=torch.float32), "b": torch.tensor([1.0, j ** 2])}
    got = draw_means(draw, 4)
    torch.testing.assert_close(got["a"], torch.tensor([1.5, 3.0], dtype=torch.float64))
    torch.testing.assert_close(got["b"], torch.tensor([1.0, 3.5], dtype=torch.float64))
    states = []
    draw_means(draw, 2, on_draw=states.append)
    assert [s["draw"] for s in states] == [1, 2]
    resumed = draw_means(draw, 4, resume=states[-1])
    assert all(torch.equal(resumed[k], got[k]) for k in got)


# --- record fields the scripts report that no other test reads back -----------------------------
def test_quadratic_record_known_answers():
    """x^2 + 9y^2 from (10, 0.1), lr 0.05, teleport before step 5: GD multiplies x by 0.9 and y by
    0.1 per step; the teleport rotates the point onto the steep axis at the same loss, where
    ||grad f||^2 / max over the level set = (4x^2 + 324y^2) / (36 (x^2 + 9y^2)) becomes 1."""
    import teleport_quadratic as tq
    from lib.config import resolve, with_preset
    cfg = with_preset(resolve(tq, []), tq.PRESETS, "FUNCTION", "x2_9y2")
    out = tq.experiment(cfg, "x2_9y2")
    f = lambda x, y: x * x + 9 * y * y  # noqa: E731
    ratio_sq = lambda x, y: (4 * x * x + 324 * y * y) / (36 * f(x, y))  # noqa: E731
    assert out["function"] == "x2_9y2" and out["settings"] == {"START": (10.0, 0.1), "LR": 0.05, "TELEPORT_STEP": 5}
    assert out["hessian"].tolist() == [[2.0, 0.0], [0.0, 18.0]] and out["hessian_eigenvalues"].tolist() == [2.0, 18.0]
    assert out["grad_norm_max_over_min_on_a_level_set"] == pytest.approx(3.0, rel=1e-12)
    rec, (x, y) = out["teleport"], (10 * 0.9 ** 5, 0.1 * 0.1 ** 5)
    assert rec["w_before"] == pytest.approx([x, y], rel=1e-12)
    assert rec["loss_before"] == pytest.approx(f(x, y), rel=1e-12)
    assert rec["loss_after"] == pytest.approx(f(x, y), rel=1e-12)
    assert rec["w_after"] == pytest.approx([0.0, math.sqrt(f(x, y) / 9)], rel=1e-9, abs=1e-9)
    assert rec["theta_closed_form"] == pytest.approx(rec["theta"], abs=1e-12)
    assert rec["ratio_sq_before"] == pytest.approx(ratio_sq(x, y), rel=1e-9)
    assert rec["ratio_sq_after"] == pytest.approx(1, abs=1e-12)
    assert 0 < rec["ascent_steps"] <= cfg["TELEPORT_MAX_STEPS"]
    p = out["prop_3_5"]  # without teleport the ratio starts at its maximum and falls to 1/3 (the flat axis)
    assert p["max_ratio_no_teleport"] == pytest.approx(math.sqrt(ratio_sq(10.0, 0.1)), rel=1e-12)
    assert p["min_ratio_no_teleport"] == pytest.approx(1 / 3, rel=1e-9)
    # after the teleport: GD from w_after, the first step whose ratio departs from 1 by more than 1e-6
    (xa, ya), k = rec["w_after"], 0
    while abs(math.sqrt(ratio_sq(xa * 0.9 ** k, ya * 0.1 ** k)) - 1) <= 1e-6:
        k += 1
    assert p["gd_steps_after_teleport_until_ratio_departs_1e-6"] == k
    assert p["loss_when_ratio_departs"] == pytest.approx(f(xa * 0.9 ** k, ya * 0.1 ** k), rel=1e-6)
    assert out["divergence"]["limit"] == pytest.approx(tq.DIVERGED_ABOVE * f(10.0, 0.1), rel=1e-12)
    assert out["divergence"]["lr_times_lambda_max"] == pytest.approx(0.9, rel=1e-12)


def test_curvature_displacement_checks_are_the_closed_forms_of_eq_66():
    import contextlib
    import io

    import curvature_displacement as cd
    from lib.config import resolve
    cfg = {**resolve(cd, ["--quick"]), "N_KAPPA": 3, "CIRCLE_RS": [1.0], "PARABOLA_RS": [1.0], "N_ANGLES": 400}
    with contextlib.redirect_stdout(io.StringIO()):
        _, checks = cd.experiment(cfg)
    assert checks["two_over_pi"] == 2 / math.pi and checks["parabola_limit_kappa_r_inf"] == 0.5 + 1 / math.pi
    assert checks["circle_kappa_r_1_closed_form"] == pytest.approx(0.598742703618672, rel=1e-12)
    assert checks["circle_kappa_r_1_numeric"] == pytest.approx(checks["circle_kappa_r_1_closed_form"], abs=1e-4)
    assert checks["kappa0_max_abs_err"] < 1e-4


def test_optimization_summary_fields_known_answers():
    """teleport_optimization.summary on hand-made curves (2 runs, 3 epochs; the teleport arm's
    run 2 diverges at epoch 2): the per-arm mean training loss over all epochs, the controls'
    share of the gain at each control epoch, and the epoch-by-epoch comparison with the baseline."""
    import teleport_optimization as script
    nan = float("nan")
    res = {arm: {"train_loss": [[1.0, 1.0], [0.5 - d, nan if arm == "teleport" else 0.6],
                                [0.4 - d, nan if arm == "teleport" else 0.5]],
                 "test_loss": [[1.0, 1.0]] * 3, "test_acc": [[50.0, 50.0]] * 3, "time_s": [1.0, 2.0, 3.0],
                 "teleports": [{"time_s": 0.25}, {"time_s": 0.5}]}
           for arm, d in (("baseline", 0.0), ("teleport", 0.1), ("reset-only", 0.05))}
    _, summ = script.summary({"DATASET": "MNIST", "N_RUNS": 2, "EPOCHS": 3, "REPORT_EPOCHS": [1, 3],
                              "CONTROL_EPOCHS": [2, 3]}, {"adam": res})
    arms = summ["per_arm"]["adam"]
    assert arms["baseline"]["mean_train_loss_all_epochs"] == pytest.approx((1.9 / 3 + 2.1 / 3) / 2)
    assert arms["teleport"]["mean_train_loss_all_epochs"] == pytest.approx(1.7 / 3)  # run 1 only
    assert arms["reset-only"]["mean_train_loss_all_epochs"] == pytest.approx((1.8 / 3 + 2.1 / 3) / 2)
    assert arms["teleport"]["teleport_time_s"] == 0.75 and arms["teleport"]["time_s"] == 3.0
    assert summ["verdicts"]["adam"]["share_at_epoch"] == {"reset-only": {2: pytest.approx(0.5), 3: pytest.approx(0.5)}}
    assert summ["teleport_below_baseline"]["adam"] == \
        "adam: 1: no (1.0000 vs 1.0000), 2: yes (0.4000 vs 0.5000), 3: yes (0.3000 vs 0.4000)"


def test_sharpness_curvature_summary_fields_known_answers():
    """teleport_sharpness_curvature.summary on hand-made results (2 seeds; arm 'up' diverges in
    seed 2): every row field from its definition."""
    import teleport_sharpness_curvature as tsc
    nan = float("nan")
    curves = {"baseline": {"train_loss": [[1.0, 0.5], [1.0, 0.7]], "test_loss": [[1.0, 0.8], [1.0, 0.9]],
                           "test_acc": [[10.0, 80.0], [10.0, 70.0]]},
              "up": {"train_loss": [[1.0, 0.4], [1.0, nan]], "test_loss": [[1.0, 0.85], [1.0, nan]],
                     "test_acc": [[10.0, 90.0], [10.0, 5.0]]}}
    res = {"arms": ["baseline", "up"], "curves": curves, "diverged": {"baseline": [None, None], "up": [None, 2]},
           "landscape": {"branch": {"phi": [1.0, 2.0], "psi": [3.0, 4.0]},
                         "after_teleport": {"baseline": {"phi": [1.0, 2.0], "psi": [3.0, 4.0]},
                                            "up": {"phi": [1.5, 9.0], "psi": [2.0, 9.0]}}},
           "records": {"up": [{"loss_before": [1.0, 1.0], "loss_after": [1.2, 5.0], "objective_before": [2.0, 2.0],
                               "objective_after": [3.0, 9.0], "failed": [False, True]}]}}
    base, up = tsc.summary(res)
    assert base == {"arm": "baseline", "test_loss": pytest.approx(0.85), "test_loss_std": pytest.approx(0.05),
                    "dtest_paired": 0.0, "dtest_paired_std": 0.0, "dtrain_paired": 0.0, "test_acc": 75.0,
                    "test_acc_std": 5.0, "train_loss": pytest.approx(0.6), "gap": pytest.approx(0.25), "dphi": 0.0,
                    "dpsi": 0.0, "dobjective_per_teleport": base["dobjective_per_teleport"], "drift_per_teleport": 0.0,
                    "n": 2, "of": 2, "undone": 0}
    assert math.isnan(base["dobjective_per_teleport"])
    assert up == {"arm": "up", "test_loss": 0.85, "test_loss_std": 0.0, "dtest_paired": pytest.approx(0.05),
                  "dtest_paired_std": 0.0, "dtrain_paired": pytest.approx(-0.1), "test_acc": 90.0, "test_acc_std": 0.0,
                  "train_loss": 0.4, "gap": pytest.approx(0.45), "dphi": 0.5, "dpsi": -1.0,
                  "dobjective_per_teleport": 1.0, "drift_per_teleport": pytest.approx(0.2), "n": 1, "of": 2,
                  "undone": 1}


def test_rescaling_summary_mean_gain_and_batch_drift():
    import teleport_relu_rescaling as script
    hist = {"train_loss": [[3.0, 1.0], [2.0, 2.0]], "test_loss": [[5.0, 5.0], [4.0, 2.0]],
            "test_acc": [[0, 0], [50.0, 70.0]], "time_s": [1.0, 2.5]}
    recs = [{"grad_norm_before": [1.0, 2.0], "grad_norm_after": [2.0, 8.0], "loss_before": [1.0, 1.0],
             "loss_after": [1.1, 1.2], "time_s": 0.5, "failed": [False, False]},
            {"grad_norm_before": [1.0, 1.0], "grad_norm_after": [9.0, 1.0], "loss_before": [1.0, 1.0],
             "loss_after": [9.0, 1.0], "time_s": 0.5, "failed": [True, False]}]  # model 0's second one undone
    s = script.summarize(hist, recs, [2])
    assert s["grad_gain_mean"] == pytest.approx(7 / 3) and s["grad_gain_median"] == 2.0  # gains 2, 4, 1
    assert s["drift_batch_median"] == pytest.approx(0.1) and s["train_time_s"] == 2.5  # drifts 0.1, 0.2, 0
    assert s["train_2"] == 2.0 and s["test_2"] == 3.0


# --- smaller known answers: random_lie_elements, psi, acted pairs, transport of some models -------
def test_random_lie_elements_psi_and_acted_pairs():
    from lib.metrics import curvature, psi, random_lie_elements
    W = make_weights([6, 5, 4, 3], K=2)
    Ms = random_lie_elements(W, gen(0))
    assert [M.shape for M in Ms] == [(5, 5), (4, 4)]
    assert all((M >= 0).all() and abs(M.norm().item() - 1) < 1e-12 for M in Ms)
    assert [M.shape for M in random_lie_elements(W, gen(0), pairs=(-1,))] == [(4, 4)]
    X, _ = make_batch(4, 6, 3)
    draws = [random_lie_elements(W, gen(s)) for s in (1, 2)]
    mean = (curvature(W, X, ACT, draws[0]) + curvature(W, X, ACT, draws[1])) / 2
    torch.testing.assert_close(psi(W, X, ACT, draws), mean)
    assert GLAction(46, pairs=(-1, 0)).acted_pairs(W) == [0, 1] and GLAction(54).acted_pairs(W) == [0, 1]
    assert GLAction(46, pairs=(-1,)).algebra_shapes(W) == [(2, 4, 4)]
    assert RescaleAction().algebra_shapes(W) == [(2, 5), (2, 4)]


def test_transport_of_some_models_replaces_only_their_first_moments():
    from lib.optim import apply_strategy, first_moments
    W, opt = _momentum_after_one_step(K=3)
    before = [b.clone() for b in first_moments(opt, W)]
    new = [torch.full_like(b[1:2], 7.0) for b in before]
    apply_strategy(opt, W, "transport", new, models=slice(1, 2))
    for b, a in zip(before, first_moments(opt, W)):
        assert torch.equal(a[1], torch.full_like(a[1], 7.0)) and torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


# --- small helpers of lib.config, lib.data, lib.io, lib.progress ---------------------------------
def test_config_data_io_progress_helpers(tmp_path):
    import gzip

    from lib.config import UsageError, check_choice, check_positive
    from lib.data import read_idx
    from lib.io import experiment_dirs, load_results, save_text
    from lib.progress import settings_key
    check_choice("optimizer", "sgd", ["sgd", "adam"])
    with pytest.raises(UsageError, match=r"^unknown optimizer 'lbfgs'; known: sgd, adam$"):
        check_choice("optimizer", "lbfgs", ["sgd", "adam"])
    check_positive("lr", 0.0)
    with pytest.raises(UsageError, match=r"^lr must be > 0, got 0.0$"):
        check_positive("lr", 0.0, allow_zero=False)
    with pytest.raises(UsageError, match=r"^lr must be >= 0, got -1$"):
        check_positive("lr", -1)
    # an IDX file: magic 0x00000803 (3-d uint8), the dims big-endian, then the bytes
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    blob = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in data.shape) + data.tobytes()
    (tmp_path / "x-idx3-ubyte").write_bytes(blob)
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as fh:
        fh.write(blob)
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        assert np.array_equal(np.asarray(read_idx(tmp_path / name, (3, 4))), data)
    assert save_text(str(tmp_path / "a.md"), "# t\n") == str(tmp_path / "a.md")
    assert (tmp_path / "a.md").read_text() == "# t\n"
    (tmp_path / "r.json").write_text('{"a": [1, null]}')
    assert load_results(str(tmp_path / "r.json")) == {"a": [1, None]}
    with pytest.raises(UsageError, match="no saved results"):
        load_results(str(tmp_path / "missing.json"))
    figs, res = experiment_dirs("optimization", str(tmp_path))
    assert (figs, res) == (str(tmp_path / "figures" / "optimization"), str(tmp_path / "results" / "optimization"))
    assert os.path.isdir(figs) and os.path.isdir(res)
    # settings that do not change the numbers (plumbing) do not change the checkpoint's key
    cfg = {"LR": 0.1, "EPOCHS": 3, "OUT_DIR": "a", "PROGRESS": True}
    assert settings_key(cfg) == settings_key({**cfg, "OUT_DIR": "b", "PROGRESS": False})
    assert settings_key(cfg) != settings_key({**cfg, "LR": 0.2})


# --- lib.teleport_module: its held-out drift too is measured on the held-out batch ----------------
def test_teleport_module_measures_the_drift_on_the_heldout_batch():
    """group='gl' (eq. 46 on Linear -> LeakyReLU -> Linear) on a batch of 4 <= the hidden width 8:
    exact on that batch, not on another one; both records against the losses recomputed."""
    from lib.teleport_module import teleport_module
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LeakyReLU(0.1), torch.nn.Linear(8, 3)).double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    X, Y = make_batch(4, 6, 3)
    Xh, Yh = make_batch(30, 6, 3, seed=4)
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        want = {"loss_before": ce(model(X), Y), "heldout_loss_before": ce(model(Xh), Yh)}
    rec = teleport_module(model, ce, X, Y, group="gl", steps=3, lr=0.5, heldout=(Xh, Yh))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        want.update(loss_after=ce(model(X), Y), heldout_loss_after=ce(model(Xh), Yh))
    for k, v in want.items():
        assert rec[k] == pytest.approx(float(v), rel=1e-12), k
    assert abs(rec["loss_after"] - rec["loss_before"]) < 1e-10
    assert abs(rec["heldout_loss_after"] - rec["heldout_loss_before"]) > 1e-4
