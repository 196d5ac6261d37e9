"""psi's two conventions (lib.metrics.curve_derivatives, issue 18): with one layer pair they
agree; with several, gamma' agrees and gamma'' differs by exactly the cross term 2A'B' that the
authors' pair-by-pair sum drops: -2 V'_m M_{m-1} on every hidden layer that is the V of pair m and
the U of pair m-1, V'_m from the closed form of eq. (57); float64."""
import pytest
import torch

from lib.actions import GLAction
from lib.config import UsageError
from lib.metrics import curvature, curve_derivatives, curve_derivatives_closed_form, psi
from lib.models import Activation, hidden_columns, init_mlp

ACT = Activation(0.1)


def setup(widths, seed=0, batch=7):
    W = init_mlp(widths, [seed + 1, seed + 2], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(batch, widths[0], generator=gen, dtype=torch.float64)
    Ms = [torch.randn(n, n, generator=gen, dtype=torch.float64) for n in widths[1:-1]]
    return W, X, [M / M.norm() for M in Ms]


def test_one_pair_the_two_conventions_agree():
    W, X, Ms = setup([6, 5, 3])
    e1, e2 = curve_derivatives(W, X, ACT, Ms)
    a1, a2 = curve_derivatives(W, X, ACT, Ms, convention="authors")
    assert all(torch.allclose(a, b, atol=1e-13) for a, b in zip(e1 + e2, a1 + a2))
    assert torch.allclose(curvature(W, X, ACT, Ms), curvature(W, X, ACT, Ms, convention="authors"), rtol=1e-12)


@pytest.mark.parametrize("widths", [[6, 5, 4, 3], [9, 6, 5, 4, 3]])
def test_several_pairs_differ_by_exactly_the_cross_term(widths):
    W, X, Ms = setup(widths, seed=3)
    e1, e2 = curve_derivatives(W, X, ACT, Ms)
    a1, a2 = curve_derivatives(W, X, ACT, Ms, convention="authors")
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-13) for a, b in zip(e1, a1))  # gamma' the same
    hs = hidden_columns(W, X, ACT)
    for m in range(len(W)):
        if 1 <= m <= len(W) - 2:  # V of pair m (eq. 57 closed form) and U of pair m - 1
            (v1, _), _ = curve_derivatives_closed_form(W[m + 1], W[m], hs[m], ACT, Ms[m])
            cross = -2 * v1 @ Ms[m - 1]
            assert cross.abs().max() > 1e-3  # not a vanishing term
        else:
            cross = torch.zeros_like(W[m])
        torch.testing.assert_close(e2[m] - a2[m], cross, rtol=1e-10, atol=1e-12)
    pe = psi(W, X, ACT, [Ms])
    pa = psi(W, X, ACT, [Ms], convention="authors")
    assert not torch.allclose(pe, pa, rtol=1e-3)


def test_the_exact_convention_is_the_curve_itself():
    # gamma''(0) of the exact convention is the second difference of the actual curve exp(tM).w
    W, X, Ms = setup([6, 5, 4, 3], seed=5)
    action, h = GLAction(54, "exp"), 1e-3
    g = [action(W, [t * M.expand(2, -1, -1) for M in Ms], X, ACT) for t in (-h, 0.0, h)]
    _, e2 = curve_derivatives(W, X, ACT, Ms)
    _, a2 = curve_derivatives(W, X, ACT, Ms, convention="authors")
    for m in range(len(W)):
        fd = (g[2][m] - 2 * g[1][m] + g[0][m]) / h ** 2
        torch.testing.assert_close(e2[m], fd, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a2[1], (g[2][1] - 2 * g[1][1] + g[0][1]) / h ** 2, rtol=1e-2)


def test_unknown_convention_is_refused():
    W, X, Ms = setup([6, 5, 3])
    with pytest.raises(UsageError, match="unknown psi convention"):
        curve_derivatives(W, X, ACT, Ms, convention="paper")
