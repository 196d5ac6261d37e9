"""Control arms as data, and the hook that carries them out during training.

An experiment compares arms that all start from the same seeds (trained together up to the
teleport moments, or initialised identically) and differ only in what happens at the teleport
moments: an optimised teleport, a random group element of the same size as a teleport arm's
(`random`), a random weight perturbation with the same loss drift (`perturb`), nothing but the
optimizer-state strategy (reset-only), or nothing at all (the baseline). `ArmHook` runs the arms
of one batched model: several arms side by side (weights arm-major, (n_arms * K, out, in)) or one
arm per model, with the arms it matches given from an earlier run (`matched`).
"""
from dataclasses import dataclass, field

import numpy as np
import torch

from lib.config import UsageError, check_choice
from lib.metrics import random_directions
from lib.models import evaluate, loss_fn
from lib.optim import apply_strategy, check_strategy, first_moments, make_optimizer
from lib.teleport import random_teleport, teleport

MOVES = ("none", "teleport", "random", "perturb")


@dataclass(frozen=True)
class Arm:
    """One arm. move: 'none', 'teleport' (lib.teleport.teleport with the kwargs `teleport`:
    objective, action, steps, lr, maximize, stop_above, loss), 'random' (a random element of
    `teleport['action']` with the algebra norms of arm `match`'s teleport at the same moment) or
    'perturb' (W + r u, u a random unit direction, r such that the loss drift equals the
    magnitude of the median drift of arm `match`). state: the optimizer-state strategy after each
    moment ('reset', 'keep', 'transport'); None: the arm does nothing at the moments (baseline).
    seed: seed of the arm's random directions (None: the moments' seed + 1). guard: undo a model's
    teleport whose loss on the teleport batch moves by more than this (relative), whose objective
    or weights turn non-finite, or whose linear algebra fails."""
    name: str
    move: str = "none"
    state: str | None = None
    match: str | None = None
    teleport: dict = field(default_factory=dict, compare=False)
    seed: int | None = None
    guard: float | None = None

    def __post_init__(self):
        check_choice("arm move", self.move, MOVES)
        if self.state is not None:
            check_strategy(self.state)
        if self.move != "none" and self.state is None:
            raise UsageError(f"arm {self.name!r}: a move needs an optimizer-state strategy")
        if self.move in ("random", "perturb") and self.match is None:
            raise UsageError(f"arm {self.name!r}: a {self.move} move matches a teleport arm (match=...)")


@dataclass(frozen=True)
class Moments:
    """When the arms act: before each of the first `n_batches` mini-batches of every epoch in
    `epochs` (0-based epochs of the fit that runs the hook), on `batch_size` fresh random training
    images (and a second such batch for the held-out drift), drawn from a generator seeded with
    `seed`, identically for every arm."""
    epochs: tuple
    n_batches: int
    batch_size: int
    seed: int


def branch(W, opt, n_arms, optimizer, lr):
    """Copy K trained models and their optimizer state into n_arms * K models, arm-major."""
    W2 = [w.detach().repeat(n_arms, 1, 1).requires_grad_() for w in W]
    opt2 = make_optimizer(optimizer, W2, lr)
    for p, p2 in zip(W, W2):
        for k, v in opt.state.get(p, {}).items():
            opt2.state[p2][k] = v.repeat(n_arms, 1, 1).clone() if v.dim() == 3 else v.clone()
    return W2, opt2


def matched_perturbation(W, X, Y, act, target, generator, iters=40):
    """W + r u per model, u a random unit direction over all weights (Gaussian), r >= 0 by
    bisection so that the loss drift L(W + r u; X) - L(W; X) equals `target` (K,).
    Returns (new W, record with target, drift, norm)."""
    u = [d[0] for d in random_directions(W, 1, "sphere", generator, per_model=True)]
    target = torch.as_tensor(target, dtype=W[0].dtype, device=W[0].device)
    with torch.no_grad():
        base = loss_fn(W, X, Y, act)
        move = lambda r: [w + r.view(-1, 1, 1) * d for w, d in zip(W, u)]  # noqa: E731
        drift = lambda r: loss_fn(move(r), X, Y, act) - base  # noqa: E731
        lo, hi = torch.zeros_like(target), torch.full_like(target, 1e-2)
        for _ in range(40):  # grow the bracket until the drift reaches the target
            hi = torch.where(drift(hi) < target, 2 * hi, hi)
        for _ in range(iters):
            mid = (lo + hi) / 2
            below = drift(mid) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        r = (lo + hi) / 2
        return move(r), {"target": target.tolist(), "drift": drift(r).tolist(), "norm": r.tolist()}


def failed_models(arm, new, rec):
    """(K,) bool: the models whose move the arm's guard undoes."""
    bad = ~torch.stack([w.detach().flatten(1).isfinite().all(1) for w in new]).all(0)
    if "error" in rec:
        return torch.ones_like(bad)
    if "objective_after" in rec:
        lb, la = torch.tensor(rec["loss_before"]), torch.tensor(rec["loss_after"])
        ok = torch.tensor(rec["objective_after"]).isfinite() & ((la - lb).abs() <= arm.guard * lb)
        bad |= ~ok.to(bad.device)
    return bad


class ArmHook:
    """hook(epoch, i) for lib.train.fit: at every moment, each arm moves its models, then treats
    its optimizer state. Teleport arms go first, so that the arms matching them see this
    moment's teleport. `matched` = {arm name: records} of arms run in an earlier batched model.
    test_drift: record each arm's test loss just before and after the move. after(W): called
    after the last moment (e.g. to measure the landscape there); its value lands in `.after`.
    `records` = {arm name: [one record per moment]}."""

    def __init__(self, W, opt, data, act, arms, moments, matched=None, test_drift=False, after=None):
        self.W, self.opt, self.data, self.act, self.arms, self.moments = W, opt, data, act, list(arms), moments
        self.K = W[0].shape[0] // len(self.arms)
        self.records = {a.name: [] for a in self.arms}
        self.matched = {**(matched or {}), **self.records}
        self.gen = torch.Generator().manual_seed(moments.seed)
        self.dir_gens = {a.name: torch.Generator().manual_seed(moments.seed + 1 if a.seed is None else a.seed)
                         for a in self.arms}
        self.test_drift, self.after_fn, self.after = test_drift, after, None
        self.last = (max(moments.epochs), moments.n_batches - 1) if moments.epochs else None

    def state_dict(self):
        """Records and generator states, for a checkpoint (lib.progress)."""
        return {"records": self.records, "gen": self.gen.get_state(), "after": self.after,
                "dir_gens": {k: g.get_state() for k, g in self.dir_gens.items()}}

    def load_state_dict(self, state):
        for name, recs in state["records"].items():
            self.records[name][:] = recs
        self.gen.set_state(state["gen"])
        for k, g in self.dir_gens.items():
            g.set_state(state["dir_gens"][k])
        self.after = state["after"]

    def models(self, arm):
        """The slice of the model dimension that holds `arm`'s K models."""
        a = self.arms.index(arm)
        return slice(a * self.K, (a + 1) * self.K)

    def active_batches(self, epoch):
        """How many leading batches of `epoch` this hook acts before (lib.train.fit calls it only there)."""
        return self.moments.n_batches if epoch in self.moments.epochs else 0

    def __call__(self, epoch, i):
        if epoch not in self.moments.epochs or i >= self.moments.n_batches:
            return
        n, size = self.data.x_train.shape[0], self.moments.batch_size
        idx = torch.randperm(n, generator=self.gen)[:2 * size].to(self.W[0].device)
        X, Y = self.data.x_train[idx[:size]], self.data.y_train[idx[:size]]
        held = (self.data.x_train[idx[size:]], self.data.y_train[idx[size:]]) if n > size else None
        for arm in sorted(self.arms, key=lambda a: a.move != "teleport"):
            if arm.state is not None:
                self.records[arm.name].append({"epoch": epoch, "batch": i, **self.act_arm(arm, X, Y, held)})
        if (epoch, i) == self.last and self.after_fn is not None:
            self.after = self.after_fn(self.W)

    def _test_loss(self, Ws):
        return evaluate(Ws, self.data.x_test, self.data.y_test, self.act)[0].tolist()

    def act_arm(self, arm, X, Y, held):
        """One arm's move on batch (X, Y) and its state strategy; returns the move's record."""
        sl, whole = self.models(arm), len(self.arms) == 1
        Ws = [w.detach()[sl] for w in self.W]
        bufs = first_moments(self.opt, self.W) if arm.state == "transport" else [None]
        tangents = [[b[sl] for b in bufs]] if all(b is not None for b in bufs) else None
        rec = {"test_loss_before": self._test_loss(Ws)} if self.test_drift else {}
        n = len(self.records[arm.name])
        try:
            if arm.move == "teleport":
                new, r, tangents = teleport(Ws, X, Y, self.act, heldout=held, tangents=tangents, **arm.teleport)
            elif arm.move == "random":
                norms = torch.as_tensor(self.matched[arm.match][n]["algebra_norm"])
                new, r, tangents = random_teleport(Ws, X, Y, self.act, arm.teleport["action"], norms,
                                                   self.dir_gens[arm.name], heldout=held, tangents=tangents,
                                                   loss=arm.teleport.get("loss", "ce"))
            elif arm.move == "perturb":
                m = self.matched[arm.match][n]
                drift = float(np.median(np.subtract(m["loss_after"], m["loss_before"])))
                new, r = matched_perturbation(Ws, X, Y, self.act, [abs(drift)] * self.K, self.dir_gens[arm.name])
                r["matched_median_drift"] = drift
            else:
                new, r = Ws, {}
        except torch.linalg.LinAlgError as e:
            if arm.guard is None:
                raise
            new, r, tangents = Ws, {"error": str(e).splitlines()[0]}, None
        if arm.guard is not None and arm.move != "none":
            bad = failed_models(arm, new, r)
            keep = lambda old, nw: torch.where(bad.view(-1, *[1] * (nw.dim() - 1)), old, nw)  # noqa: E731
            new = [keep(w0, w1) for w0, w1 in zip(Ws, new)]
            if tangents:
                tangents = [[keep(b[sl], t) for b, t in zip(bufs, tangents[0])]]
            r["failed"] = bad.tolist()
            if "loss_before" not in r:  # the move failed as a whole: no drift, for the arms matching it
                with torch.no_grad():
                    r["loss_before"] = r["loss_after"] = loss_fn(Ws, X, Y, self.act).tolist()
        with torch.no_grad():
            for w, v in zip(self.W, new):
                w[sl] = v
        apply_strategy(self.opt, self.W, arm.state, tangents[0] if tangents else None, None if whole else sl)
        if self.test_drift:
            r["test_loss_after"] = self._test_loss([w.detach()[sl] for w in self.W])
        return {**rec, **r}
