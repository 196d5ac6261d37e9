"""Group actions on the weights of an MLP that leave the loss unchanged (Section 4, App. B).

Layer pairs (U, V) = (W_{m+1}, W_m), m = 0..L-2 (0-based), with input h = h_m, the input of
layer m on the teleport batch (column form, `models.hidden_columns`). An action takes one
Lie-algebra element per acted pair (or per hidden layer for rescaling) and returns new weights.

All pairs are acted on at once, every formula reading the activations h_m of the *current*
weights. This is exactly (any batch; tested) the pairs applied one after another from the last
pair to the first: pair m's formulas read only W_0..W_m, which the pairs before it in that order
(m+1, ...) leave unchanged, and its change to W_{m+1} is a right factor on top of theirs.
From the first pair to the last, the result is the same for eq. (46) where eq. (46) is exact
(batch <= every hidden width), but not for eq. (54), even where it is exact (tested): there
pair m+1 reads h' = g_m h_{m+1} and sets
    W_{m+1} <- sigma^{-1}(g_{m+1} sigma(z_{m+1})) (g_m h_{m+1})^+,
where all at once gives sigma^{-1}(g_{m+1} sigma(z_{m+1})) h_{m+1}^+ g_m^{-1}. Where eq. (54) is
exact (batch <= every input width) both right factors are left inverses of g_m h_{m+1}: both
orders preserve the loss on the batch, and they differ on inputs off the batch's span (tested).
Where an action is exact, the new network's hidden layers on the batch are
h'_{m+1} = sigma(g_m z_m) (eq. 46) or g_m h_{m+1} (eq. 54), z_m = W_m h_m (tested).
The authors' code instead updates its cached activations to first order; we recompute them.
"""
import torch

from lib.config import UsageError


def group_element(T, group):
    """g from a Lie-algebra element T (K, n, n): 'first_order' g = I + T (the authors' code),
    'exp' g = exp(T) (matrix exponential). Returns (g, g^{-1}), the inverse exact."""
    if group == "exp":
        return torch.linalg.matrix_exp(T), torch.linalg.matrix_exp(-T)
    if group == "first_order":
        g = torch.eye(T.shape[-1], dtype=T.dtype, device=T.device) + T
        return g, torch.linalg.inv(g)
    raise UsageError(f"unknown group parametrisation {group!r}; known: first_order, exp")


class GLAction:
    """GL(h) action on every layer pair `pairs` (None = all; negative indices count from the end).

    eq=46 (eq. (46)): V <- g V,  U <- U sigma(V h) sigma(g V h)^+.
        Loss-preserving when sigma(g V h) has full column rank (batch <= hidden width);
        the identity acts as the identity when sigma(V h) has full row rank (batch >= width).
    eq=54 (eq. (54)): U <- U g^{-1},  V <- sigma^{-1}(g sigma(V h)) h^+.
        Loss-preserving when h^+ h = I (batch <= input width of V); needs an invertible sigma.
    """

    def __init__(self, eq=46, group="first_order", pairs=None):
        if eq not in (46, 54):
            raise UsageError(f"unknown GL action eq. ({eq}); known: 46, 54")
        group_element(torch.zeros(1, 1, 1), group)  # validates `group`
        self.eq, self.group, self.pairs = eq, group, pairs
        self.name = f"gl{eq}"

    def acted_pairs(self, W):
        n = len(W) - 1
        pairs = range(n) if self.pairs is None else self.pairs
        return sorted({p % n for p in pairs})

    def algebra_shapes(self, W):
        """Shapes of the Lie-algebra elements: (K, d_{m+1}, d_{m+1}) per acted pair m."""
        return [(W[m].shape[0], W[m].shape[1], W[m].shape[1]) for m in self.acted_pairs(W)]

    def __call__(self, W, Ts, X, act):
        """New weights g.W. W: list of (K, out, in); Ts: one (K, n, n) per acted pair; X: (B, d_0)."""
        from lib.models import hidden_columns
        hs = hidden_columns(W, X, act)
        new, right = list(W), [None] * len(W)
        for T, m in zip(Ts, self.acted_pairs(W)):
            g, g_inv = group_element(T, self.group)
            z = W[m] @ hs[m]
            if self.eq == 46:
                new[m] = g @ W[m]
                right[m + 1] = act(z) @ torch.linalg.pinv(act(g @ z))
            else:
                # h_0 = X^T is the same for every model: one pseudo-inverse, broadcast over K
                h = hs[m][:1] if m == 0 and X.dim() == 2 else hs[m]
                new[m] = act.inverse(g @ act(z)) @ torch.linalg.pinv(h)
                right[m + 1] = g_inv
        return [w if r is None else w @ r for w, r in zip(new, right)]


class RescaleAction:
    """Positive rescaling of every hidden neuron (positive homogeneity of (Leaky)ReLU):
    alpha = exp(a) > 0 per neuron of hidden layer m, W_m <- diag(alpha) W_m,
    W_{m+1} <- W_{m+1} diag(alpha)^{-1}. Exact on every input. Algebra: a (K, d_{m+1})."""
    name, group = "rescale", "exp"

    def __init__(self, pairs=None):
        self.pairs = pairs

    acted_pairs = GLAction.acted_pairs

    def algebra_shapes(self, W):
        return [(W[m].shape[0], W[m].shape[1]) for m in self.acted_pairs(W)]

    def __call__(self, W, As, X=None, act=None):
        new = list(W)
        for a, m in zip(As, self.acted_pairs(W)):
            new[m] = new[m] * a.exp().unsqueeze(-1)
            new[m + 1] = new[m + 1] * (-a).exp().unsqueeze(-2)
        return new


ACTIONS = {"gl46": lambda group, pairs: GLAction(46, group, pairs),
           "gl54": lambda group, pairs: GLAction(54, group, pairs),
           "rescale": lambda group, pairs: RescaleAction(pairs)}


def make_action(name, group="first_order", pairs=None):
    """Action by name: 'gl46' (eq. 46), 'gl54' (eq. 54) or 'rescale'."""
    if name not in ACTIONS:
        raise UsageError(f"unknown action {name!r}; known: {', '.join(ACTIONS)}")
    return ACTIONS[name](group, pairs)


def zero_algebra(action, W, requires_grad=True):
    """Lie-algebra elements at the identity, one per acted pair, for gradient ascent on them."""
    return [torch.zeros(s, dtype=W[0].dtype, device=W[0].device, requires_grad=requires_grad)
            for s in action.algebra_shapes(W)]


def random_algebra(action, W, norms, generator=None):
    """Random Lie-algebra elements with Gaussian directions and the given Frobenius norms,
    norms: (K, n_pairs) tensor, one norm per model and acted pair."""
    Ts = []
    for p, s in enumerate(action.algebra_shapes(W)):
        T = torch.randn(s, generator=generator, dtype=W[0].dtype).to(W[0].device)
        T = T / T.flatten(1).norm(dim=1).view(-1, *[1] * (len(s) - 1))
        Ts.append(T * norms[:, p].to(T).view(-1, *[1] * (len(s) - 1)))
    return Ts
