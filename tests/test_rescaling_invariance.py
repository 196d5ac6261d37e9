"""rescaling_invariance.py: every transformation is an exact symmetry (the function unchanged to
1e-10 in float64) that does move the weights; a tiny run through the real loader writes the JSON,
table and figure, its fields read back agree with each other (relative changes recomputed from
the values before and after), adaptive sharpness and the loss do not move while the top
eigenvalue, the trace and phi - L(w) do; --plot-only redraws; other settings are not replaced."""
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, make_batch, make_weights
from lib.config import UsageError, resolve, run
from lib.data import write_fake
from lib.io import load_json
from lib.models import activation, forward

sys.path.insert(0, ROOT)
import rescaling_invariance as ri  # noqa: E402

ARGS = ["--quick", "--progress=False", "--n-models=2", "--fig-dpi=30", "--metric-batch=30"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("invariance")
    write_fake(tmp / "data", "MNIST", n_train=80, n_test=40, seed=3)
    args = [*ARGS, f"--data-dir={tmp / 'data'}", f"--out-dir={tmp / 'out'}"]
    run(ri.main, vars(ri), argv=args)
    return tmp, args


@pytest.mark.parametrize("act_name", ["relu", "leaky_relu"])
def test_every_transformation_keeps_the_function_and_moves_the_weights(act_name, one_thread):
    act, cfg = activation(act_name), resolve(ri, ["--quick", "--tele-lr=0.5"])
    W = make_weights([6, 5, 4, 3], K=3, seed=1)
    X, Y = make_batch(20, 6, 3, seed=2)
    moved, rec = ri.transformed(cfg, W, X, Y, act)
    assert set(moved) == {f"random s={s:g}" for s in cfg["RESCALE_SIZES"]} | {"teleport"}
    Xt = torch.rand(50, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for name, V in moved.items():
        assert (forward(V, Xt, act) - forward(W, Xt, act)).abs().max() < 1e-10, name
        change = max(((v - w).abs().max() / w.abs().max()).item() for v, w in zip(V, W))
        assert change > 0.02, name  # a real move of the weights
    assert (np.array(rec["objective_after"]) > np.array(rec["objective_before"]) + 1e-3).all()


def test_quick_run_writes_results_whose_fields_agree(quick_run):
    tmp, _ = quick_run
    res = load_json(tmp / "out" / "results" / "invariance" / "MNIST.json")
    assert (tmp / "out" / "figures" / "invariance" / "MNIST_relative_change.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp / "out" / "results" / "invariance" / "MNIST_table.md").read_text()
    assert res["config"]["N_MODELS"] == 2 and res["data"]["n_train"] == 80 and res["label"] in md
    assert list(res["activations"]) == ["leaky_relu", "relu"]
    names = [f"random s={s:g}" for s in res["config"]["RESCALE_SIZES"]] + ["teleport"]
    for act_name, r in res["activations"].items():
        assert list(r["relative_change"]) == names and len(r["train"]["seeds"]) == 2
        assert set(r["before"]) == set(ri.MEASURES) | {"hessian_trace_se"}
        for n in names:
            assert r["output_change"][n]["max"] < 1e-10  # an exact symmetry, in float64
            assert max(r["output_change"][n]["per_model"]) == r["output_change"][n]["max"]
            for k in ri.MEASURES:
                rel = r["relative_change"][n][k]
                again = ri.relative_change(r["before"][k], r["after"][n][k])
                assert np.allclose(np.array(rel["per_model"], dtype=float), again, equal_nan=True)
                if not k.startswith("psi") or act_name == "leaky_relu":
                    assert rel["max"] == pytest.approx(np.nanmax(again)) and rel["median"] <= rel["max"]
            for k in ("loss", "asam_worst", "asam_average"):  # invariant: rounding only
                assert r["relative_change"][n][k]["max"] < 1e-8, (act_name, n, k)
        assert r["output_change"][names[-2]]["max"] > 0  # rounding is measured, not assumed away
        big = r["relative_change"][names[-2]]  # the largest random rescaling (s = 2)
        for k in ("top_eigenvalue", "hessian_trace", "phi_excess", "grad_norm"):
            assert big[k]["median"] > 1e-2, (act_name, k)
        assert np.all(np.array(r["teleport"]["objective_after"]) > np.array(r["teleport"]["objective_before"]))
        assert all(np.isfinite(r["before"]["asam_worst"])) and min(r["before"]["asam_worst"]) > 0
    for k in ("psi", "psi_authors"):
        assert all(v is None for v in res["activations"]["relu"]["before"][k])  # eq. (54): no ReLU
        assert all(np.isfinite(res["activations"]["leaky_relu"]["before"][k]))
    assert res["activations"]["leaky_relu"]["before"]["psi"] != res["activations"]["leaky_relu"]["before"]["psi_authors"]
    assert "| adaptive sharpness, worst case |" in md and "## relu" in md


def test_plot_only_redraws_and_other_settings_are_not_replaced(quick_run):
    tmp, args = quick_run
    png = tmp / "out" / "figures" / "invariance" / "MNIST_relative_change.png"
    png.unlink()
    md = run(ri.main, vars(ri), argv=[*args, "--plot-only"])
    assert png.read_bytes()[:4] == b"\x89PNG" and "## leaky_relu" in md
    with pytest.raises(UsageError, match="other settings"):
        ri.main(resolve(ri, [*args, "--asam-rho=0.1"]))


def test_relative_change_and_its_summary_by_hand():
    rel = ri.relative_change([2.0, -4.0, 0.0, None, 1.0], [3.0, -2.0, 1.0, 1.0, 1.0])
    assert np.allclose(rel, [0.5, 0.5, np.nan, np.nan, 0.0], equal_nan=True)
    assert ri.summary(rel) == {"median": 0.5, "max": 0.5}
    assert ri.summary([np.nan, 3.0, 1.0, 2.0]) == {"median": 2.0, "max": 3.0}
    assert ri.summary([np.nan]) == {"median": None, "max": None}
    assert ri.cell({"median": 0.5, "max": 3e-15}) == "0.5 / 3e-15" and ri.cell({"median": None, "max": None}) == "n/a"


def test_the_committed_table_follows_from_the_committed_results():
    res = load_json(f"{ROOT}/results/invariance/MNIST.json")
    with open(f"{ROOT}/results/invariance/MNIST_table.md") as fh:
        assert fh.read() == ri.table(res)
    assert res["config"]["N_MODELS"] == 20 and not res["config"]["QUICK"]
    for r in res["activations"].values():
        for n, changes in r["relative_change"].items():
            assert r["output_change"][n]["max"] < 1e-12
            assert changes["asam_worst"]["max"] < 1e-12 and changes["asam_average"]["max"] < 1e-12
