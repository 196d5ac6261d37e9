"""teleport_optimization.py: quick runs through the real loading code on tiny IDX files, the
control arms (issue 7), Figure 12, and one-line errors."""
import json
import os
import sys

import pytest
import torch

from lib.data import load, write_fake
from lib.train import make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import teleport_optimization as script  # noqa: E402


def _cfg(tmp_path, **kw):
    from lib.config import configure
    argv = [f"--data-dir={tmp_path / 'data'}", f"--out-dir={tmp_path / 'out'}", "--quick"]
    return configure(vars(script), argv + [f"--{k}={v}" for k, v in kw.items()], script._QUICK)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick --controls run of Figure 5 on tiny fake MNIST files, in process."""
    tmp = tmp_path_factory.mktemp("fig5")
    write_fake(tmp / "data", "MNIST", n_train=200, n_test=100, seed=0)
    cfg = _cfg(tmp, controls=True, optimizers_run="['adagrad','adam']")  # epoch-2 and epoch-0 teleports
    script.main(cfg)
    return tmp / "out", cfg


def test_quick_run_writes_figures_json_and_every_arm(quick_run):
    out, cfg = quick_run
    for opt in cfg["OPTIMIZERS_RUN"]:
        for kind in ("epoch", "time"):
            png = out / "figures" / "optimization" / f"MNIST_{opt}_loss_vs_{kind}.png"
            assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
        res = json.loads((out / "results" / "optimization" / f"MNIST_{opt}.json").read_text())
        assert res["config"]["EPOCHS"] == 3 and res["environment"]["torch"] == torch.__version__
        assert set(res["arms"]) == set(script._ARM_SPECS)
        for arm, h in res["arms"].items():
            assert len(h["train_loss"]) == 3 and len(h["test_loss"]) == 3 and len(h["time_s"]) == 3
            assert len(h["train_loss"][0]) == cfg["N_RUNS"]
            n_tele = 0 if arm == "baseline" else cfg["TELE_BATCHES"]
            assert len(h["teleports"]) == n_tele
            assert all(r["epoch"] == script.OPTIMIZER_SETTINGS[opt]["tele_epoch"] for r in h["teleports"])
    summ = json.loads((out / "results" / "optimization" / "MNIST_summary.json").read_text())
    assert set(summ["verdicts"]) == set(cfg["OPTIMIZERS_RUN"])
    assert "reset-only" in (out / "results" / "optimization" / "MNIST_summary.md").read_text()


def test_teleport_raises_grad_norm_and_random_arm_reuses_its_norms(quick_run):
    out, cfg = quick_run
    for opt in cfg["OPTIMIZERS_RUN"]:
        tele = json.loads((out / "results" / "optimization" / f"MNIST_{opt}.json").read_text())["arms"]["teleport"]
        after = torch.tensor([r["objective_after"] for r in tele["teleports"]])
        before = torch.tensor([r["objective_before"] for r in tele["teleports"]])
        assert after.mean() > before.mean() and "heldout_loss_after" in tele["teleports"][0]
        if opt == "adagrad":  # step size 1e-4: every single teleport climbs ||grad L||^2
            assert (after > before).all()
    res = json.loads((out / "results" / "optimization" / "MNIST_adam.json").read_text())["arms"]
    tele, rand = res["teleport"]["teleports"], res["random-teleport"]["teleports"]
    assert [r["algebra_norm"] for r in rand] == [r["algebra_norm"] for r in tele]
    # the teleport batch before the first teleport is the same images, same weights, in both arms
    assert rand[0]["loss_before"] == tele[0]["loss_before"]


def test_adagrad_arms_are_identical_before_the_teleport_epoch(quick_run):
    out, _ = quick_run
    res = json.loads((out / "results" / "optimization" / "MNIST_adagrad.json").read_text())["arms"]
    for arm, h in res.items():  # AdaGrad teleports before the 3rd epoch (0-based epoch 2)
        assert h["train_loss"][:2] == res["baseline"]["train_loss"][:2], arm
        if arm != "baseline":
            assert h["train_loss"][2] != res["baseline"]["train_loss"][2], arm


def test_plot_only_redraws_from_saved_results(quick_run, tmp_path):
    out, cfg = quick_run
    png = out / "figures" / "optimization" / "MNIST_adam_loss_vs_epoch.png"
    png.unlink()
    script.main({**cfg, "PLOT_ONLY": True, "OPTIMIZERS_RUN": ["adam"], "DATA_DIR": str(tmp_path / "nothing-here")})
    assert png.exists()


def _tiny(tmp_path):
    write_fake(tmp_path, "MNIST", n_train=120, n_test=40, seed=3)
    return load("MNIST", tmp_path, download=False)


def test_reset_only_without_reset_moments_is_bitwise_the_baseline(tmp_path):
    data = _tiny(tmp_path)
    cfg = {**_cfg(tmp_path), "N_RUNS": 2, "EPOCHS": 3}
    base = script.run_arm(cfg, data, "adam", "baseline")
    none = script.run_arm({**cfg, "TELE_BATCHES": 0}, data, "adam", "reset-only")
    assert none["train_loss"] == base["train_loss"] and none["test_loss"] == base["test_loss"]
    reset = script.run_arm(cfg, data, "adam", "reset-only")  # with its moments it does differ
    assert reset["train_loss"] != base["train_loss"] and len(reset["teleports"]) == cfg["TELE_BATCHES"]


def test_random_teleport_moves_the_weights_by_the_requested_norm(tmp_path):
    """g = I + T acts on pair (W2, W1) by W1 <- g1 W1 and on pair (W3, W2) by W2 <- g2 W2 R1,
    R1 = s(z) s(g1 z)^+ (eq. 46, z = W1 h on the teleport batch): recover T1 = (W1' - W1) W1^+
    and T2 = W2' R1^{-1} W2^+ - I (W has full row rank) and check their Frobenius norms are
    the ones the random arm was asked for."""
    data = _tiny(tmp_path)
    cfg = _cfg(tmp_path)
    W, opt = make_model([784, 16, 10, 10], [1, 2], "momentum", 1e-3)
    W = [w.double() for w in W]  # the recovery below inverts matrices: do it in float64
    norms = [torch.tensor([[0.3, 0.05], [0.1, 0.2]], dtype=torch.float64)]
    data.x_train = data.x_train.double()
    hook = script.make_hook(cfg, W, opt, data, "momentum", "random-teleport", norms)
    before = [w.detach().clone() for w in W]
    hook(0, 0)
    after = [w.detach() for w in W]
    T1 = (after[0] - before[0]) @ torch.linalg.pinv(before[0])
    idx = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(cfg["TELE_SEED"]))
    z = before[0] @ data.x_train[idx[:cfg["TELE_BATCH_SIZE"]]].T  # (K, 16, B), the hook's batch
    act = script.ACT
    R1 = act(z) @ torch.linalg.pinv(act((torch.eye(16, dtype=z.dtype) + T1) @ z))
    T2 = after[1] @ torch.linalg.inv(R1) @ torch.linalg.pinv(before[1]) - torch.eye(10, dtype=z.dtype)
    for pair, T in enumerate((T1, T2)):
        assert torch.allclose(T.flatten(1).norm(dim=1), norms[0][:, pair], rtol=1e-4), pair
    assert hook.records[0]["algebra_norm"] == norms[0].tolist()
    assert not torch.allclose(after[2], before[2])


def test_figure12_quick_writes_both_figures(tmp_path):
    cfg = _cfg(tmp_path, figure=12)
    saved = script.main(cfg)
    figs = tmp_path / "out" / "figures" / "optimization"
    assert (figs / "momentum_strategies.png").exists() and (figs / "adagrad_objectives.png").exists()
    assert set(saved["momentum"]) == {"no teleport", "transport", "keep", "reset"}
    for name, c in {**saved["momentum"], **saved["adagrad"]}.items():
        c = torch.tensor(c)
        assert c.shape == (cfg["F12_RUNS"], cfg["F12_EPOCHS"] + 1), name
        if name != "transport":  # the transported momentum can blow up here (see the README)
            assert torch.isfinite(c).all(), name
    e = cfg["F12_TELE_EPOCH"]  # all arms agree until the teleport
    assert all(torch.tensor(c)[:, :e + 1].tolist() == torch.tensor(saved["momentum"]["no teleport"])[:, :e + 1].tolist()
               for c in saved["momentum"].values())
    for rec in saved["teleports"].values():  # batch 4 <= hidden widths 6, 7: eq. (46) keeps the loss
        assert torch.allclose(torch.tensor(rec["loss_after"]), torch.tensor(rec["loss_before"]), rtol=1e-3)
        assert rec["objective_after"] != rec["objective_before"]
    assert json.loads((tmp_path / "out" / "results" / "optimization" / "figure12.json").read_text())["config"]["FIGURE"] == 12


@pytest.mark.parametrize("args,match", [(["--optimizers-run=['lbfgs']"], "unknown optimizer 'lbfgs'"),
                                        (["--arms=['baseline','warp']"], "unknown arm 'warp'"),
                                        (["--arms=['random-teleport']"], "needs the 'teleport' arm"),
                                        (["--dataset=SVHN"], "unknown dataset 'SVHN'"),
                                        (["--optimizer-settings={'adam': {'lr': -1.0, 'tele_epoch': 0, 'tele_lr': 0.05}}",
                                          "--optimizers-run=['adam']"], "adam lr must be >= 0")])
def test_bad_input_is_one_line_error(tmp_path, capsys, args, match):
    from lib.config import run
    with pytest.raises(SystemExit) as exc:
        run(script.main, vars(script), script._QUICK, argv=[f"--data-dir={tmp_path}", f"--out-dir={tmp_path}"] + args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and match in err and err.count("\n") == 1


def test_missing_data_offline_is_the_libs_one_line_error(tmp_path, capsys):
    from lib.config import run
    with pytest.raises(SystemExit) as exc:  # the default command, offline, with no data
        run(script.main, vars(script), script._QUICK, argv=[f"--data-dir={tmp_path}", f"--out-dir={tmp_path}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: MNIST not found") and "--data-dir" in err
    assert err.count("\n") == 1
