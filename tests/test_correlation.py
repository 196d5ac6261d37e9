"""correlation.py (Table 1, Figures 9-10): smoke run on tiny files through the real loader,
batched metrics equal per-model ones, the partial correlation against its closed form."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from lib.actions import GLAction
from lib.config import configure, run
from lib.data import synthetic, write_fake
from lib.models import Activation, init_mlp
from lib.results import load_json

sys.path.insert(0, ROOT)
import correlation  # noqa: E402

ACT = Activation(0.1)


def test_quick_run_writes_table_json_figures_and_skip_training_reproduces(tmp_path):
    write_fake(tmp_path / "data", "MNIST", n_train=120, n_test=60, seed=2)
    out = tmp_path / "out"
    args = ["--quick", f"--data-dir={tmp_path / 'data'}", f"--out-dir={out}", "--progress=False",
            "--n-draws=2", "--fig-dpi=40"]
    run(correlation.main, vars(correlation), correlation._QUICK, argv=args)  # in-process: shares warm-up
    res_dir, fig_dir = out / "results" / "correlation", out / "figures" / "correlation"
    for f in ("table1.md", "table1.csv", "MNIST.json", "MNIST_training.json", "MNIST_weights.pt"):
        assert (res_dir / f).stat().st_size > 0, f
    for f in ("sharpness_vs_val_loss", "curvature_vs_val_loss", "sharpness_vs_curvature"):
        assert (fig_dir / f"MNIST_{f}.png").read_bytes()[:4] == b"\x89PNG"
    res = load_json(res_dir / "MNIST.json")
    K = correlation._QUICK["N_MODELS"]
    assert res["n_train"] == 120 and res["n_test"] == 60  # all training images when fewer than TRAIN_SIZE
    assert res["config"]["QUICK"] and res["environment"]["torch"] == torch.__version__
    for m in ("phi_sphere", "phi_orthant", "psi", "val_loss", "train_loss_final", "loss_w", "phi_sphere_excess"):
        assert len(res[m]) == K and all(np.isfinite(res[m]))
    assert np.allclose(np.array(res["phi_sphere"]) - res["loss_w"], res["phi_sphere_excess"])
    assert all(p > 0 for p in res["psi"])
    # sharpness averages losses at displaced weights: above the loss at the minimum on average
    assert np.mean(res["phi_sphere"]) > np.mean(res["train_loss_final"]) - 0.5
    assert "| sharpness (sphere): r with val. loss |" in (res_dir / "table1.md").read_text()
    csv = (res_dir / "table1.csv").read_text().splitlines()
    assert csv[0] == "measure,MNIST ours,MNIST paper" and len(csv) == 15
    # metrics again from the saved weights (weights_only load): the same numbers, no training
    cfg = configure(vars(correlation), args + ["--skip-training"], correlation._QUICK)
    mtime = (res_dir / "MNIST_weights.pt").stat().st_mtime_ns
    correlation.main(cfg)
    again = load_json(res_dir / "MNIST.json")
    assert (res_dir / "MNIST_weights.pt").stat().st_mtime_ns == mtime
    for m in ("phi_sphere", "phi_orthant", "psi", "val_loss"):
        assert np.allclose(again[m], res[m], rtol=1e-6)


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
    ts = correlation.displacements(correlation.PER_DATASET["MNIST"])[:5]
    batched = correlation.measure(W, data, ACT, ts, n_draws=1, batch=30, chunk=2)
    for k in range(3):
        alone = correlation.measure([w[k:k + 1] for w in W], data, ACT, ts, n_draws=1, batch=30, chunk=1)
        for m in correlation.METRICS:
            assert torch.allclose(alone[m], batched[m][k:k + 1], rtol=1e-5), m
    # the models differ, so the metrics do: the test would catch a broadcast of model 0
    assert batched["psi"].unique().numel() == 3 and batched["phi_sphere"].unique().numel() == 3


def test_draws_are_common_random_numbers_and_the_authors_lie_elements():
    data = synthetic("MNIST", 60, 20, seed=1)
    W2 = init_mlp([784, 16, 10, 10], [1, 2])
    W5 = init_mlp([784, 16, 10, 10], [3, 4, 5, 6, 7])
    a, b = correlation.draw(4, data, W2, 7, 30), correlation.draw(4, data, W5, 7, 30)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[2] + a[3] + a[4], b[2] + b[3] + b[4]))
    c = correlation.draw(5, data, W2, 7, 30)
    assert not torch.equal(a[0], c[0])
    for M, n in zip(a[2], (16, 10)):  # one M per pair, entries in [0, 1], unit Frobenius norm
        assert M.shape == (n, n) and (M >= 0).all() and torch.isclose(M.norm(), torch.tensor(1.0))
    assert all((d >= 0).all() for d in a[4]) and any((d < 0).any() for d in a[3])


def test_partial_correlation_matches_closed_form_and_removes_a_shared_cause():
    rng = np.random.default_rng(0)
    z = rng.normal(size=400)
    x, y = z + 0.5 * rng.normal(size=400), 2 * z + 0.7 * rng.normal(size=400)
    r, p = correlation.partial_corr(x, y, z)
    c = np.corrcoef([x, y, z])
    closed = (c[0, 1] - c[0, 2] * c[1, 2]) / np.sqrt((1 - c[0, 2] ** 2) * (1 - c[1, 2] ** 2))
    assert abs(r - closed) < 1e-10 and c[0, 1] > 0.8 and abs(r) < 0.15 and p > 0.01
    r2, p2 = correlation.partial_corr(x + y, y, z)
    assert r2 > 0.5 and p2 < 1e-10


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
                                        (["--plot-only"], "--plot-only: no results at")])
def test_bad_input_is_one_line_error(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        run(correlation.main, vars(correlation), correlation._QUICK, argv=argv + [f"--out-dir={tmp_path}"])
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
