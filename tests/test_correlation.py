"""correlation.py (Table 1, Figures 9-10): smoke run on tiny files through the real loader,
--lr and --draw-seed reach the run, --plot-only on the committed results, batched metrics equal
per-model ones, the committed correlations recomputed, small ticks written scaled; a run stopped
in training and again in the metrics resumes to the numbers of an uninterrupted one and leaves
the previous outputs in place meanwhile; results of other settings are not replaced; diverged
models are left out of the correlations and counted."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT
from lib.actions import GLAction
from lib.config import UsageError, resolve, run, with_preset
from lib.data import synthetic, write_fake
from lib.io import load_json, load_tensors
from lib.models import Activation, init_mlp
from scipy.stats import pearsonr

sys.path.insert(0, ROOT)
import correlation  # noqa: E402

ACT = Activation(0.1)
MNIST = with_preset(resolve(correlation), correlation.PRESETS, "DATASETS", "MNIST")


def test_quick_run_writes_table_json_figures_and_skip_training_reproduces(tmp_path):
    write_fake(tmp_path / "data", "MNIST", n_train=120, n_test=60, seed=2)
    out = tmp_path / "out"
    args = ["--quick", f"--data-dir={tmp_path / 'data'}", f"--out-dir={out}", "--progress=False",
            "--n-draws=2", "--fig-dpi=40"]
    run(correlation.main, vars(correlation), argv=args)  # in-process: shares warm-up
    res_dir, fig_dir = out / "results" / "correlation", out / "figures" / "correlation"
    for f in ("table1.md", "table1.csv", "MNIST.json", "MNIST_training.json", "MNIST_weights.pt"):
        assert (res_dir / f).stat().st_size > 0, f
    for f in ("sharpness_vs_val_loss", "curvature_vs_val_loss", "sharpness_vs_curvature"):
        assert (fig_dir / f"MNIST_{f}.png").read_bytes()[:4] == b"\x89PNG"
    res = load_json(res_dir / "MNIST.json")
    K = correlation.QUICK_SETTINGS["N_MODELS"]
    assert res["n_train"] == 120 and res["n_test"] == 60  # all training images when fewer than TRAIN_SIZE
    assert res["data"] == {"name": "MNIST", "source": "data_dir", "n_train": 120, "n_test": 60}
    assert res["label"] == "MNIST (120 train)" and res["environment"]["torch"] == torch.__version__
    cfg = res["config"]  # the per-dataset resolved config: presets filled, no absolute paths
    assert cfg["QUICK"] and cfg["DATASET"] == "MNIST" and cfg["LR"] == 0.01 and cfg["WIDTHS"] == [784, 16, 10, 10]
    assert cfg["DATA_DIR"] == str(tmp_path / "data")  # outside the repository: kept as given
    assert load_json(res_dir / "MNIST_training.json")["config"] == cfg
    for m in ("phi_sphere", "phi_orthant", "psi", "val_loss", "train_loss_final", "loss_w", "phi_sphere_excess"):
        assert len(res[m]) == K and all(np.isfinite(res[m]))
    assert np.allclose(np.array(res["phi_sphere"]) - res["loss_w"], res["phi_sphere_excess"])
    assert res["diverged_epoch"] == [None] * K and res["n_diverged"] == 0 and res["n_kept"] == K
    assert sorted(os.listdir(out)) == [".progress", "figures", "results"]  # no stage left behind
    assert os.listdir(out / ".progress") == []  # the run completed: its checkpoint is gone
    assert all(p > 0 for p in res["psi"])
    # sharpness averages losses at displaced weights: above the loss at the minimum on average
    assert np.mean(res["phi_sphere"]) > np.mean(res["train_loss_final"]) - 0.5
    md = (res_dir / "table1.md").read_text()
    assert "| sharpness (sphere): r with val. loss |" in md and "Quick run (--quick): not the paper's protocol" in md
    csv = (res_dir / "table1.csv").read_text().splitlines()
    assert csv[0] == "measure,MNIST ours,MNIST paper" and len(csv) == 15
    # metrics again from the saved weights (weights_only load): the same numbers, no training
    mtime = (res_dir / "MNIST_weights.pt").stat().st_mtime_ns
    correlation.main(resolve(correlation, args + ["--skip-training"]))
    again = load_json(res_dir / "MNIST.json")
    assert (res_dir / "MNIST_weights.pt").stat().st_mtime_ns == mtime
    for m in ("phi_sphere", "phi_orthant", "psi", "val_loss"):
        assert np.allclose(again[m], res[m], rtol=1e-6)


def test_lr_and_draw_seed_reach_the_run_and_are_recorded(tmp_path):
    write_fake(tmp_path / "data", "MNIST", n_train=100, n_test=40, seed=3)
    args = ["--quick", f"--data-dir={tmp_path / 'data'}", "--progress=False", "--n-draws=2"]
    cfg = lambda out, *more: resolve(correlation, args + [f"--out-dir={tmp_path / out}", *more])  # noqa: E731
    results = lambda out: tmp_path / out / "results" / "correlation"  # noqa: E731
    for out in ("default", "lr"):
        os.makedirs(results(out))

    def run_dataset(cfg, res_dir):  # as main does it, without the stage: a fresh computation each time
        ckpts = []
        res = correlation.run_dataset("MNIST", cfg, res_dir, ckpts)
        ckpts[0].finish()
        return res
    base = run_dataset(cfg("default"), results("default"))
    fast = run_dataset(cfg("lr", "--lr=0.05"), results("lr"))
    assert base["config"]["LR"] == 0.01 and fast["config"]["LR"] == 0.05
    assert load_json(results("lr") / "MNIST_training.json")["config"]["LR"] == 0.05
    w0, w1 = (load_tensors(results(out) / "MNIST_weights.pt") for out in ("default", "lr"))
    assert not torch.allclose(w0["W0"], w1["W0"])
    assert not np.allclose(base["train_loss_final"], fast["train_loss_final"])
    assert not np.allclose(base["phi_sphere"], fast["phi_sphere"])
    # other draws on the same weights: other phi and psi, same validation losses; equal seeds
    # give equal numbers
    seeded = [run_dataset(cfg("lr", "--lr=0.05", "--skip-training", "--draw-seed=7"), results("lr"))
              for _ in range(2)]
    assert seeded[0]["config"]["DRAW_SEED"] == 7 and seeded[0]["val_loss"] == fast["val_loss"]
    for m in ("phi_sphere", "phi_orthant", "psi"):
        assert not np.allclose(seeded[0][m], fast[m]), m
        assert seeded[0][m] == seeded[1][m], m
    # the saved weights were trained with lr 0.05: measuring them under another lr is refused
    with pytest.raises(UsageError, match="trained with LR=0.05"):
        run_dataset(cfg("lr", "--skip-training"), results("lr"))


def test_all_datasets_take_each_preset_and_the_users_value_wins():
    assert resolve(correlation)["DATASET"] == "all" and resolve(correlation)["LR"] is None
    lrs = {n: with_preset(resolve(correlation), correlation.PRESETS, "DATASETS", n)["LR"]
           for n in ("MNIST", "FashionMNIST", "CIFAR10")}
    assert lrs == {"MNIST": 0.01, "FashionMNIST": 0.01, "CIFAR10": 0.02}
    cfg = resolve(correlation, ["--lr=0.05", "--widths=[784, 32, 10]"])
    for n in lrs:
        got = with_preset(cfg, correlation.PRESETS, "DATASETS", n)
        assert got["LR"] == 0.05 and got["WIDTHS"] == [784, 32, 10]
    assert correlation.displacements(MNIST)[:3] == pytest.approx([0.001, 0.011, 0.021])
    assert len(correlation.displacements(MNIST)) == 20


def test_plot_only_redraws_the_committed_results_and_reproduces_the_table(tmp_path):
    # the committed results were saved before the settings were renamed: plot-only reads only
    # what it needs from them
    committed = os.path.join(ROOT, "results", "correlation")
    res_dir = tmp_path / "results" / "correlation"
    os.makedirs(res_dir)
    shutil.copy(os.path.join(committed, "MNIST.json"), res_dir)
    run(correlation.main, vars(correlation), argv=["--plot-only", f"--out-dir={tmp_path}", "--fig-dpi=30"])
    for f in ("table1.md", "table1.csv"):
        assert (res_dir / f).read_bytes() == open(os.path.join(committed, f), "rb").read(), f
    for f in ("sharpness_vs_val_loss", "curvature_vs_val_loss", "sharpness_vs_curvature"):
        assert (tmp_path / "figures" / "correlation" / f"MNIST_{f}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_cli_smoke_run_as_subprocess(tmp_path):
    write_fake(tmp_path / "data", "MNIST", n_train=120, n_test=60, seed=2)
    args = ["--quick", f"--data-dir={tmp_path / 'data'}", f"--out-dir={tmp_path}", "--n-draws=1"]
    proc = subprocess.run([sys.executable, "correlation.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| curvature: r with val. loss |" in proc.stdout
    assert (tmp_path / "results" / "correlation" / "table1.csv").exists()


def test_batched_metrics_equal_each_model_alone():
    data = synthetic("MNIST", 60, 20, seed=1)
    W = init_mlp([784, 16, 10, 10], [54321 * (i + 1) for i in range(3)])
    ts = correlation.displacements(MNIST)[:5]
    batched = correlation.measure(W, data, ACT, ts, n_draws=1, batch=30, chunk=2, seed=12345)
    for k in range(3):
        alone = correlation.measure([w[k:k + 1] for w in W], data, ACT, ts, n_draws=1, batch=30, chunk=1,
                                    seed=12345)
        for m in correlation.METRICS:
            assert torch.allclose(alone[m], batched[m][k:k + 1], rtol=1e-5), m
    # the models differ, so the metrics do: the test would catch a broadcast of model 0
    assert batched["psi"].unique().numel() == 3 and batched["phi_sphere"].unique().numel() == 3


def test_draws_are_common_random_numbers_and_the_authors_lie_elements():
    data = synthetic("MNIST", 60, 20, seed=1)
    W2 = init_mlp([784, 16, 10, 10], [1, 2])
    W5 = init_mlp([784, 16, 10, 10], [3, 4, 5, 6, 7])
    a, b = correlation.draw(4, data, W2, 7, 30, 12345), correlation.draw(4, data, W5, 7, 30, 12345)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[2] + a[3] + a[4], b[2] + b[3] + b[4]))
    c, e = correlation.draw(5, data, W2, 7, 30, 12345), correlation.draw(4, data, W2, 7, 30, 777)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], e[0])
    assert torch.equal(a[3][0], correlation.draw(4, data, W2, 7, 30, 12345)[3][0])
    for M, n in zip(a[2], (16, 10)):  # one M per pair, entries in [0, 1], unit Frobenius norm
        assert M.shape == (n, n) and (M >= 0).all() and torch.isclose(M.norm(), torch.tensor(1.0))
    assert all((d >= 0).all() for d in a[4]) and any((d < 0).any() for d in a[3])


def test_correlations_recomputed_from_the_committed_results_equal_the_saved_ones():
    # lib.stats on the committed per-model numbers gives back the committed Table 1 correlations
    res = load_json(os.path.join(ROOT, "results", "correlation", "MNIST.json"))
    assert correlation.kept(res).all()  # saved before divergence was recorded: every model kept
    again = correlation.correlations(res, res["config"]["CONTROL"])
    assert again.keys() == res["correlations"].keys()
    for m, c in res["correlations"].items():
        assert again[m].keys() == c.keys(), m
        for k, v in c.items():
            assert again[m][k] == pytest.approx(v, rel=1e-9, abs=1e-300), (m, k)


def test_scatter_panels_write_small_ticks_scaled_and_keep_the_legend_off_the_markers():
    # curvatures near 0.002 as plain ticks (0.00175, 0.00200, ...) run into each other
    import matplotlib.pyplot as plt
    from lib.plots import scatter_panels
    rng = np.random.default_rng(0)
    x, y = 0.0015 + 0.002 * rng.random(50), 0.4 + 0.1 * rng.random(50)
    x[0], y[0] = x.min(), y.max()  # a marker in the upper left corner
    fig = scatter_panels([(x, y, "curvature", "validation loss", "r = 0")], y, "training loss", "title")
    fig.canvas.draw()
    ax = fig.axes[0]
    assert re.search(r"curvature \(.*10\^\{[-\u2212]3\}", ax.get_xlabel()) and ax.get_ylabel() == "validation loss"
    assert not ax.xaxis.offsetText.get_visible()  # the x10^-3 is in the label, not beside the axis
    digits = [re.sub(r"[^0-9.]", "", t.get_text()) for t in ax.get_xticklabels() if t.get_text()]
    assert digits and max(map(len, digits)) <= 4, digits  # "1.5", "2.0", ..., not "0.00175"
    box = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
    assert not box.count_contains(ax.transData.transform(np.column_stack([x, y])))
    assert len(fig.axes) == 2 and ax.get_title() == "title"  # the panel and the colour bar
    plt.close(fig)


def test_gl54_shared_input_pseudo_inverse_equals_per_model():
    # lib/actions.py computes pinv(h_0) once when X is shared; it must equal the per-model result
    W = init_mlp([12, 7, 5, 3], [1, 2, 3], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(9, 12, generator=gen, dtype=torch.float64)
    Ts = [0.1 * torch.randn(3, n, n, generator=gen, dtype=torch.float64) for n in (7, 5)]
    act = GLAction(54, "exp")
    shared = act(W, Ts, X, ACT)
    per_model = act(W, Ts, X.expand(3, -1, -1), ACT)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(shared, per_model))
    assert not torch.allclose(shared[0], W[0])


@pytest.mark.parametrize("argv,match", [(["--dataset=SVHN"], "unknown dataset 'SVHN'"),
                                        (["--n-draws=-3"], "n_draws must be > 0"),
                                        (["--psi-dtype=float16"], "unknown psi dtype"),
                                        (["--lr=-1"], "lr must be > 0"),
                                        (["--plot-only"], "--plot-only: no saved results at")])
def test_bad_input_is_one_line_error(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        run(correlation.main, vars(correlation), argv=argv + [f"--out-dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and match in err and err.count("\n") == 1


def test_forward_shared_input_gemm_equals_per_model_matmul():
    # lib/models.py sends a shared X through the first layer of all models as one GEMM
    from lib.models import forward
    W = init_mlp([12, 7, 5, 3], [1, 2, 3], dtype=torch.float64)
    X = torch.rand(9, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shared = forward(W, X, ACT)
    assert shared.shape == (3, 9, 3)
    assert torch.allclose(shared, forward(W, X.expand(3, -1, -1), ACT), atol=1e-12)
    for k in range(3):
        h = X
        for w in W[:-1]:
            h = ACT(h @ w[k].T)
        assert torch.allclose(shared[k], h @ W[-1][k].T, atol=1e-12)
    assert torch.allclose(forward(W[:1], X, ACT), torch.einsum("bi,koi->kbo", X, W[0]), atol=1e-12)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_sharpness_shared_directions_equals_perturbed_models(loss):
    # lib.metrics.sharpness splits the first layer X (w + t d)^T = X w^T + t X d^T when the
    # directions are shared; it must equal the loss of the n * K explicitly perturbed models
    from lib.metrics import random_directions, sharpness
    from lib.models import loss_fn
    W = init_mlp([12, 7, 5, 3], [1, 2, 3], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(9, 12, generator=gen, dtype=torch.float64)
    Y = torch.randint(3, (9,), generator=gen) if loss == "ce" else torch.rand(9, 3, generator=gen, dtype=torch.float64)
    ts = [0.5, 1.0, 2.0, 3.0]
    D = random_directions(W, 4, "sphere", gen)
    naive = torch.stack([loss_fn([w + t * d for w, d in zip(W, [d[i] for d in D])], X, Y, ACT, loss)
                         for i, t in enumerate(ts)]).mean(0)
    assert torch.allclose(sharpness(W, X, Y, ACT, ts, D, loss), naive, atol=1e-12)
    per_model = [d.unsqueeze(1).expand(-1, 3, -1, -1) for d in D]  # the general (n, K, ...) path
    assert torch.allclose(sharpness(W, X, Y, ACT, ts, per_model, loss), naive, atol=1e-12)


def snapshot(out):
    """{path: bytes} of every output file under out (checkpoints aside)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and ".progress" not in p.parts}


def stop_at(monkeypatch, module, name, n):
    """Make module.name raise KeyboardInterrupt on its n-th call (never if n is None); returns the
    list of calls made."""
    real, calls = getattr(module, name), []

    def stopping(*args, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(module, name, stopping)
    return calls


NUMBERS = ("phi_sphere", "phi_orthant", "psi", "loss_w", "phi_sphere_excess", "val_loss", "val_acc",
           "train_loss_final", "train_loss_epoch_mean")


def test_interrupted_in_training_and_in_metrics_resumes_to_the_same_numbers(tmp_path, monkeypatch, capsys):
    import lib.train
    write_fake(tmp_path / "data", "MNIST", n_train=80, n_test=40, seed=5)
    args = ["--quick", f"--data-dir={tmp_path / 'data'}", "--progress=False", "--n-draws=2", "--fig-dpi=30",
            "--checkpoint-s=0"]
    main = lambda out, *more: run(correlation.main, vars(correlation), argv=[*args, f"--out-dir={out}", *more])  # noqa: E731
    whole, out = tmp_path / "whole", tmp_path / "out"
    main(whole)
    main(out, "--epochs=1", "--n-draws=1")  # the previous complete set
    before = snapshot(out)
    assert len(before) == 8  # 3 figures, 2 results JSON, weights, table .md and .csv
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # other settings than the saved results: refused
        main(out)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "EPOCHS=2 (saved: 1)" in err and "--replace" in err and err.count("\n") == 1
    for module, name, n, said in ((lib.train, "train_epoch", 2, "MNIST training, epoch 1 of 2"),
                                  (correlation, "draw", 2, "MNIST metrics, draw 1 of 2")):
        with monkeypatch.context() as m:
            stop_at(m, module, name, n)
            with pytest.raises(SystemExit) as e:
                main(out, "--replace")
        last = capsys.readouterr().err.splitlines()[-1]  # after a "resuming from" line on the second stop
        assert e.value.code == 130 and last.startswith("interrupted: ") and said in last and "resumes" in last
        assert snapshot(out) == before  # the previous set, whole and unchanged
        assert sorted(os.listdir(out)) == [".progress", "figures", "results"]
    epochs, draws = stop_at(monkeypatch, lib.train, "train_epoch", None), stop_at(monkeypatch, correlation, "draw", None)
    main(out, "--replace")
    assert (epochs, draws) == ([], [1])  # training was done, draw 0 too: draw 1 remained
    assert "resuming from" in capsys.readouterr().err and os.listdir(out / ".progress") == []
    a, b = (load_json(d / "results" / "correlation" / "MNIST.json") for d in (whole, out))
    for k in NUMBERS:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, err_msg=k)
    for m, c in a["correlations"].items():
        for k, v in c.items():
            assert b["correlations"][m][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (m, k)
    ha, hb = (load_json(d / "results" / "correlation" / "MNIST_training.json")["history"] for d in (whole, out))
    for k in ("train_loss", "test_loss", "test_acc"):
        np.testing.assert_allclose(hb[k], ha[k], rtol=1e-6, err_msg=k)
    wa, wb = (load_tensors(d / "results" / "correlation" / "MNIST_weights.pt") for d in (whole, out))
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-6, atol=0) for k in wa)
    assert snapshot(out).keys() == before.keys() and snapshot(out) != before


def test_the_committed_protocol_is_the_default_and_other_settings_do_not_replace_it():
    saved = os.path.join(ROOT, "results", "correlation", "MNIST.json")  # saved under the old setting names
    plain = lambda *more: correlation.dataset_config(resolve(correlation, ["--dataset=MNIST", *more]), "MNIST")  # noqa: E731
    correlation.check_saved(saved, plain())  # the plain command reproduces (and may replace) it
    correlation.check_saved(saved, plain("--skip-training", "--data-dir=elsewhere", "--checkpoint-s=0"))
    for more, said in ((["--epochs=5"], "EPOCHS=5 (saved: 40)"), (["--lr=0.02"], "LR=0.02 (saved: 0.01)"),
                       (["--quick", "--out-dir=."], "EPOCHS=2 (saved: 40)")):  # a quick run into the real folders
        with pytest.raises(UsageError, match=r"MNIST.json holds results made with other settings") as e:
            correlation.check_saved(saved, plain(*more))
        assert said in str(e.value) and "\n" not in str(e.value)
        correlation.check_saved(saved, plain(*more, "--replace"))


def test_diverged_models_are_left_out_and_counted(tmp_path, monkeypatch):
    import lib.train
    write_fake(tmp_path / "data", "MNIST", n_train=80, n_test=40, seed=6)
    args = ["--quick", f"--data-dir={tmp_path / 'data'}", "--progress=False", "--n-draws=2", "--fig-dpi=30"]
    figures = ("sharpness_vs_val_loss", "curvature_vs_val_loss", "sharpness_vs_curvature")
    # an absurd learning rate: every model diverges in its first epoch; the run still completes
    run(correlation.main, vars(correlation), argv=[*args, f"--out-dir={tmp_path / 'all'}", "--lr=1e6"])
    res_dir = tmp_path / "all" / "results" / "correlation"
    res = load_json(res_dir / "MNIST.json")
    assert res["diverged_epoch"] == [1] * 4 and res["n_diverged"] == 4 and res["n_kept"] == 0
    assert res["phi_sphere"] == [None] * 4 and res["psi"] == [None] * 4  # not measured
    assert res["correlations"]["psi"]["r_val"] is None
    md = (res_dir / "table1.md").read_text()
    assert "4 left out: 4 diverged in training" in md and "| n/a |" in md
    for f in figures:
        assert (tmp_path / "all" / "figures" / "correlation" / f"MNIST_{f}.png").read_bytes()[:4] == b"\x89PNG"
    # one model of five breaks in epoch 2: the correlations are those of the other four
    real = lib.train.train_epoch

    def breaking(W, *a, **kw):
        breaking.calls += 1
        if breaking.calls == 2:
            with torch.no_grad():
                W[0][0, 0, 0] = float("nan")
        return real(W, *a, **kw)
    breaking.calls = 0
    monkeypatch.setattr(lib.train, "train_epoch", breaking)
    run(correlation.main, vars(correlation), argv=[*args, f"--out-dir={tmp_path / 'one'}", "--n-models=5"])
    res_dir = tmp_path / "one" / "results" / "correlation"
    res = load_json(res_dir / "MNIST.json")
    assert res["diverged_epoch"] == [2, None, None, None, None] and res["n_kept"] == 4
    assert res["phi_sphere"][0] is None and all(np.isfinite(res["phi_sphere"][1:] + res["psi"][1:]))
    for m in ("phi_sphere", "psi"):
        assert res["correlations"][m]["r_val"] == pytest.approx(pearsonr(res[m][1:], res["val_loss"][1:])[0])
    assert "1 left out: 1 diverged in training, r over the other 4" in (res_dir / "table1.md").read_text()
    for f in figures:
        assert (tmp_path / "one" / "figures" / "correlation" / f"MNIST_{f}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_is_one_line_and_status_130(tmp_path):
    write_fake(tmp_path / "data", "MNIST", n_train=120, n_test=60, seed=2)
    args = [sys.executable, "correlation.py", "--quick", f"--data-dir={tmp_path / 'data'}", f"--out-dir={tmp_path}",
            "--epochs=500", "--checkpoint-s=0", "--progress=False"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    saved = tmp_path / ".progress" / "correlation-MNIST.pt"
    for _ in range(1200):  # until the first epoch is saved: then it is training
        if saved.exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 130 and "Traceback" not in err
    assert last.startswith("interrupted: progress saved (MNIST training, epoch") and "--epochs=500" in last
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json"))
