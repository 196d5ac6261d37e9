"""Curvature, sharpness and gradient norms against known answers."""
import math

import pytest
import torch

from conftest import make_batch, make_weights
from lib.actions import GLAction
from lib.metrics import (curvature, curve_derivatives, curve_derivatives_closed_form, grad_norm_sq,
                         kappa, psi, random_directions, random_lie_elements, sharpness)
from lib.models import hidden_columns, loss_fn


@pytest.mark.parametrize("r", [0.1, 1.0, 7.5])
def test_kappa_of_circle_is_one_over_radius(r):
    t = torch.tensor([0.0, 0.4, 2.0], dtype=torch.float64)
    d1 = [torch.stack([-r * torch.sin(t), r * torch.cos(t)], 1)]
    d2 = [torch.stack([-r * torch.cos(t), -r * torch.sin(t)], 1)]
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


def test_sharpness_of_quadratic_matches_closed_form():
    # L(w) = 0.5 w^T H w on a linear "network" of one layer: phi = L(w) + t^2 tr(H) / (2 n) on average
    n, gen = 6, torch.Generator().manual_seed(0)
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    H = A @ A.T
    w = torch.randn(1, 1, n, generator=gen, dtype=torch.float64)
    L = lambda v: 0.5 * torch.einsum("...i,ij,...j->...", v, H, v)  # noqa: E731
    ts = torch.linspace(0.1, 1.0, 10, dtype=torch.float64)
    draws = 4000
    D = random_directions([w], draws * len(ts), "sphere", gen)[0]  # (draws*10, 1, n)
    phi = L(w + ts.repeat(draws).view(-1, 1, 1) * D).mean()
    expected = L(w).squeeze() + (ts ** 2).mean() * torch.trace(H) / (2 * n)
    se = L(w + ts.repeat(draws).view(-1, 1, 1) * D).std() / math.sqrt(draws * len(ts))
    assert abs(phi - expected) < 4 * se


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
