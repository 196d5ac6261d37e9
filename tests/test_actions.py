"""Group actions preserve the loss in their exact regimes; identity and composition behave."""
import pytest
import torch

from conftest import make_batch, make_weights
from lib.actions import GLAction, RescaleAction, make_action, random_algebra, zero_algebra
from lib.config import UsageError
from lib.models import Activation, forward, loss_fn


def _random_T(action, W, scale, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(s, generator=gen, dtype=W[0].dtype) for s in action.algebra_shapes(W)]


@pytest.mark.parametrize("group", ["first_order", "exp"])
def test_gl46_preserves_outputs_when_batch_le_hidden(leaky, group):
    # every width >= batch: sigma(g V h) has full column rank (a 5-wide input would make
    # sigma(g V h) rank-deficient for some g, since V h then has rank 5 < 8)
    W = make_weights([10, 12, 9, 3], K=3)
    X, Y = make_batch(8, 10, 3)
    act = GLAction(46, group)
    W2 = act(W, _random_T(act, W, 0.3), X, leaky)
    assert torch.allclose(forward(W2, X, leaky), forward(W, X, leaky), rtol=1e-8, atol=1e-9)
    assert max((a - b).abs().max() for a, b in zip(W, W2)) > 1e-2  # the weights did move


@pytest.mark.parametrize("group", ["first_order", "exp"])
def test_gl54_preserves_outputs_when_batch_le_input_width(leaky, group):
    W = make_weights([10, 9, 8, 3], K=2)
    X, _ = make_batch(6, 10, 3)
    act = GLAction(54, group)
    W2 = act(W, _random_T(act, W, 0.2), X, leaky)
    assert torch.allclose(forward(W2, X, leaky), forward(W, X, leaky), rtol=1e-8, atol=1e-9)
    assert max((a - b).abs().max() for a, b in zip(W, W2)) > 1e-2


def test_gl46_drifts_outside_its_regime(leaky):
    # batch 50 > hidden width 6: the pseudo-inverse is only a least-squares fit, the loss moves
    W = make_weights([5, 6, 6, 3], K=1)
    X, Y = make_batch(50, 5, 3)
    act = GLAction(46)
    W2 = act(W, _random_T(act, W, 0.3), X, leaky)
    assert (loss_fn(W2, X, Y, leaky) - loss_fn(W, X, Y, leaky)).abs().item() > 1e-4


@pytest.mark.parametrize("eq,widths,B", [(46, [5, 6, 4, 3], 20), (54, [4, 6, 5, 3], 20)])
def test_identity_acts_as_identity(leaky, eq, widths, B):
    # eq. 46: sigma(Vh) has full row rank (batch >= width); eq. 54: h has full row rank
    W = make_weights(widths)
    X, _ = make_batch(B, widths[0], 3)
    for group in ("first_order", "exp"):
        act = GLAction(eq, group)
        W2 = act(W, zero_algebra(act, W, requires_grad=False), X, leaky)
        for a, b in zip(W, W2):
            assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("widths", [[7, 5, 4, 3], [20, 13, 11, 8, 2]])
def test_rescaling_exact_on_any_data(widths):
    relu, leaky = Activation(0.0), Activation(0.1)
    W = make_weights(widths, K=3, dtype=torch.float32)
    X, _ = make_batch(300, widths[0], widths[-1], dtype=torch.float32)
    act = RescaleAction()
    W2 = act(W, _random_T(act, W, 0.5))
    for a in (relu, leaky):
        ref = forward(W, X, a)
        assert ((forward(W2, X, a) - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_rescaling_composes_and_inverts():
    W = make_weights([6, 5, 4, 3], K=2)
    act = RescaleAction()
    a1, a2 = _random_T(act, W, 0.4, seed=1), _random_T(act, W, 0.4, seed=2)
    both = act(act(W, a2), a1)
    product = act(W, [x + y for x, y in zip(a1, a2)])  # diag(e^a1) diag(e^a2) = diag(e^(a1+a2))
    back = act(act(W, a1), [-x for x in a1])
    for w, b, p, r in zip(W, both, product, back):
        assert torch.allclose(b, p, atol=1e-12)
        assert torch.allclose(r, w, atol=1e-12)


def test_gl_action_inverse_gives_back_weights(leaky):
    # eq. 54 with square invertible data (learn-to-teleport's regime): g^{-1}.(g.w) = w
    W = make_weights([6, 6, 3], K=1)
    X, _ = make_batch(6, 6, 3)
    act = GLAction(54, "exp")
    T = _random_T(act, W, 0.2)
    back = act(act(W, T, X, leaky), [-t for t in T], X, leaky)
    for w, b in zip(W, back):
        assert torch.allclose(w, b, atol=1e-8)


def test_last_pair_only_changes_last_two_layers(leaky):
    W = make_weights([5, 12, 9, 3])
    X, _ = make_batch(8, 5, 3)
    act = GLAction(46, pairs=(-1,))
    W2 = act(W, _random_T(act, W, 0.3), X, leaky)
    assert torch.equal(W2[0], W[0]) and not torch.allclose(W2[1], W[1])


def test_random_algebra_has_requested_norms():
    W = make_weights([6, 5, 4, 3], K=3)
    norms = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], dtype=torch.float64)
    for act in (GLAction(46), RescaleAction()):
        Ts = random_algebra(act, W, norms, torch.Generator().manual_seed(0))
        got = torch.stack([T.flatten(1).norm(dim=1) for T in Ts], 1)
        assert torch.allclose(got, norms)


def test_unknown_action_names():
    with pytest.raises(UsageError, match="known: gl46, gl54, rescale"):
        make_action("gl47")
    with pytest.raises(UsageError, match="first_order, exp"):
        make_action("gl46", group="cayley")
    with pytest.raises(UsageError, match="invertible"):
        Activation(0.0).inverse(torch.ones(1))


# --- all pairs at once vs one pair after another (the claims of lib/actions.py's docstring) ---
def _eq54_pair(W, m, T, X, act):
    """Eq. (54) on pair m alone, written out here: V <- sigma^{-1}(g sigma(V h)) h^+, U <- U g^{-1},
    g = I + T, h = h_m of the weights W as they are."""
    h = X.mT.expand(W[0].shape[0], -1, -1)
    for w in W[:m]:
        h = act(w @ h)
    g = torch.eye(T.shape[-1], dtype=T.dtype) + T
    new = list(W)
    new[m] = act.inverse(g @ act(W[m] @ h)) @ torch.linalg.pinv(h)
    new[m + 1] = W[m + 1] @ torch.linalg.inv(g)
    return new


def _one_after_another(eq, W, Ts, X, act, order):
    for m in order:
        W = _eq54_pair(W, m, Ts[m], X, act) if eq == 54 else GLAction(46, pairs=[m])(W, [Ts[m]], X, act)
    return W


def _rel(a, b):
    return [((x - y).norm() / y.norm()).item() for x, y in zip(a, b)]


WIDE = [20, 30, 25, 22, 15, 1]  # every width >= the batch of 12


@pytest.mark.parametrize("eq", [46, 54])
@pytest.mark.parametrize("B", [12, 40])  # 40: neither action is exact
def test_all_pairs_at_once_is_the_pairs_from_last_to_first(leaky, eq, B):
    W = make_weights(WIDE, K=2)
    X, _ = make_batch(B, WIDE[0], 2)
    X = X - 0.5
    act = GLAction(eq)
    Ts = _random_T(act, W, 0.05)
    at_once = act(W, Ts, X, leaky)
    backward = _one_after_another(eq, W, Ts, X, leaky, reversed(range(len(W) - 1)))
    assert max(_rel(at_once, backward)) < 1e-10
    assert min(_rel(at_once, W)[:-1]) > 1e-2  # every acted layer moved


def test_eq46_at_once_equals_first_to_last_where_exact(leaky):
    W = make_weights(WIDE, K=2)
    X, _ = make_batch(12, WIDE[0], 2)
    act = GLAction(46)
    Ts = _random_T(act, W, 0.05)
    forward_order = _one_after_another(46, W, Ts, X, leaky, range(len(W) - 1))
    assert max(_rel(act(W, Ts, X, leaky), forward_order)) < 1e-8
    X, _ = make_batch(40, WIDE[0], 2)  # not exact: the orders differ
    assert max(_rel(act(W, Ts, X, leaky), _one_after_another(46, W, Ts, X, leaky, range(len(W) - 1)))) > 1e-4


def test_eq54_at_once_differs_from_first_to_last_but_both_keep_the_batch_loss(leaky):
    W = make_weights(WIDE, K=2)
    X, _ = make_batch(12, WIDE[0], 2)
    X = X - 0.5
    Y = torch.randn(12, 1, dtype=X.dtype, generator=torch.Generator().manual_seed(3))
    act = GLAction(54)
    Ts = _random_T(act, W, 0.05)
    at_once = act(W, Ts, X, leaky)
    forward_order = _one_after_another(54, W, Ts, X, leaky, range(len(W) - 1))
    rel = _rel(at_once, forward_order)
    # the first layer and the last are the same either way; the hidden ones are not
    assert rel[0] < 1e-10 and rel[-1] < 1e-10 and min(rel[1:-1]) > 1e-2
    for V in (at_once, forward_order):  # both preserve the outputs (and so the loss) on the batch
        torch.testing.assert_close(forward(V, X, leaky), forward(W, X, leaky), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(loss_fn(V, X, Y, leaky, "mse"), loss_fn(W, X, Y, leaky, "mse"),
                                   rtol=1e-9, atol=0)
    # off the batch's span the two networks differ
    Xo, _ = make_batch(50, WIDE[0], 2, seed=9)
    out_a, out_f = forward(at_once, Xo - 0.5, leaky), forward(forward_order, Xo - 0.5, leaky)
    assert ((out_a - out_f).norm() / out_f.norm()).item() > 1e-2


@pytest.mark.parametrize("eq", [46, 54])
def test_hidden_layers_after_an_exact_action(leaky, eq):
    # h'_{m+1} = sigma(g_m z_m) (eq. 46), g_m h_{m+1} (eq. 54), on the batch
    from lib.models import hidden_columns
    W = make_weights(WIDE, K=2)
    X, _ = make_batch(12, WIDE[0], 2)
    X = X - 0.5
    act = GLAction(eq)
    Ts = _random_T(act, W, 0.05)
    hs, hs_new = hidden_columns(W, X, leaky), hidden_columns(act(W, Ts, X, leaky), X, leaky)
    for m, T in enumerate(Ts):
        g = torch.eye(T.shape[-1], dtype=T.dtype) + T
        want = leaky(g @ W[m] @ hs[m]) if eq == 46 else g @ hs[m + 1]
        torch.testing.assert_close(hs_new[m + 1], want, rtol=1e-8, atol=1e-10)
