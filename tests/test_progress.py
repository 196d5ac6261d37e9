"""Resumable runs (lib.progress): a run stopped part-way and started again ends with the same
numbers as an uninterrupted one; other settings or a damaged checkpoint start afresh."""
import pytest
import torch

from lib.actions import GLAction
from lib.arms import Arm, ArmHook, Moments
from lib.data import synthetic
from lib.models import Activation
from lib.progress import Checkpoint, interrupt_message
from lib.teleport import make_objective
from lib.train import make_model

ACT = Activation(0.1)
DATA = synthetic("MNIST", 80, 30, seed=4)


class StopAt(ArmHook):
    """An ArmHook that raises KeyboardInterrupt before batch i of epoch e (once)."""
    stop = None

    def __call__(self, epoch, i):
        if (epoch, i) == self.stop:
            raise KeyboardInterrupt
        super().__call__(epoch, i)


def run(cfg, stop=None, optimizer="adam"):
    W, opt = make_model([784, 8, 10, 10], [1, 2], optimizer, 1e-3)
    arm = Arm("teleport", "teleport", "reset",
              teleport=dict(objective=make_objective("grad_norm", ACT), action=GLAction(46), steps=2, lr=1e-3))
    hook = StopAt(W, opt, DATA, ACT, [arm], Moments((1, 2), 2, 20, 5))
    hook.stop = stop
    ckpt = Checkpoint(cfg, "test")
    hist = ckpt.fit("teleport", W, opt, DATA, ACT, 4, 20, hook=hook, progress=False)
    return ckpt.finish_unit("teleport", {"hist": hist, "records": hook.records["teleport"]}), W


@pytest.mark.parametrize("stop", [(2, 1), (3, 0)])
def test_interrupted_run_resumes_to_the_same_numbers(tmp_path, stop):
    cfg = {"OUT_DIR": str(tmp_path), "CHECKPOINT_S": 0.0, "LR": 1e-3}
    whole, W0 = run({**cfg, "OUT_DIR": str(tmp_path / "whole")})
    with pytest.raises(KeyboardInterrupt):
        run(cfg, stop=stop)
    assert "epoch 2 of 4" in interrupt_message(["x.py"]) or "epoch 3 of 4" in interrupt_message(["x.py"])
    again, W1 = run(cfg)
    for a, b in zip(W0, W1):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    for k in ("train_loss", "test_loss"):
        torch.testing.assert_close(torch.tensor(again["hist"][k]), torch.tensor(whole["hist"][k]), rtol=1e-6, atol=0)
    assert len(again["records"]) == 4  # the teleports of epochs 1 and 2, none repeated
    assert [r["epoch"] for r in again["records"]] == [1, 1, 2, 2]


def test_other_settings_or_a_damaged_checkpoint_start_afresh(tmp_path, capsys):
    cfg = {"OUT_DIR": str(tmp_path), "CHECKPOINT_S": 0.0, "LR": 1e-3}
    with pytest.raises(KeyboardInterrupt):
        run(cfg, stop=(2, 0))
    ckpt = Checkpoint({**cfg, "LR": 2e-3}, "test")
    assert ckpt.current is None and "other settings" in capsys.readouterr().err
    assert Checkpoint({**cfg, "PROGRESS": False}, "test").current["unit"] == "teleport"  # plumbing only
    (tmp_path / ".progress" / "test.pt").write_bytes(b"garbage")
    assert Checkpoint(cfg, "test").current is None and "unreadable" in capsys.readouterr().err


def test_staged_outputs_replace_the_set_only_when_complete(tmp_path):
    from lib.io import save_json, staged
    save_json(tmp_path / "results" / "a.json", {"v": 1})
    with pytest.raises(KeyboardInterrupt), staged(tmp_path) as out:
        save_json(f"{out}/results/a.json", {"v": 2})
        raise KeyboardInterrupt
    assert (tmp_path / "results" / "a.json").read_text().count("1") == 1
    with staged(tmp_path) as out:
        save_json(f"{out}/results/a.json", {"v": 2})
        save_json(f"{out}/figures/b.json", {"v": 3})
    assert '"v": 2' in (tmp_path / "results" / "a.json").read_text() and (tmp_path / "figures" / "b.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "results"]


def test_results_of_other_settings_are_not_replaced(tmp_path):
    from lib.config import UsageError
    from lib.io import check_replace, save_json
    path = tmp_path / "r.json"
    save_json(path, {"config": {"CONTROLS": True, "EPOCHS": 40, "OUT_DIR": "."}})
    check_replace(path, {"CONTROLS": True, "EPOCHS": 40, "OUT_DIR": "/elsewhere"})  # plumbing differs only
    with pytest.raises(UsageError, match="CONTROLS=False"):
        check_replace(path, {"CONTROLS": False, "EPOCHS": 40})
    check_replace(path, {"CONTROLS": False, "EPOCHS": 40, "REPLACE": True})
    save_json(path, {"config": {"TS": (1.0, 0.5)}})
    check_replace(path, {"TS": (1.0, 0.5)})  # a tuple is saved as a list: the same setting
    (tmp_path / "file").write_text("")
    from lib.io import staged
    with pytest.raises(UsageError, match="cannot write"), staged(str(tmp_path / "file")):
        pass


def test_diverged_runs_are_found_and_left_out():
    from lib.report import diverged, finite_stats
    curves = [[1.0, 0.5, 0.4], [1.0, float("nan"), None], [1.0, 2e7, 3.0]]
    assert diverged(curves) == [None, 2, 2]
    assert finite_stats([0.4, float("nan"), 0.6]) == (0.5, pytest.approx(0.1), 2)
    assert finite_stats([0.4, 0.5, 0.6], keep=[True, False, False]) == (0.4, 0.0, 1)
