"""psi's two conventions (lib.metrics.curve_derivatives): with one layer pair they
agree; with several, gamma' agrees and gamma'' differs by exactly the cross term 2A'B' that the
authors' pair-by-pair sum drops: -2 V'_m M_{m-1} on every hidden layer that is the V of pair m and
the U of pair m-1, V'_m from the closed form of eq. (57); float64. The batched closed forms
Table 1 uses (curvatures_eq54, sharpness_draws) equal the autodiff and per-draw references."""
import pytest
import torch

from lib.actions import GLAction
from lib.config import UsageError
from lib.metrics import (curvature, curvatures_eq54, curve_derivatives, curve_derivatives_closed_form, psi,
                         random_directions, sharpness, sharpness_draws)
from lib.models import Activation, hidden_columns, init_mlp, loss_fn

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


@pytest.mark.parametrize("widths,batch", [([12, 7, 5, 3], 9), ([12, 7, 5, 4, 3], 30), ([12, 7, 3], 9)])
def test_batched_closed_form_equals_autodiff_under_both_conventions(widths, batch):
    # lib.metrics.curvatures_eq54 (closed forms of eqs. 57/60, layer 0 through X's SVD, G draws
    # at once) against nested forward-mode autodiff of the action, draw by draw; batch 30 > d_0:
    # h_0 = X^T has rank d_0 < batch and pinv's cut-off matters
    W = init_mlp(widths, [1, 2, 3], dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    X = torch.rand(2, batch, widths[0], generator=gen, dtype=torch.float64)
    Ms = [torch.rand(2, n, n, generator=gen, dtype=torch.float64) for n in widths[1:-1]]
    exact, authors = curvatures_eq54(W, X, ACT, Ms)
    assert exact.shape == authors.shape == (2, 3)
    for g in range(2):
        Mg = [M[g] for M in Ms]
        torch.testing.assert_close(exact[g], curvature(W, X[g], ACT, Mg), rtol=1e-10, atol=0)
        torch.testing.assert_close(authors[g], curvature(W, X[g], ACT, Mg, convention="authors"), rtol=1e-10, atol=0)
    assert torch.equal(exact, authors) == (len(widths) == 3)  # one pair: no cross term


@pytest.mark.parametrize("widths", [[12, 7, 5, 3], [12, 7, 3]])
def test_batched_sharpness_equals_the_per_draw_one(widths):
    # lib.metrics.sharpness_draws (G draws at once, column form, one-hot cross-entropy) against
    # lib.metrics.sharpness draw by draw; and L(w) against the plain loss
    W = init_mlp(widths, [1, 2, 3], dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    X = torch.rand(2, 9, widths[0], generator=gen, dtype=torch.float64)
    Y = torch.randint(widths[-1], (2, 9), generator=gen)
    ts = [0.1, 0.5, 2.0]
    per = [random_directions(W, 3, "sphere", gen) for _ in range(2)]
    dirs = [torch.stack([per[g][j] for g in range(2)]) for j in range(len(W))]
    phi, loss = sharpness_draws(W, X, Y, ACT, ts, dirs)
    for g in range(2):
        torch.testing.assert_close(phi[g], sharpness(W, X[g], Y[g], ACT, ts, per[g]), rtol=1e-12, atol=0)
        torch.testing.assert_close(loss[g], loss_fn(W, X[g], Y[g], ACT), rtol=1e-12, atol=0)
    assert phi.shape == (2, 3) and not torch.allclose(phi[0], phi[1])
