"""The training loop's hand-written backpropagation equals autograd."""
import pytest
import torch

from conftest import make_batch, make_weights
from lib.models import Activation, loss_and_grads, loss_fn


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("slope", [0.1, 0.0])
@pytest.mark.parametrize("shared", [True, False])
def test_loss_and_grads_equal_autograd(loss, slope, shared):
    act = Activation(slope)
    W = [w.requires_grad_() for w in make_weights([7, 5, 4, 3], K=3)]
    X, labels = make_batch(6, 7, 3)
    X = X - 0.5  # negative pre-activations too
    Y = labels if loss == "ce" else torch.randn(6, 3, dtype=X.dtype)
    if not shared:
        X = X.expand(3, -1, -1) + 0.1 * torch.randn(3, 6, 7, dtype=X.dtype)
    want = loss_fn(W, X, Y, act, loss)
    want_grads = torch.autograd.grad(want.sum(), W)
    got, grads = loss_and_grads(W, X, Y, act, loss)
    torch.testing.assert_close(got, want.detach(), rtol=1e-13, atol=1e-14)  # float64: to round-off
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
