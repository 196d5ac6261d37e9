"""Teleportation moves along the orbit in the direction asked; batched runs equal separate runs."""
import pytest
import torch

from conftest import make_batch, make_weights
from lib.actions import GLAction, RescaleAction
from lib.config import UsageError
from lib.models import Activation, loss_fn
from lib.optim import make_optimizer
from lib.teleport import make_objective, random_teleport, teleport
from lib.train import teleport_model, train_epoch


@pytest.mark.parametrize("maximize", [True, False])
def test_gl46_teleport_moves_grad_norm_and_keeps_loss(leaky, maximize):
    # batch 8 <= every width: eq. 46 is exact, so the loss on the teleport batch must not move
    W = make_weights([10, 12, 9, 3], K=2)
    X, Y = make_batch(8, 10, 3)
    obj = make_objective("grad_norm", leaky)
    lr = 0.5 if maximize else 0.05  # descent needs small steps: I + T nears singular matrices
    _, rec, _ = teleport(W, X, Y, leaky, obj, GLAction(46), steps=5, lr=lr, maximize=maximize)
    before, after = torch.tensor(rec["objective_before"]), torch.tensor(rec["objective_after"])
    assert ((after > 1.2 * before) if maximize else (after < 0.95 * before)).all()
    drift = (torch.tensor(rec["loss_after"]) - torch.tensor(rec["loss_before"])).abs() / torch.tensor(rec["loss_before"])
    assert (drift < 1e-8).all()


def test_rescale_teleport_exact_per_sample_and_grows_grad_norm():
    relu = Activation(0.0)
    W = make_weights([20, 16, 10, 10], K=3, dtype=torch.float32)
    X, Y = make_batch(200, 20, 10, dtype=torch.float32)
    Xh, Yh = make_batch(300, 20, 10, seed=5, dtype=torch.float32)
    W2, rec, _ = teleport(W, X, Y, relu, make_objective("grad_norm", relu), RescaleAction(), steps=10, lr=1.0,
                          heldout=(Xh, Yh))
    assert (torch.tensor(rec["objective_after"]) > torch.tensor(rec["objective_before"])).all()
    per_sample = lambda V: torch.stack([loss_fn(V, Xh[i:i + 1], Yh[i:i + 1], relu) for i in range(300)])  # noqa: E731
    ref = per_sample(W)
    assert ((per_sample(W2) - ref).abs() / ref).max().item() < 1e-5


def test_stop_above_freezes_each_model_separately(leaky):
    W = make_weights([10, 12, 9, 3], K=2)
    X, Y = make_batch(8, 10, 3)
    obj = make_objective("grad_norm", leaky)
    first = obj([w.clone().requires_grad_() for w in W], X, Y).detach()
    cap = first.mean().item()  # one model starts above the cap, the other below
    _, rec, _ = teleport(W, X, Y, leaky, obj, GLAction(46), steps=4, lr=0.5, stop_above=cap)
    hi = int(first.argmax())
    assert rec["steps"][hi] == 0 and rec["steps"][1 - hi] >= 1
    assert rec["algebra_norm"][hi] == [0.0, 0.0]


def _recovered_gl46_norms(W, W2, X, act):
    """||T_m|| per model and pair, read back from the weights before (W) and after (W2) eq. (46)
    with g = I + T on all pairs of a 3-layer MLP: W1' = g1 W1, so T1 = (W1' - W1) W1^+ (W1 of full
    row rank); W2' = g2 W2 R1 with R1 = s(z) s(g1 z)^+, z = W1 X^T, so T2 = W2' R1^{-1} W2^+ - I
    (R1 invertible: batch >= width)."""
    eye = lambda n: torch.eye(n, dtype=W[0].dtype)  # noqa: E731
    T1 = (W2[0] - W[0]) @ torch.linalg.pinv(W[0])
    z = W[0] @ X.T
    R1 = act(z) @ torch.linalg.pinv(act((eye(z.shape[1]) + T1) @ z))
    T2 = W2[1] @ torch.linalg.inv(R1) @ torch.linalg.pinv(W[1]) - eye(W[1].shape[1])
    return torch.stack([T.flatten(1).norm(dim=1) for T in (T1, T2)], 1)


def test_random_teleport_moves_by_requested_norm(leaky):
    W = make_weights([10, 8, 6, 3], K=2)
    X, Y = make_batch(5, 10, 3)
    norms = torch.tensor([[0.05, 0.1], [0.2, 0.01]], dtype=torch.float64)
    # rescaling: W_m <- diag(e^a) W_m, so a is read back from the first column of each layer
    W2, rec, _ = random_teleport(W, X, Y, leaky, RescaleAction(), norms, torch.Generator().manual_seed(0))
    a0 = (W2[0][:, :, 0] / W[0][:, :, 0]).log()
    a1 = (W2[1][:, :, 0] / W[1][:, :, 0]).log() + a0[:, :1]  # layer 1 also carries e^{-a0} on its columns
    assert torch.allclose(a0.norm(dim=1), norms[:, 0]) and torch.allclose(a1.norm(dim=1), norms[:, 1])
    assert torch.allclose(torch.tensor(rec["algebra_norm"], dtype=torch.float64),
                          torch.stack([a0.norm(dim=1), a1.norm(dim=1)], 1))
    # GL, eq. (46): T read back from the weights (batch 40 >= every width, so R1 is invertible)
    X40, Y40 = make_batch(40, 10, 3, seed=3)
    W2, rec, _ = random_teleport(W, X40, Y40, leaky, GLAction(46), norms, torch.Generator().manual_seed(0))
    got = _recovered_gl46_norms(W, W2, X40, leaky)
    torch.testing.assert_close(got, norms, rtol=1e-8, atol=0)
    torch.testing.assert_close(torch.tensor(rec["algebra_norm"], dtype=torch.float64), got, rtol=1e-8, atol=0)
    # at batch 5 <= every hidden width eq. (46) is exact: the loss on the batch must not move
    W2, rec, _ = random_teleport(W, X, Y, leaky, GLAction(46), norms, torch.Generator().manual_seed(0))
    assert min(((a - b).norm() / b.norm()).item() for a, b in zip(W2, W)) > 1e-3
    assert torch.allclose(torch.tensor(rec["loss_after"]), torch.tensor(rec["loss_before"]), rtol=1e-10)
    torch.testing.assert_close(torch.tensor(rec["loss_after"], dtype=torch.float64), loss_fn(W2, X, Y, leaky),
                               rtol=1e-12, atol=0)


def test_unknown_objective_and_negative_step():
    with pytest.raises(UsageError, match="known: grad_norm, log_grad_norm, a_norm, sharpness, curvature"):
        make_objective("flatness", Activation(0.1))
    with pytest.raises(UsageError, match=">= 0"):
        teleport([torch.zeros(1, 2, 2)], None, None, None, None, GLAction(46), lr=-1.0)


def _train(W0, optimizer, X, Y, act, teleport_at, strategy="reset"):
    # teleport batch 40 > widths, as the paper (200 > 16): pinv well conditioned in float32
    W = [w.clone().requires_grad_() for w in W0]
    opt = make_optimizer(optimizer, W, 1e-2)
    obj = make_objective("grad_norm", act)
    losses = []
    for epoch in range(2):
        def hook(i):
            if epoch == 1 and i in teleport_at:
                teleport_model(W, opt, X[:40], Y[:40], act, strategy, objective=obj, action=GLAction(46),
                               steps=3, lr=0.05)
        losses.append(train_epoch(W, opt, X, Y, act, 10, before_batch=hook))
    return W, torch.stack(losses)


@pytest.mark.parametrize("optimizer,strategy", [("sgd", "reset"), ("adam", "reset"), ("momentum", "transport")])
def test_batched_run_equals_separate_runs(leaky, optimizer, strategy):
    # float64: in float32 the batched and single pinv differ by ~1e-7, which Adam's fresh state
    # (steps of size lr * sign(g) where g ~ 0) amplifies to ~5e-5 in the weights
    W0 = make_weights([10, 12, 9, 3], K=3, dtype=torch.float64)
    X, Y = make_batch(60, 10, 3, dtype=torch.float64)
    Wb, lb = _train(W0, optimizer, X, Y, leaky, teleport_at={2}, strategy=strategy)
    for k in range(3):
        Ws, ls = _train([w[k:k + 1] for w in W0], optimizer, X, Y, leaky, teleport_at={2}, strategy=strategy)
        for a, b in zip(Wb, Ws):
            assert torch.allclose(a[k:k + 1], b, atol=1e-5)
        assert torch.allclose(lb[:, k:k + 1], ls, atol=1e-6)


def test_log_grad_norm_objective_is_the_log_of_grad_norm():
    from lib.models import Activation
    act = Activation(0.1)
    W = [w.requires_grad_() for w in make_weights([5, 4, 3], K=2)]
    X, Y = make_batch(6, 5, 3)
    g, lg = make_objective("grad_norm", act), make_objective("log_grad_norm", act)
    torch.testing.assert_close(lg(W, X, Y), g(W, X, Y).log())
