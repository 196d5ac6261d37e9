"""Curvature, sharpness and gradient norms against known answers."""
import math

import pytest
import torch

from conftest import make_batch, make_weights
from lib.actions import GLAction
from lib.metrics import (curvature, curve_derivatives, curve_derivatives_closed_form, grad_norm_sq,
                         kappa, psi, random_directions, random_lie_elements, sharpness)
from lib.models import Activation, hidden_columns, loss_fn


@pytest.mark.parametrize("r", [0.1, 1.0, 7.5])
def test_kappa_of_circle_is_one_over_radius(r):
    t = torch.tensor([0.0, 0.4, 2.0], dtype=torch.float64)
    # three points of the circle as three "models", each a (1, 2) "layer"
    d1 = [torch.stack([-r * torch.sin(t), r * torch.cos(t)], 1).unsqueeze(1)]
    d2 = [torch.stack([-r * torch.cos(t), -r * torch.sin(t)], 1).unsqueeze(1)]
    assert torch.allclose(kappa(d1, d2), torch.full((3,), 1 / r, dtype=torch.float64))


def test_kappa_of_line_is_zero():
    d1 = [torch.tensor([[1.0, 2.0, -1.0]], dtype=torch.float64)]
    d2 = [3 * d1[0]]  # acceleration along the line
    assert kappa(d1, d2).abs().item() < 1e-7


def test_curve_derivatives_match_finite_differences(leaky):
    W = make_weights([6, 7, 5, 3], K=2)
    X, _ = make_batch(5, 6, 3)
    Ms = random_lie_elements(W, torch.Generator().manual_seed(3))
    d1, d2 = curve_derivatives(W, X, leaky, Ms)
    act, h = GLAction(54, "exp"), 1e-4
    at = lambda t: act(W, [t * M for M in Ms], X, leaky)  # noqa: E731
    fd1 = [(p - m) / (2 * h) for p, m in zip(at(h), at(-h))]
    fd2 = [(p - 2 * c + m) / h ** 2 for p, c, m in zip(at(h), at(0.0), at(-h))]
    for a, b in zip(d1 + d2, fd1 + fd2):
        assert ((a - b).norm() / b.norm()).item() < 1e-3
    fd_kappa, got = kappa(fd1, fd2), curvature(W, X, leaky, Ms)
    assert torch.allclose(got, fd_kappa, rtol=1e-3)


def test_closed_forms_57_60_match_autodiff_for_one_pair(leaky):
    W = make_weights([6, 5, 3], K=2)
    X, _ = make_batch(4, 6, 3)
    M = random_lie_elements(W, torch.Generator().manual_seed(1))[0]
    auto1, auto2 = curve_derivatives(W, X, leaky, [M])
    h = hidden_columns(W, X, leaky)[0]
    c1, c2 = curve_derivatives_closed_form(W[1], W[0], h, leaky, M)
    for a, c in zip(auto1 + auto2, c1 + c2):
        assert torch.allclose(a, c, atol=1e-10)


def test_psi_is_differentiable_and_batched_equals_alone(leaky):
    W = make_weights([6, 7, 5, 3], K=3)
    X, _ = make_batch(5, 6, 3)
    draws = [random_lie_elements(W, torch.Generator().manual_seed(s)) for s in range(3)]
    Wr = [w.clone().requires_grad_() for w in W]
    batched = psi(Wr, X, leaky, draws)
    batched.sum().backward()
    assert all(torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0 for w in Wr)
    for k in range(3):
        alone = psi([w[k:k + 1] for w in W], X, leaky, draws)
        assert torch.allclose(alone, batched[k:k + 1].detach(), rtol=1e-10)


@pytest.mark.parametrize("kind", ["sphere", "positive_orthant"])
def test_directions_have_unit_norm(kind):
    W = make_weights([6, 5, 3], K=2)
    D = random_directions(W, 7, kind, torch.Generator().manual_seed(0))
    norms = sum(d.pow(2).flatten(1).sum(1) for d in D).sqrt()
    assert torch.allclose(norms, torch.ones(7, dtype=torch.float64))
    if kind == "positive_orthant":
        assert all((d >= 0).all() for d in D)


def _linear_problem(K=2, n_in=5, n_out=3, B=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n_in, generator=g, dtype=torch.float64)
    Y = torch.randn(B, n_out, generator=g, dtype=torch.float64)
    W = torch.randn(K, n_out, n_in, generator=g, dtype=torch.float64)
    return W, X, Y


def test_sharpness_of_quadratic_matches_closed_form():
    """A linear model with squared loss, L(W) = 0.5 ||Y - X W^T||^2, is a quadratic in W with
    gradient G = (X W^T - Y)^T X and Hessian H = I (x) X^T X, so along each direction d (unit norm)
    L(W + t d) = L(W) + t <G, d> + t^2/2 ||X d^T||^2 exactly, and phi (eq. 4) is the mean of that
    over the pairs (t_i, d_i). Averaged over sphere directions, E[d^T H d] = tr(H) / n,
    tr(H) = n_out ||X||^2: phi = L + t^2 tr(H) / (2n) in expectation (the linear term averages out)."""
    W, X, Y = _linear_problem()
    K, n_out, n_in = W.shape
    ts = torch.linspace(0.1, 2.0, 8, dtype=torch.float64)
    D = random_directions([W], 8, "sphere", torch.Generator().manual_seed(1))[0]  # (8, n_out, n_in)
    ident = Activation(1.0)  # unused by a one-layer model
    got = sharpness([W], X, Y, ident, ts, [D], loss="mse")
    L = 0.5 * (Y - X @ W.mT).pow(2).sum((1, 2))  # (K,)
    G = (X @ W.mT - Y).mT @ X  # (K, n_out, n_in)
    lin = torch.einsum("koi,noi->nk", G, D)  # <G, d_i> per direction and model
    quad = (X @ D.mT).pow(2).sum((1, 2))  # d_i^T H d_i, (n,)
    want = (L + ts.view(-1, 1) * lin + ts.view(-1, 1) ** 2 / 2 * quad.view(-1, 1)).mean(0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got - L).abs().min() > 1e-2  # the displacements do move the loss
    # the expectation over sphere directions: mean of d^T H d over many directions vs tr(H) / n
    many = random_directions([W], 4000, "sphere", torch.Generator().manual_seed(2))[0]
    q = (X @ many.mT).pow(2).sum((1, 2))
    trace_over_n = n_out * X.pow(2).sum() / (n_out * n_in)
    assert abs(q.mean() - trace_over_n) < 4 * q.std() / math.sqrt(len(q))


def test_sharpness_of_a_two_layer_linear_network_equals_the_plain_computation():
    """phi through the shared-first-layer path (shared X and directions, more than one layer)
    against L(W + t d) computed with plain matmuls per direction and model; with directions only
    in the first layer the loss is quadratic in t: L + t <G_1, d_1> + t^2/2 ||X d_1^T W_2^T||^2."""
    W1, X, _ = _linear_problem(n_out=4)
    g = torch.Generator().manual_seed(5)
    W2, Y = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 3, 4), (9, 3)))
    ident = Activation(1.0)  # LeakyReLU with slope 1: the identity, so the network is linear
    ts = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)
    D = random_directions([W1, W2], 3, "sphere", torch.Generator().manual_seed(1))
    got = sharpness([W1, W2], X, Y, ident, ts, D, loss="mse")
    plain = torch.stack([torch.stack([0.5 * (Y - X @ (W1[k] + t * D[0][i]).T @ (W2[k] + t * D[1][i]).T).pow(2).sum()
                                      for k in range(2)]) for i, t in enumerate(ts)]).mean(0)
    torch.testing.assert_close(got, plain, rtol=1e-12, atol=1e-12)
    first = [D[0], torch.zeros_like(D[1])]
    got = sharpness([W1, W2], X, Y, ident, ts, first, loss="mse")
    R = X @ W1.mT @ W2.mT - Y  # (K, B, 3)
    L = 0.5 * R.pow(2).sum((1, 2))
    G1 = (R @ W2).mT @ X  # dL/dW1, (K, 4, n_in)
    lin = torch.einsum("koi,noi->nk", G1, D[0])
    quad = torch.einsum("bi,noi,kpo->nkbp", X, D[0], W2).pow(2).sum((2, 3))  # ||X d^T W2^T||^2, (n, K)
    want = (L + ts.view(-1, 1) * lin + ts.view(-1, 1) ** 2 / 2 * quad).mean(0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sharpness_at_zero_displacement_is_the_loss_and_grows_with_t(leaky):
    W = make_weights([8, 6, 4], K=2)
    X, Y = make_batch(30, 8, 4)
    D = random_directions(W, 5, "sphere", torch.Generator().manual_seed(0))
    assert torch.allclose(sharpness(W, X, Y, leaky, [0.0] * 5, D), loss_fn(W, X, Y, leaky))
    small = sharpness(W, X, Y, leaky, [0.01] * 5, D)
    large = sharpness(W, X, Y, leaky, [3.0] * 5, D)
    assert (large > small).all()


def test_grad_norm_matches_autograd_and_weighted_norm(leaky):
    W = [w.requires_grad_() for w in make_weights([8, 6, 4], K=2)]
    X, Y = make_batch(30, 8, 4)
    g = torch.autograd.grad(loss_fn(W, X, Y, leaky).sum(), W)
    ref = sum(x.pow(2).flatten(1).sum(1) for x in g)
    assert torch.allclose(grad_norm_sq(W, X, Y, leaky), ref)
    A = [torch.full_like(w, 4.0) for w in W]
    assert torch.allclose(grad_norm_sq(W, X, Y, leaky, precond=A), 4 * ref)


@pytest.mark.parametrize("per_model", [False, True])
def test_random_directions_have_unit_norm_per_model(per_model):
    from lib.metrics import random_directions
    W = make_weights([6, 4, 3], K=3)
    D = random_directions(W, 5, "sphere", torch.Generator().manual_seed(0), per_model=per_model)
    dims = (-2, -1)
    sq = sum(d.pow(2).sum(dims) for d in D)
    assert sq.shape == ((5, 3) if per_model else (5,))
    torch.testing.assert_close(sq, torch.ones_like(sq))
