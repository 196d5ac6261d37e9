"""Section 3 on convex quadratics: the SO(2) actions of x^2 + 9y^2 and Booth, the teleport by gradient
ascent on the angle, Proposition 3.2 (eigenvector / damped Newton), Propositions 3.5 and C.3 (one
teleport suffices) and Theorem 3.1 (faster convergence), through teleport_quadratic.py --quick;
divergence beyond 2/lambda_max as a result; outputs replaced only as a complete set of the same protocol."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import teleport_quadratic as tq
from lib.config import UsageError, resolve, run, with_preset
from lib.quadratic import (FUNCTIONS, descend, grad, hessian, loss, max_grad_norm_sq, newton_check, optimal_angle,
                           optimality_ratio, so2_action, steps_to, teleport, teleport_angle, wrap_half_turn)
from lib.io import check_replace, load_json
from conftest import interrupted

T = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
NAMES = list(FUNCTIONS)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strict_json(path):
    """Load a JSON file refusing the non-standard NaN / Infinity tokens."""
    def refuse(token):
        raise ValueError(f"{path}: non-standard JSON token {token}")
    with open(path) as fh:
        return json.load(fh, parse_constant=refuse)


def snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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


def test_descend_records_the_teleport_jump_in_path_and_steps():
    # x^2 + 9y^2 from (10, 0.1), lr 0.05: grad f = (2x, 18y), so x shrinks by 0.9 and y by 0.1 a step
    q = FUNCTIONS["x2_9y2"]
    base, sb, none = descend(q, (10.0, 0.1), 0.05, 10)
    assert none is None and base.shape == (11, 2) and sb.tolist() == list(range(11))
    assert torch.allclose(base[1], T([9.0, 0.01]))
    tele, st, rec = descend(q, (10.0, 0.1), 0.05, 10, teleport_step=3, ascent=(0.5, 500, 1e-13))
    assert tele.shape == (12, 2) and st.tolist() == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10]
    assert torch.equal(tele[:4], base[:4]) and rec["step"] == 3          # the same GD until the jump
    assert rec["w_before"] == tele[3].tolist() and rec["w_after"] == tele[4].tolist()
    assert loss(q, tele[4]).item() == pytest.approx(loss(q, tele[3]).item(), rel=1e-12)
    assert loss(q, tele[-1]).item() < 1e-10 * loss(q, base[-1]).item()  # the steep direction contracts by 0.1


@pytest.mark.parametrize("name", NAMES)
def test_ratio_is_one_after_the_teleport_and_gd_is_a_damped_newton_step(name):
    # Propositions 3.5 / C.3: after one teleport the optimality ratio stays 1 along GD;
    # Proposition 3.2: there grad f is a Hessian eigenvector (lambda_0 = 18) and GD = damped Newton
    q, lr = FUNCTIONS[name], 0.02
    path, _, rec = descend(q, (4.0, -2.0), lr, 20, teleport_step=2)
    ratio = optimality_ratio(q, path)
    assert (ratio[:3] < 0.99).all() and (ratio[3:] - 1).abs().max() < 1e-12
    p32 = newton_check(q, path[3], lr)
    assert p32["angle_grad_Hgrad_rad"] < 1e-12 and p32["lambda_0"] == pytest.approx(18.0)
    assert p32["gd_vs_newton_rel_err"] < 1e-12 and p32["newton_step_size"] == pytest.approx(18 * lr)
    off = newton_check(q, path[0], lr)  # before the teleport grad f is no eigenvector
    assert off["angle_grad_Hgrad_rad"] > 0.05 and off["gd_vs_newton_rel_err"] > 0.05


def test_ratio_on_the_flat_axis_is_one_third():
    # x^2 + 9y^2 at (x, 0): ||grad f|| = 2|x| while the level set's maximum is 6|x|
    assert optimality_ratio(FUNCTIONS["x2_9y2"], T([[2.0, 0.0], [-5.0, 0.0]])).tolist() == pytest.approx([1 / 3] * 2)


def test_teleport_skips_a_non_finite_point_and_steps_to_finds_the_first_hit():
    w = T([1e200, 1e200])
    same, rec = teleport(FUNCTIONS["booth"], w)
    assert same is w and "skipped" in rec and "theta" not in rec
    assert steps_to([5.0, 1.0, 0.5, 0.1], 0.5, np.array([0, 1, 1, 2])) == 1
    assert steps_to([5.0, 1.0], 0.5, np.array([0, 1])) is None


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
                                        (["--functions=[]"], "FUNCTIONS is empty"),
                                        (["--lr=-0.1"], "LR must be a finite number > 0, got -0.1"),
                                        (["--lr=abc"], "LR must be a finite number > 0, got 'abc'"),
                                        (["--start=(1.0,)"], "START must be a pair"),
                                        (["--start=('a', 1.0)"], "START must be a pair of numbers"),
                                        (["--contour-grid=1"], "CONTOUR_GRID must be >= 2"),
                                        (["--functions=['booth']", "--start=(1.0, 3.0)"], "is the minimiser of booth"),
                                        (["--teleport-step=500"], r"TELEPORT_STEP must be a whole number of steps in \[0, STEPS = 120\]")])
def test_bad_input_is_a_usage_error(tmp_path, argv, match):
    with pytest.raises(UsageError, match=match):
        tq.main(resolve(tq, argv + [f"--out-dir={tmp_path}"]))


def test_divergence_is_a_result(tmp_path, capsys):
    # lr 1 > 2/18: x^2 + 9y^2 from (10, 0.1) gives x = 10 (-1)^t, y = 0.1 (-17)^t, f = 100 + 0.09 * 289^t,
    # which passes 1e6 f(start) at step 4 (before the teleport at step 5, which happens all the same)
    tq.main(resolve(tq, ["--functions=x2_9y2", "--lr=1.0", "--quick", "--fig-dpi=20", "--contour-grid=20", f"--out-dir={tmp_path}"]))
    printed = capsys.readouterr().out
    r = strict_json(tmp_path / "results/quadratic/x2_9y2.json")
    at = next(t for t in range(100) if 100 + 0.09 * 289 ** t > 1e6 * 100.09)
    assert at == 4 and r["divergence"]["diverged_at_step_no_teleport"] == r["divergence"]["diverged_at_step_teleport"] == 4
    assert r["divergence"]["lr_times_lambda_max"] == pytest.approx(18.0)
    assert r["theorem_3_1"] == {"steps_to_target_no_teleport": None, "steps_to_target_teleport": None}
    assert r["prop_3_2"] is None and r["prop_3_5"]["max_abs_ratio_minus_1_after_teleport_until_target"] is None
    for fig in ("trajectories", "loss", "optimality"):
        assert (tmp_path / f"figures/quadratic/x2_9y2_{fig}.png").stat().st_size > 3000
    thm = next(line for line in printed.splitlines() if line.startswith("Thm 3.1"))
    assert thm.count("never: diverged at step 4") == 2  # no step count from a diverged run
    assert "Prop 3.2" not in printed and "GD diverges along the top Hessian eigenvector" in printed


def test_absurd_lr_overflows_to_null_and_skips_the_teleport(tmp_path):
    # lr 1e100: the loss passes 1e6 f(start) at step 1 and overflows at step 3; the teleport before
    # step 5 meets a non-finite point and is skipped; the JSON stays strict (null) and redraws
    tq.main(resolve(tq, ["--functions=x2_9y2", "--lr=1e100", "--quick", "--fig-dpi=20", "--contour-grid=20", f"--out-dir={tmp_path}"]))
    r = strict_json(tmp_path / "results/quadratic/x2_9y2.json")
    assert "skipped" in r["teleport"] and r["theta_error_rad"] is None
    assert r["divergence"]["diverged_at_step_no_teleport"] == 1
    loss = r["curves"]["baseline"]["loss"]
    assert loss[0] == pytest.approx(100.09) and None in loss and len(loss) == 121
    (c, at), = [tq.shown(r)["baseline"]]           # the reading side: null -> nan, cut at the divergence
    assert at == 1 and len(c["loss"]) == 1 and np.isnan(np.asarray(loss, dtype=float)).any()
    tq.plot_curves(FUNCTIONS["x2_9y2"], r, str(tmp_path), 20, 1e-6, 120)


def test_committed_results_are_strict_json_and_only_their_protocol_replaces_them(tmp_path):
    (tmp_path / "results" / "quadratic").mkdir(parents=True)
    for name in NAMES:
        path = os.path.join(ROOT, "results", "quadratic", f"{name}.json")
        saved = strict_json(path)
        assert saved["environment"].get("git_commit") and saved["config"]["FUNCTION"] == name
        # the plain command's settings are the committed protocol: it may replace them
        check_replace(path, tq.saved_config(with_preset(resolve(tq, []), tq.PRESETS, "FUNCTION", name), name))
        shutil.copy(path, tmp_path / "results" / "quadratic")
    before = snapshot(tmp_path)
    for argv, diff in [(["--lr=0.02"], "LR=0.02 .saved: 0.05."), (["--functions=booth", "--steps=60"], "STEPS=60")]:
        with pytest.raises(UsageError, match=f"other settings: {diff}.*--replace"):
            tq.main(resolve(tq, argv + [f"--out-dir={tmp_path}"]))
    assert snapshot(tmp_path) == before
    fcfg = with_preset(resolve(tq, ["--lr=0.02", "--replace"]), tq.PRESETS, "FUNCTION", "booth")
    check_replace(tmp_path / "results/quadratic/booth.json", tq.saved_config(fcfg, "booth"))  # --replace: allowed


def test_ctrl_c_is_one_line_and_keeps_the_previous_set(quick, tmp_path, monkeypatch, capsys):
    shutil.copytree(quick[0], tmp_path, dirs_exist_ok=True)
    before = snapshot(tmp_path)
    plot_curves = tq.plot_curves

    def interrupt_at_booth(q, *args):  # x2_9y2's outputs are written (to the stage) by then
        if q.name == "booth":
            raise KeyboardInterrupt
        plot_curves(q, *args)
    monkeypatch.setattr(tq, "plot_curves", interrupt_at_booth)
    err = interrupted(capsys, tq, ["--quick", f"--out-dir={tmp_path}"]).strip()
    assert "\n" not in err and err.startswith("interrupted:") and "unchanged" in err
    assert snapshot(tmp_path) == before and not list(tmp_path.glob(".staging-*"))


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
