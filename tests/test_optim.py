"""Optimizer-state strategies after a teleport."""
import pytest
import torch

from conftest import make_batch, make_weights
from lib.actions import RescaleAction
from lib.config import UsageError
from lib.models import Activation, loss_fn
from lib.optim import apply_strategy, first_moments, make_optimizer
from lib.train import teleport_model


def _trained(optimizer, steps=3):
    W = [w.requires_grad_() for w in make_weights([6, 5, 4, 3], K=2)]
    X, Y = make_batch(20, 6, 3)
    opt = make_optimizer(optimizer, W, 0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(W, X, Y, Activation(0.1)).sum().backward()
        opt.step()
    return W, opt, X, Y


def test_reset_gives_a_fresh_state():
    W, opt, _, _ = _trained("adagrad")
    assert opt.state[W[0]]["sum"].abs().sum() > 0
    apply_strategy(opt, W, "reset")
    assert opt.state[W[0]]["sum"].abs().sum() == 0 and float(opt.state[W[0]]["step"]) == 0
    W, opt, _, _ = _trained("adam")
    apply_strategy(opt, W, "reset")
    assert len(opt.state) == 0


def test_transport_pushes_momentum_forward_and_keep_keeps_it():
    # rescaling acts linearly: W_0 <- diag(e^a) W_0, so its momentum must become diag(e^a) m_0
    for strategy in ("transport", "keep"):
        W, opt, X, Y = _trained("momentum")
        before = [m.clone() for m in first_moments(opt, W)]
        norms = torch.full((2, 2), 0.3, dtype=torch.float64)
        W_old = [w.detach().clone() for w in W]
        teleport_model(W, opt, X, Y, Activation(0.1), strategy, random_norms=norms,
                       generator=torch.Generator().manual_seed(0), action=RescaleAction())
        scale = W[0].detach()[:, :, :1] / W_old[0][:, :, :1]
        after = first_moments(opt, W)
        expected = scale * before[0] if strategy == "transport" else before[0]
        assert torch.allclose(after[0], expected, atol=1e-12)
        assert not torch.allclose(scale, torch.ones_like(scale))


def test_bad_optimizer_input():
    with pytest.raises(UsageError, match="known: sgd, momentum, adagrad, rmsprop, adam"):
        make_optimizer("lbfgs", [torch.zeros(1, requires_grad=True)], 0.1)
    with pytest.raises(UsageError, match="learning rate must be >= 0"):
        make_optimizer("sgd", [torch.zeros(1, requires_grad=True)], -0.1)
    with pytest.raises(UsageError, match="known: reset, keep, transport"):
        apply_strategy(None, [], "forget")
