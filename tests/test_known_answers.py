"""Known answers for lib functions that had none: each test fails when the function is broken
(checked by breaking it: the AdaGrad exponent -1 instead of -1/2, the held-out drift taken on the
teleport batch, the last partial mini-batch dropped, ...). Everything in float64 where it is exact."""
import math

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
    hook = ArmHook(W, opt, data, ACT, [Arm("t", "teleport", "reset", teleport=tele)], Moments((0,), 1, 10, 7))
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


# --- lib.train.train_epoch: every example, the last partial batch included -----------------------
@pytest.mark.parametrize("n", [25, 30])
def test_train_epoch_uses_every_example_including_a_last_partial_batch(n):
    """An epoch of plain SGD (lr 0.1) on n examples in batches of 10 equals a hand loop over
    X[0:10], X[10:20], X[20:n]: the same weights and the mean of the batch losses."""
    from lib.train import train_epoch
    W0 = make_weights([6, 5, 3], K=2)
    X, Y = make_batch(n, 6, 3)
    W = [w.clone().requires_grad_() for w in W0]
    seen = []
    mean = train_epoch(W, make_optimizer("sgd", W, 0.1), X, Y, ACT, 10, before_batch=seen.append)
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
