"""The training engine with teleport hooks."""
import pytest
import torch

from lib.actions import GLAction
from lib.data import synthetic
from lib.models import Activation
from lib.teleport import make_objective
from lib.train import TeleportHook, fit, make_model

ACT = Activation(0.1)


def _run(mode, epochs_at=(1,), norms=None, optimizer="adagrad"):
    data = synthetic("MNIST", 120, 60, seed=0)
    W, opt = make_model([784, 16, 10, 10], [54321, 108642], optimizer, 1e-2)
    hook = TeleportHook(W, opt, data, ACT, epochs_at, 2, 40, torch.Generator().manual_seed(7), mode=mode,
                        random_norms=norms, objective=make_objective("grad_norm", ACT), action=GLAction(46),
                        steps=3, lr=0.01, stop_above=100.0)
    hist = fit(W, opt, data, ACT, 2, 20, hook=hook, progress=False)
    return W, hist, hook.records


def test_reset_only_without_moments_is_bitwise_the_baseline():
    W0, h0, _ = _run("reset-only", epochs_at=())
    data = synthetic("MNIST", 120, 60, seed=0)
    W1, opt = make_model([784, 16, 10, 10], [54321, 108642], "adagrad", 1e-2)
    h1 = fit(W1, opt, data, ACT, 2, 20, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(W0, W1))
    assert h0["train_loss"] == h1["train_loss"] and h0["test_loss"] == h1["test_loss"]


def test_teleport_hook_raises_grad_norm_and_random_matches_its_norms():
    _, hist, recs = _run("teleport")
    assert len(recs) == 2 and len(hist["test_loss"]) == 2 and len(hist["time_s"]) == 2
    for r in recs:
        assert all(a > b for a, b in zip(r["objective_after"], r["objective_before"]))
        assert "heldout_loss_after" in r
    norms = [torch.tensor(r["algebra_norm"]) for r in recs]
    _, _, rand = _run("random", norms=norms)
    assert [r["algebra_norm"] for r in rand] == [r["algebra_norm"] for r in recs]
    # same teleport batches in both arms: the loss before the first teleport is identical
    assert rand[0]["loss_before"] == recs[0]["loss_before"]


@pytest.mark.slow
def test_compiled_epoch_equals_eager_epoch():
    """torch.compile of the training step (about 20 s to compile) gives the same training."""
    from lib.data import synthetic
    from lib.models import Activation
    from lib.train import make_model, train_epoch
    data = synthetic("MNIST", 200, 10)
    act = Activation(0.1)
    runs = []
    for compile in (False, True):
        W, opt = make_model([784, 16, 10, 10], [1, 2, 3], "adagrad", 1e-2)
        loss = train_epoch(W, opt, data.x_train, data.y_train, act, 20, compile=compile)
        runs.append((loss, [w.detach() for w in W]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
