"""Section 3 on convex quadratics: the SO(2) actions of x^2 + 9y^2 and Booth, the teleport by gradient
ascent on the angle, Proposition 3.2 (eigenvector / damped Newton), Propositions 3.5 and C.3 (one
teleport suffices) and Theorem 3.1 (faster convergence), through teleport_quadratic.py --quick."""
import math

import numpy as np
import pytest
import torch

import teleport_quadratic as tq
from lib.config import UsageError, resolve
from lib.quadratic import (FUNCTIONS, grad, hessian, loss, max_grad_norm_sq, optimal_angle, so2_action,
                           teleport_angle, wrap_half_turn)
from lib.io import load_json

T = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
NAMES = list(FUNCTIONS)


@pytest.mark.parametrize("name", NAMES)
def test_so2_action_is_a_loss_preserving_group_action(name):
    q = FUNCTIONS[name]
    w = T([2.5, -1.2])
    for a, b in [(0.3, 1.1), (-2.0, 0.7)]:
        ga = so2_action(q, w, T(a))
        assert loss(q, ga).item() == pytest.approx(loss(q, w).item(), rel=1e-13)
        assert torch.allclose(so2_action(q, ga, T(b)), so2_action(q, w, T(a + b)), atol=1e-12)
        assert torch.allclose(so2_action(q, ga, T(-a)), w, atol=1e-12)
        assert (ga - w).norm() > 0.1
    assert torch.allclose(so2_action(q, w, T(0.0)), w)


@pytest.mark.parametrize("name", NAMES)
def test_grad_norm_varies_on_the_level_set_by_a_factor_three(name):
    # both Hessians have eigenvalues (2, 18): ||grad f|| on a level set spans [2 sqrt f, 6 sqrt f]
    q = FUNCTIONS[name]
    assert torch.allclose(torch.linalg.eigvalsh(hessian(q)), T([2.0, 18.0]))
    w = T([4.0, 0.5])
    norms = grad(q, so2_action(q, w, torch.linspace(0, 2 * math.pi, 721, dtype=torch.float64))).norm(dim=-1)
    assert norms.max().item() / norms.min().item() == pytest.approx(3.0, rel=1e-4)
    assert norms.max().item() ** 2 == pytest.approx(max_grad_norm_sq(q, w).item(), rel=1e-4)


@pytest.mark.parametrize("name,w", [("x2_9y2", (10.0, 0.1)), ("x2_9y2", (-3.0, 2.0)), ("booth", (5.0, -5.0)), ("booth", (0.0, 0.0))])
def test_teleport_ascent_finds_the_closed_form_maximiser(name, w):
    q, w = FUNCTIONS[name], T(w)
    theta, steps, before, after = teleport_angle(q, w)
    assert abs(wrap_half_turn(theta - optimal_angle(q, w))) < 1e-9 and steps < 500
    assert before < 1 and after == pytest.approx(1.0, abs=1e-12)
    grid = torch.linspace(-math.pi / 2, math.pi / 2, 2001, dtype=torch.float64)
    vals = grad(q, so2_action(q, w, grid)).pow(2).sum(-1)
    assert abs(wrap_half_turn(grid[vals.argmax()].item() - optimal_angle(q, w))) < 2e-3


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quad")
    return out, tq.main(resolve(tq, ["--quick", f"--out-dir={out}"]))


@pytest.mark.parametrize("name", NAMES)
def test_quick_run_theory_checks(quick, name):
    out, results = quick
    r = load_json(out / f"results/quadratic/{name}.json")
    assert r["config"]["QUICK"] is True and "torch" in r["environment"] and "COLORS" not in r["config"]
    # the saved config is this function's: its presets filled in where the fence has None
    assert {k: r["config"][k] for k in r["settings"]} == r["settings"]
    assert r["settings"] == {k: list(v) if isinstance(v, tuple) else v for k, v in tq.PRESETS["FUNCTION"][name].items()}
    for fig in ("trajectories", "loss", "optimality"):
        assert (out / f"figures/quadratic/{name}_{fig}.png").stat().st_size > 10000
    # the teleport keeps the loss, and ascent agrees with the closed form
    assert r["teleport"]["loss_after"] == pytest.approx(r["teleport"]["loss_before"], rel=1e-12)
    assert r["theta_error_rad"] < 1e-9
    # Proposition 3.2: grad f is a Hessian eigenvector right after the teleport; GD step = damped Newton step
    p32 = r["prop_3_2"]
    assert p32["angle_grad_Hgrad_rad"] < 1e-4 and p32["lambda_0"] == pytest.approx(18.0, rel=1e-9)
    assert p32["gd_vs_newton_rel_err"] < 1e-10
    assert p32["newton_step_size"] == pytest.approx(18.0 * r["settings"]["LR"])
    # Propositions 3.5 / C.3: after one teleport the optimality ratio stays 1; without, it stays below
    p35 = r["prop_3_5"]
    assert p35["max_abs_ratio_minus_1_after_teleport_until_target"] < 1e-6
    assert p35["max_ratio_no_teleport"] < 0.8
    ratio_t = np.array(r["curves"]["teleport"]["ratio"], dtype=float)
    k = r["teleport"]["step"] + 1
    loss_t = np.array(r["curves"]["teleport"]["loss"], dtype=float)
    live = loss_t[k:] >= 1e-6
    assert np.all(np.abs(ratio_t[k:][live] - 1) < 1e-6) and np.all(ratio_t[:k] < 0.8)
    # Theorem 3.1 in spirit: the teleport run reaches 1e-6 sooner
    t31 = r["theorem_3_1"]
    assert t31["steps_to_target_teleport"] < t31["steps_to_target_no_teleport"]
    assert t31 == results[name]["theorem_3_1"]


def test_known_step_counts(quick):
    # x^2 + 9y^2 from (10, 0.1), lr 0.05: without teleport f ~ 100 * 0.81^t (x shrinks by 1 - 2 lr = 0.9),
    # 1e-6 after ceil(log(1e-8) / log(0.81)) = 88 steps; after the teleport the iterate is on the y-axis
    # and f shrinks by (1 - 18 lr)^2 = 0.01 a step
    t31 = quick[1]["x2_9y2"]["theorem_3_1"]
    assert t31["steps_to_target_no_teleport"] == math.ceil(math.log(1e-8) / math.log(0.81)) == 88
    assert t31["steps_to_target_teleport"] == 9


def test_overrides_reach_the_run(tmp_path):
    # x^2 + 9y^2 from (10, 0.1): grad f = (2x, 18y), so one GD step at lr 0.02 gives x = 10 - 0.4;
    # 30 steps with the teleport before step 2 make a path of 32 points (the teleport adds one)
    argv = ["--functions=['x2_9y2']", "--lr=0.02", "--steps=30", "--teleport-step=2", "--contour-grid=20",
            "--fig-dpi=20", f"--out-dir={tmp_path}"]
    results = tq.main(resolve(tq, argv))
    assert list(results) == ["x2_9y2"] and not (tmp_path / "results/quadratic/booth.json").exists()
    r = load_json(tmp_path / "results/quadratic/x2_9y2.json")
    assert r["config"]["LR"] == r["settings"]["LR"] == 0.02 and r["config"]["START"] == [10.0, 0.1]
    base, tele = r["curves"]["baseline"], r["curves"]["teleport"]
    assert len(base["x"]) == 31 and len(tele["x"]) == 32 and r["teleport"]["step"] == 2
    assert base["x"][1] == pytest.approx(10 - 0.02 * 20) and base["y"][1] == pytest.approx(0.1 * (1 - 0.02 * 18))
    assert r["prop_3_2"]["newton_step_size"] == pytest.approx(0.02 * 18)
    # a START given on the command line wins over the preset
    tq.main(resolve(tq, argv + ["--functions=['booth']", "--start=(2.0, 1.0)"]))
    assert load_json(tmp_path / "results/quadratic/booth.json")["curves"]["baseline"]["x"][0] == 2.0


@pytest.mark.parametrize("argv,match", [(["--functions=['rosenbrock']"], "unknown function 'rosenbrock'"),
                                        (["--lr=-0.1"], "LR must be > 0"),
                                        (["--lr=0.2"], "LR must be < 2/lambda_max"),
                                        (["--start=(1.0,)"], "START must be a pair"),
                                        (["--functions=['booth']", "--start=(1.0, 3.0)"], "is the minimiser of booth"),
                                        (["--teleport-step=500"], "TELEPORT_STEP must be <= STEPS")])
def test_bad_input_is_a_usage_error(tmp_path, argv, match):
    with pytest.raises(UsageError, match=match):
        tq.main(resolve(tq, argv + [f"--out-dir={tmp_path}"]))


@pytest.mark.slow
@pytest.mark.parametrize("script", ["teleport_quadratic.py", "curvature_displacement.py"])
def test_scripts_smoke_as_subprocess(tmp_path, script):
    import subprocess
    import sys
    root = __import__("os").path.dirname(__import__("os").path.dirname(__file__))
    ok = subprocess.run([sys.executable, script, "--quick", f"--out-dir={tmp_path}"], cwd=root, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, script, "--no-such-option=1"], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown setting")
