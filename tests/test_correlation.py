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
    for f in correlation.FIGURES:
        assert (fig_dir / f"MNIST_{f}.png").read_bytes()[:4] == b"\x89PNG"
    res = load_json(res_dir / "MNIST.json")
    K = correlation.QUICK_SETTINGS["N_MODELS"]
    assert res["n_train"] == 120 and res["n_test"] == 60  # all training images when fewer than TRAIN_SIZE
    assert res["data"] == {"name": "MNIST", "source": "data_dir", "n_train": 120, "n_test": 60}
    assert res["label"] == "MNIST (120 train)" and res["environment"]["torch"] == torch.__version__
    cfg = res["config"]  # the per-dataset resolved config: presets filled, no absolute paths
    assert cfg["QUICK"] and cfg["DATASET"] == "MNIST" and cfg["LR"] == 0.01 and cfg["WIDTHS"] == [784, 16, 10, 10]
    assert cfg["DATA_DIR"] == str(tmp_path / "data")  # outside the repository: kept as given
    training = load_json(res_dir / "MNIST_training.json")
    assert training["config"] == cfg and res["dataset"] == "MNIST"
    assert training["train_loss_final"] == res["train_loss_final"]
    assert len(training["train_acc_final"]) == K and all(0 <= a <= 100 for a in training["train_acc_final"])  # percent
    for m in (*correlation.METRICS, *correlation.EXCESS, "val_loss", "val_acc", "train_loss_final", "loss_w",
              "train_loss_epoch_mean"):
        assert len(res[m]) == K and all(np.isfinite(res[m])), m
    for m in ("phi_sphere", "phi_orthant"):
        assert np.allclose(np.array(res[m]) - res["loss_w"], res[f"{m}_excess"])
    assert res["metric_time_s"] > 0 and res["hessian_time_s"] > 0 and res["train_time_s"] > 0
    assert res["displacements"] == pytest.approx(correlation.displacements(cfg_of(res)))
    read_back(res, tmp_path / "data")
    assert res["diverged_epoch"] == [None] * K and res["n_diverged"] == 0 and res["n_kept"] == K
    assert sorted(os.listdir(out)) == [".progress", "figures", "results"]  # no stage left behind
    assert os.listdir(out / ".progress") == []  # the run completed: its checkpoint is gone
    md = (res_dir / "table1.md").read_text()
    assert "| sharpness phi (sphere) | " in md and "Quick run (--quick): not the paper's protocol" in md
    assert "| curvature psi (authors' pair sum) | " in md and "| top Hessian eigenvalue | " in md
    csv = (res_dir / "table1.csv").read_text().splitlines()
    assert csv[0].startswith("measure,MNIST r with val. loss [95% CI],MNIST p,MNIST Kendall tau [95% CI]")
    assert len(csv) == 1 + len(correlation.METRICS) + len(correlation.EXCESS) + 1
    # metrics again from the saved weights (weights_only load): the same numbers, no training
    mtime = (res_dir / "MNIST_weights.pt").stat().st_mtime_ns
    correlation.main(resolve(correlation, args + ["--skip-training"]))
    again = load_json(res_dir / "MNIST.json")
    assert (res_dir / "MNIST_weights.pt").stat().st_mtime_ns == mtime
    for m in (*correlation.PHI_PSI, "val_loss"):
        assert np.allclose(again[m], res[m], rtol=1e-6)
    for m in correlation.HESSIAN:  # the same batches and random vectors
        assert np.allclose(again[m], res[m], rtol=1e-4), m


def cfg_of(res):
    return {k: res["config"][k] for k in ("T_START", "T_STEP", "T_COUNT")}


def read_back(res, data_dir):
    """Every per-model number of a results record recomputed independently from its saved
    weights: phi, L(w) and both psi by the reference lib.metrics functions (one draw at a time,
    psi by nested forward-mode autodiff in float64), the Hessian measures by lib.hessian, the
    losses by lib.models.evaluate, the correlations by scipy."""
    from scipy.stats import kendalltau
    from lib.data import load
    from lib.hessian import adaptive_sharpness, hessian_trace, top_eigenvalue
    from lib.metrics import curvature, sharpness
    from lib.models import evaluate
    cfg = res["config"]
    data = load("MNIST", str(data_dir), "cpu", cfg["TRAIN_SIZE"])
    t = load_tensors(os.path.join(ROOT if not os.path.isabs(cfg["OUT_DIR"]) else "", cfg["OUT_DIR"], "results",
                                  "correlation", "MNIST_weights.pt"))
    W = [t[f"W{j}"] for j in range(len(t))]
    val, acc = evaluate(W, data.x_test, data.y_test, ACT)
    assert np.allclose(res["val_loss"], val, rtol=1e-5) and np.allclose(res["val_acc"], acc, rtol=1e-5)
    assert np.allclose(res["train_loss_final"], evaluate(W, data.x_train, data.y_train, ACT)[0], rtol=1e-5)
    ts, sums = correlation.displacements(cfg), {}
    for j in range(cfg["N_DRAWS"]):
        X, Y, Ms, d_sph, d_pos = correlation.draw(j, data, W, len(ts), cfg["METRIC_BATCH"], cfg["DRAW_SEED"])
        Wd, Xd, Md = [w.double() for w in W], X.double(), [M.double() for M in Ms]
        got = {"phi_sphere": sharpness(W, X, Y, ACT, ts, d_sph), "phi_orthant": sharpness(W, X, Y, ACT, ts, d_pos),
               "loss_w": sharpness(W, X, Y, ACT, [0.0], [d[:1] for d in d_sph]),
               "psi_exact": curvature(Wd, Xd, ACT, Md), "psi_authors": curvature(Wd, Xd, ACT, Md, convention="authors")}
        sums = {k: sums.get(k, 0) + v.double() for k, v in got.items()}
    for k, v in sums.items():
        np.testing.assert_allclose(res[k], v / cfg["N_DRAWS"], rtol=1e-4 if "psi" in k else 1e-5, err_msg=k)
    assert not np.allclose(res["psi_exact"], res["psi_authors"], rtol=1e-3)  # the cross term counts
    X, Y = correlation.draw(0, data, W, 1, cfg["METRIC_BATCH"], cfg["DRAW_SEED"])[:2]
    gen = torch.Generator().manual_seed(cfg["DRAW_SEED"] * 0 + 1)
    if cfg["HESSIAN_DRAWS"] == 1 and cfg["CHUNK"] >= len(W[0]):  # the same random vectors in the same order
        got = {"hess_top": top_eigenvalue(W, X, Y, ACT, "ce", cfg["LANCZOS_ITERS"], gen),
               "hess_trace": hessian_trace(W, X, Y, ACT, "ce", cfg["TRACE_SAMPLES"], gen),
               **{f"asam_{k}": adaptive_sharpness(W, X, Y, ACT, cfg["ASAM_RHO"], "ce", k, cfg["ASAM_STEPS"], gen,
                                                  samples=cfg["TRACE_SAMPLES"]) for k in ("worst", "average")}}
        for k, v in got.items():
            np.testing.assert_allclose(res[k], v, rtol=1e-5, err_msg=k)
    c, ok = res["correlations"], correlation.kept(res)
    for m in (*correlation.METRICS, *correlation.EXCESS):
        x, y = np.array(res[m])[ok], np.array(res["val_loss"])[ok]
        assert c[m]["r_val"] == pytest.approx(pearsonr(x, y)[0]) and c[m]["tau_val"] == pytest.approx(kendalltau(x, y)[0])
        for k in ("ci_r_val", "ci_partial_r_val", "ci_tau_val"):
            assert len(c[m][k]) == 2 and c[m][k][0] <= c[m][k][1], (m, k)
        assert c[m]["ci_r_val"][0] <= c[m]["r_val"] <= c[m]["ci_r_val"][1] or len(x) < 6
    assert c["train_loss"]["r_val"] == pytest.approx(pearsonr(res["train_loss_final"], res["val_loss"])[0])


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
    for m in correlation.PHI_PSI:  # (the quick run's one Hessian draw is draw 0: seed 0 whatever DRAW_SEED)
        assert not np.allclose(seeded[0][m], fast[m]), m
    for m in correlation.METRICS:
        assert seeded[0][m] == seeded[1][m], m
    # the saved weights were trained with lr 0.05: measuring them under another lr is refused
    with pytest.raises(UsageError, match="trained with LR=0.05"):
        run_dataset(cfg("lr", "--skip-training"), results("lr"))


def test_all_datasets_take_each_preset_and_the_users_value_wins():
    assert resolve(correlation)["DATASET"] == "MNIST" and resolve(correlation)["LR"] is None
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
    for f in correlation.FIGURES:
        assert (tmp_path / "figures" / "correlation" / f"MNIST_{f}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_cli_smoke_run_as_subprocess(tmp_path):
    write_fake(tmp_path / "data", "MNIST", n_train=120, n_test=60, seed=2)
    args = ["--quick", f"--data-dir={tmp_path / 'data'}", f"--out-dir={tmp_path}", "--n-draws=1"]
    proc = subprocess.run([sys.executable, "correlation.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| curvature psi (exact) |" in proc.stdout
    assert (tmp_path / "results" / "correlation" / "table1.csv").exists()


def test_batched_metrics_equal_each_model_alone():
    data = synthetic("MNIST", 60, 20, seed=1)
    W = init_mlp([784, 16, 10, 10], [54321 * (i + 1) for i in range(3)])
    ts = correlation.displacements(MNIST)[:5]
    # models in chunks of 2 (one draw per pass), and each model alone with 3 draws per pass
    batched = correlation.measure(W, data, ACT, ts, n_draws=3, batch=30, chunk=2, seed=12345, psi_dtype=torch.float64)
    for k in range(3):
        alone = correlation.measure([w[k:k + 1] for w in W], data, ACT, ts, n_draws=3, batch=30, chunk=3,
                                    seed=12345, psi_dtype=torch.float64)
        for m in (*correlation.PHI_PSI, "loss_w"):
            assert torch.allclose(alone[m], batched[m][k:k + 1], rtol=1e-5), m
    # the models differ, so the metrics do: the test would catch a broadcast of model 0
    assert batched["psi_exact"].unique().numel() == 3 and batched["phi_sphere"].unique().numel() == 3
    # float32 (the default) against float64: the error budget of the Table 1 protocol
    f32 = correlation.measure(W, data, ACT, ts, n_draws=3, batch=30, chunk=2, seed=12345)
    for m in correlation.PHI_PSI:
        assert torch.allclose(f32[m], batched[m], rtol=1e-4), m


def test_stacked_draws_are_the_single_draws():
    data = synthetic("MNIST", 60, 20, seed=1)
    W = init_mlp([784, 16, 10, 10], [1, 2])
    X, Y, Ms, d_sph, d_pos = correlation.draws(range(2, 5), data, W, 7, 30, 12345)
    for g, j in enumerate(range(2, 5)):
        one = correlation.draw(j, data, W, 7, 30, 12345)
        assert torch.equal(X[g], one[0]) and torch.equal(Y[g], one[1])
        for stacked, single in ((Ms, one[2]), (d_sph, one[3]), (d_pos, one[4])):
            assert all(torch.equal(a[g], b) for a, b in zip(stacked, single))


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


@pytest.mark.parametrize("name", ["MNIST", pytest.param("MNIST_1000-models", marks=pytest.mark.slow)])
def test_correlations_recomputed_from_the_committed_results_equal_the_saved_ones(name):
    # lib.stats on the committed per-model numbers gives back the committed Table 1 correlations
    # (intervals included) for the default run and the 1,000-model variant
    res = load_json(os.path.join(ROOT, "results", "correlation", f"{name}.json"))
    assert correlation.kept(res).all()  # no model diverged
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
                                        (["--psi-convention=paper"], "unknown psi convention 'paper'"),
                                        (["--asam-rho=-1"], "asam_rho must be > 0"),
                                        (["--tag=a/b"], "TAG may hold letters"),
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


NUMBERS = (*correlation.METRICS, *correlation.EXCESS, "loss_w", "val_loss", "val_acc", "train_loss_final",
           "train_loss_epoch_mean")


def test_interrupted_in_training_and_in_metrics_resumes_to_the_same_numbers(tmp_path, monkeypatch, capsys):
    import lib.train
    write_fake(tmp_path / "data", "MNIST", n_train=80, n_test=40, seed=5)
    args = ["--quick", f"--data-dir={tmp_path / 'data'}", "--progress=False", "--n-draws=2", "--fig-dpi=30",
            "--checkpoint-s=0", "--chunk=4", "--hessian-draws=2"]  # chunk = K: one draw per pass
    main = lambda out, *more: run(correlation.main, vars(correlation), argv=[*args, f"--out-dir={out}", *more])  # noqa: E731
    whole, out = tmp_path / "whole", tmp_path / "out"
    main(whole)
    main(out, "--epochs=1", "--n-draws=1")  # the previous complete set
    before = snapshot(out)
    assert len(before) == 9  # 4 figures, 2 results JSON, weights, table .md and .csv
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # other settings than the saved results: refused
        main(out)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "EPOCHS=2 (saved: 1)" in err and "--replace" in err and err.count("\n") == 1
    for module, name, n, said in ((lib.train, "train_epoch", 2, "MNIST training, epoch 1 of 2"),
                                  (correlation, "draw", 2, "MNIST metrics, draw 1 of 2"),
                                  (correlation, "top_eigenvalue", 2, "MNIST hessian, draw 1 of 2")):
        with monkeypatch.context() as m:
            stop_at(m, module, name, n)
            with pytest.raises(SystemExit) as e:
                main(out, "--replace")
        last = capsys.readouterr().err.splitlines()[-1]  # after a "resuming from" line on the second stop
        assert e.value.code == 130 and last.startswith("interrupted: ") and said in last and "resumes" in last
        assert snapshot(out) == before  # the previous set, whole and unchanged
        assert sorted(os.listdir(out)) == [".progress", "figures", "results"]
    epochs, draws = stop_at(monkeypatch, lib.train, "train_epoch", None), stop_at(monkeypatch, correlation, "draw", None)
    eigs = stop_at(monkeypatch, correlation, "top_eigenvalue", None)
    main(out, "--replace")
    assert (epochs, draws, eigs) == ([], [1], [1])  # training, phi and psi, and Hessian draw 0 were done
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
    figures = correlation.FIGURES
    # an absurd learning rate: every model diverges in its first epoch; the run still completes
    # (as a variant run: --tag names every output file)
    run(correlation.main, vars(correlation), argv=[*args, f"--out-dir={tmp_path / 'all'}", "--lr=1e6", "--tag=big-lr"])
    res_dir = tmp_path / "all" / "results" / "correlation"
    assert sorted(os.listdir(res_dir)) == ["MNIST_big-lr.json", "MNIST_big-lr_training.json", "MNIST_big-lr_weights.pt",
                                           "table1_big-lr.csv", "table1_big-lr.md"]
    for f in correlation.FIGURES:
        assert (tmp_path / "all" / "figures" / "correlation" / f"MNIST_big-lr_{f}.png").exists()
    res = load_json(res_dir / "MNIST_big-lr.json")
    assert res["config"]["TAG"] == "big-lr" and res["config"]["LR"] == 1e6
    assert res["diverged_epoch"] == [1] * 4 and res["n_diverged"] == 4 and res["n_kept"] == 0
    for m in (*correlation.METRICS, "loss_w"):
        assert res[m] == [None] * 4, m  # not measured
    assert res["correlations"]["psi_exact"]["r_val"] is None and res["correlations"]["hess_top"]["tau_val"] is None
    md = (res_dir / "table1_big-lr.md").read_text()
    assert "4 left out: 4 diverged in training" in md and "| n/a |" in md
    for f in figures:
        assert (tmp_path / "all" / "figures" / "correlation" / f"MNIST_big-lr_{f}.png").read_bytes()[:4] == b"\x89PNG"
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
    assert res["phi_sphere"][0] is None and res["hess_top"][0] is None
    assert all(np.isfinite(res["phi_sphere"][1:] + res["psi_exact"][1:] + res["hess_trace"][1:]))
    for m in ("phi_sphere", "psi_exact", "psi_authors", "asam_worst"):
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
