"""The training engine with the control-arm hook (lib.arms.ArmHook): an arm that only resets the
optimizer, with no moments, is bitwise the baseline; the teleport arm raises ||grad L||^2; the
random arm moves the weights by a group element of exactly the teleport's algebra norms."""
import pytest
import torch

from lib.actions import GLAction
from lib.arms import Arm, ArmHook, Moments
from lib.data import Data, synthetic
from lib.models import Activation, init_mlp
from lib.optim import make_optimizer
from lib.teleport import make_objective
from lib.train import fit, make_model

ACT = Activation(0.1)
WIDTHS = [784, 16, 10, 10]
SEEDS = [54321, 108642]
TELE = dict(objective=make_objective("grad_norm", ACT), action=GLAction(46), steps=3, lr=0.01, stop_above=100.0)
TELEPORT = Arm("teleport", "teleport", "reset", teleport=TELE)
RANDOM = Arm("random", "random", "reset", match="teleport", teleport=TELE)
MOMENTS = Moments((1,), 2, 40, 7)


def _run(arm, moments=MOMENTS, matched=None, optimizer="adagrad"):
    data = synthetic("MNIST", 120, 60, seed=0)
    W, opt = make_model(WIDTHS, SEEDS, optimizer, 1e-2)
    hook = ArmHook(W, opt, data, ACT, [arm], moments, matched=matched)
    hist = fit(W, opt, data, ACT, 2, 20, hook=hook, progress=False)
    return W, hist, hook.records[arm.name]


@pytest.mark.parametrize("optimizer", ["adagrad", "adam"])
def test_reset_only_without_moments_is_bitwise_the_baseline(optimizer):
    reset_only = Arm("reset-only", "none", "reset")
    W0, h0, recs = _run(reset_only, Moments((), 2, 40, 7), optimizer=optimizer)
    data = synthetic("MNIST", 120, 60, seed=0)
    W1, opt = make_model(WIDTHS, SEEDS, optimizer, 1e-2)
    h1 = fit(W1, opt, data, ACT, 2, 20, progress=False)
    assert recs == [] and all(torch.equal(a, b) for a, b in zip(W0, W1))
    assert h0["train_loss"] == h1["train_loss"] and h0["test_loss"] == h1["test_loss"]
    _, h2, recs = _run(reset_only, optimizer=optimizer)  # with its moments the reset does change training
    assert len(recs) == 2 and h2["train_loss"][0] == h1["train_loss"][0] and h2["train_loss"][1] != h1["train_loss"][1]


def test_teleport_arm_raises_grad_norm():
    _, hist, recs = _run(TELEPORT)
    assert len(recs) == 2 and len(hist["test_loss"]) == 2 and len(hist["time_s"]) == 2
    assert [(r["epoch"], r["batch"]) for r in recs] == [(1, 0), (1, 1)]
    moved = 0
    for r in recs:  # a model above stop_above takes no step and stays exactly where it was
        for a, b, steps in zip(r["objective_after"], r["objective_before"], r["steps"]):
            assert (a > b) if steps > 0 else (a == b and b > TELE["stop_above"])
            moved += steps > 0
        assert "heldout_loss_after" in r
    assert moved >= 2


def _batch(data, moments):
    """The teleport batch ArmHook draws at its first moment."""
    idx = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(moments.seed))
    return data.x_train[idx[:moments.batch_size]]


def test_random_arm_moves_by_the_algebra_norms_of_the_teleport():
    """g = I + T acts on pair (W2, W1) by W1 <- g1 W1 and on pair (W3, W2) by W2 <- g2 W2 R1,
    R1 = s(z) s(g1 z)^+ (eq. 46, z = W1 h on the teleport batch). From the weights before and
    after the random move recover T1 = (W1' - W1) W1^+ and T2 = W2' R1^{-1} W2^+ - I (W has full
    row rank) and check their Frobenius norms against the teleport's recorded ones, which are
    themselves checked against the teleport's own W1 move."""
    d = synthetic("MNIST", 120, 60, seed=0)
    data = Data(d.x_train.double(), d.y_train, d.x_test.double(), d.y_test)  # inverses below: float64
    moments = Moments((0,), 1, 40, 7)
    moved = []
    for arm, matched in ((TELEPORT, None), (RANDOM, "teleport")):
        W = [w.requires_grad_() for w in init_mlp(WIDTHS, SEEDS, dtype=torch.float64)]
        opt = make_optimizer("momentum", W, 1e-3)
        hook = ArmHook(W, opt, data, ACT, [arm], moments, matched=matched and {"teleport": moved[0][2]})
        before = [w.detach().clone() for w in W]
        hook(0, 0)
        moved.append((before, [w.detach() for w in W], hook.records[arm.name]))
    (b_t, a_t, rec_t), (before, after, rec_r) = moved
    norms = torch.tensor(rec_t[0]["algebra_norm"], dtype=torch.float64)  # (K, 2 pairs)
    assert norms.min() > 1e-4
    T1_tele = (a_t[0] - b_t[0]) @ torch.linalg.pinv(b_t[0])  # the teleport's first pair: W1 <- g1 W1
    torch.testing.assert_close(T1_tele.flatten(1).norm(dim=1), norms[:, 0], rtol=1e-6, atol=0)
    T1 = (after[0] - before[0]) @ torch.linalg.pinv(before[0])
    z = before[0] @ _batch(data, moments).T  # (K, 16, B)
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    R1 = ACT(z) @ torch.linalg.pinv(ACT((eye(16) + T1) @ z))
    T2 = after[1] @ torch.linalg.inv(R1) @ torch.linalg.pinv(before[1]) - eye(10)
    got = torch.stack([T.flatten(1).norm(dim=1) for T in (T1, T2)], 1)
    torch.testing.assert_close(got, norms, rtol=1e-6, atol=0)
    assert not torch.allclose(after[0], a_t[0])  # a move of the same size in another direction
    assert rec_r[0]["loss_before"] == rec_t[0]["loss_before"]  # on the same teleport batch


@pytest.mark.slow
def test_compiled_epoch_equals_eager_epoch():
    """torch.compile of the training step (about 20 s to compile) gives the same training."""
    from lib.train import train_epoch
    data = synthetic("MNIST", 200, 10)
    runs = []
    for compile in (False, True):
        W, opt = make_model(WIDTHS, [1, 2, 3], "adagrad", 1e-2)
        loss = train_epoch(W, opt, data.x_train, data.y_train, ACT, 20, compile=compile)
        runs.append((loss, [w.detach() for w in W]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
