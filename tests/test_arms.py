"""Control arms as data (lib.arms): arms side by side in one batched model equal the same arms
run one per model; matched random and perturb moves; the guard; per-model optimizer resets."""
import pytest
import torch

from lib.actions import GLAction
from lib.arms import Arm, ArmHook, Moments, branch, matched_perturbation
from lib.config import UsageError
from lib.data import Data, synthetic
from lib.models import Activation, init_mlp, loss_fn
from lib.optim import make_optimizer, reset_state
from lib.teleport import make_objective
from lib.train import fit

ACT = Activation(0.1)
WIDTHS = [784, 12, 10, 10]
SEEDS = [3, 4]


def data64():
    d = synthetic("MNIST", 60, 20, seed=2)
    return Data(d.x_train.double(), d.y_train, d.x_test.double(), d.y_test)


def arms():
    tele = dict(objective=make_objective("grad_norm", ACT), action=GLAction(46), steps=2, lr=0.02)
    return [Arm("baseline"), Arm("teleport", "teleport", "reset", teleport=tele),
            Arm("teleport-keep", "teleport", "keep", teleport=tele),
            Arm("teleport-transport", "teleport", "transport", teleport=tele),
            Arm("reset-only", "none", "reset"),
            Arm("random", "random", "reset", match="teleport", teleport=tele),
            Arm("perturb", "perturb", "reset", match="teleport", seed=11)]


def model(n_arms=1, optimizer="momentum"):
    W = [w.requires_grad_() for w in init_mlp(WIDTHS, SEEDS * n_arms, dtype=torch.float64)]
    return W, make_optimizer(optimizer, W, 0.05)


MOMENTS = Moments((1,), 2, 20, 7)


def test_arms_in_one_batched_model_equal_one_arm_per_model():
    data, spec = data64(), arms()
    W, opt = model()
    fit(W, opt, data, ACT, 1, 20, progress=False)  # the seeds train together, then branch
    Wb, optb = branch(W, opt, len(spec), "momentum", 0.05)
    both = ArmHook(Wb, optb, data, ACT, spec, Moments((0,), 2, 20, 7))
    fit(Wb, optb, data, ACT, 1, 20, hook=both, progress=False)
    alone = {}
    for j, arm in enumerate(spec):
        Wa, opta = branch(W, opt, 1, "momentum", 0.05)
        hook = ArmHook(Wa, opta, data, ACT, [arm], Moments((0,), 2, 20, 7),
                       matched={"teleport": alone.get("teleport", (None, []))[1]})
        fit(Wa, opta, data, ACT, 1, 20, hook=hook, progress=False)
        alone[arm.name] = (Wa, hook.records[arm.name])
        for wb, wa in zip(Wb, Wa):
            torch.testing.assert_close(wb.detach()[j * 2:(j + 1) * 2], wa.detach(), rtol=1e-9, atol=1e-11)
    # every arm but the baseline acted twice; the arms really differ from the baseline and each other
    assert both.records["baseline"] == [] and all(len(both.records[a.name]) == 2 for a in spec[1:])
    finals = [Wb[0].detach()[j * 2:(j + 1) * 2] for j in range(len(spec))]
    assert all(not torch.allclose(finals[0], f) for f in finals[1:])
    assert not torch.allclose(finals[1], finals[2]) and not torch.allclose(finals[2], finals[3])


def test_random_arm_moves_by_the_norms_of_the_matched_teleport():
    """Teleport and random arms side by side in one batched model: at each moment the random arm's
    models move by a group element whose algebra norms, read back from their weights, are those the
    teleport arm recorded at the same moment (eq. 46, g = I + T: see test_teleport's
    _recovered_gl46_norms), on the same teleport batch."""
    from test_teleport import _recovered_gl46_norms
    data, spec = data64(), arms()
    W, opt = model(2)
    hook = ArmHook(W, opt, data, ACT, [spec[1], spec[5]], MOMENTS)
    gen = torch.Generator().manual_seed(MOMENTS.seed)
    for i in range(MOMENTS.n_batches):
        before = [w.detach()[2:].clone() for w in W]
        X = data.x_train[torch.randperm(len(data.y_train), generator=gen)[:MOMENTS.batch_size]]
        hook(1, i)
        t, r = hook.records["teleport"][i], hook.records["random"][i]
        norms = torch.tensor(t["algebra_norm"], dtype=torch.float64)
        assert norms.min() > 1e-4
        if i == 0:  # the same batch and, before any move, the same weights
            assert r["loss_before"] == t["loss_before"]
        got = _recovered_gl46_norms(before, [w.detach()[2:] for w in W], X, ACT)
        torch.testing.assert_close(got, norms, rtol=1e-6, atol=0)
        # the record holds the norms it was given (ArmHook reads them as float32: to 1e-7)
        torch.testing.assert_close(torch.tensor(r["algebra_norm"], dtype=torch.float64), norms, rtol=1e-6, atol=0)


def test_matched_perturbation_reaches_the_target_drift():
    data = data64()
    W, _ = model()
    X, Y = data.x_train[:30], data.y_train[:30]
    target = torch.tensor([0.01, 0.2], dtype=torch.float64)
    new, rec = matched_perturbation([w.detach() for w in W], X, Y, ACT, target, torch.Generator().manual_seed(1))
    drift = loss_fn(new, X, Y, ACT) - loss_fn([w.detach() for w in W], X, Y, ACT)
    torch.testing.assert_close(drift, target, rtol=1e-6, atol=1e-9)
    assert all(r > 0 for r in rec["norm"])


def test_guard_undoes_a_runaway_teleport_and_still_resets_the_state():
    data = data64()
    W, opt = model()
    fit(W, opt, data, ACT, 1, 20, progress=False)
    before = [w.detach().clone() for w in W]
    arm = Arm("wild", "teleport", "reset", guard=0.1,
              teleport=dict(objective=make_objective("grad_norm", ACT), action=GLAction(46), steps=5, lr=1e6))
    hook = ArmHook(W, opt, data, ACT, [arm], Moments((0,), 1, 30, 7), test_drift=True)
    hook(0, 0)
    rec = hook.records["wild"][0]
    assert rec["failed"] == [True, True]
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, W))
    assert rec["test_loss_before"] == pytest.approx(rec["test_loss_after"])
    assert all(not opt.state[p] for p in W)  # fresh state after the reset


def test_per_model_reset_equals_a_fresh_optimizer_and_adam_refuses():
    data = data64()
    X, Y = data.x_train[:20], data.y_train[:20]
    W, opt = model(1, "adagrad")
    W2, opt2 = model(1, "adagrad")
    for _ in range(3):  # some state in both, then reset model 1 only in one, all in the other
        for Ws, o in ((W, opt), (W2, opt2)):
            o.zero_grad()
            loss_fn(Ws, X, Y, ACT).sum().backward()
            o.step()
    reset_state(opt, slice(1, 2))
    reset_state(opt2)
    for Ws, o in ((W, opt), (W2, opt2)):
        o.zero_grad()
        loss_fn(Ws, X, Y, ACT).sum().backward()
        o.step()
    for a, b in zip(W, W2):
        torch.testing.assert_close(a.detach()[1], b.detach()[1])
        assert not torch.allclose(a.detach()[0], b.detach()[0])
    Wa, opta = model(1, "adam")
    opta.zero_grad()
    loss_fn(Wa, X, Y, ACT).sum().backward()
    opta.step()
    with pytest.raises(ValueError, match="step count"):
        reset_state(opta, slice(0, 1))


@pytest.mark.parametrize("kw,match", [(dict(move="random", state="reset"), "match"),
                                      (dict(move="teleport"), "strategy"),
                                      (dict(move="jump", state="reset"), "unknown arm move"),
                                      (dict(move="none", state="forget"), "unknown optimizer-state")])
def test_bad_arm_declarations_are_one_line_errors(kw, match):
    with pytest.raises(UsageError, match=match):
        Arm("x", **kw)


def test_a_failed_guarded_teleport_is_undone_and_its_perturb_control_matches_zero_drift():
    data = data64()
    W, opt = model(2)

    def broken(W, X, Y):
        raise torch.linalg.LinAlgError("pinv failed")
    tele = Arm("teleport", "teleport", "reset", guard=float("inf"),
               teleport=dict(objective=broken, action=GLAction(46), steps=1, lr=0.1))
    before = [w.detach().clone() for w in W]
    hook = ArmHook(W, opt, data, ACT, [tele, Arm("perturb", "perturb", "reset", match="teleport", seed=3)],
                   Moments((0,), 1, 20, 7))
    hook(0, 0)
    rec, pert = hook.records["teleport"][0], hook.records["perturb"][0]
    assert rec["failed"] == [True, True] and "pinv failed" in rec["error"]
    assert rec["loss_before"] == rec["loss_after"] and pert["matched_median_drift"] == 0.0
    assert all(torch.equal(a[:2], b.detach()[:2]) for a, b in zip(before, W))  # the teleport slice: unmoved
