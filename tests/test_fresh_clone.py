"""As a newcomer would: a fresh clone, every script's --quick, then `git status` is clean; a run
interrupted with Ctrl-C says so in one line, exits 130 and leaves the committed results as they
were. Slow (a minute per script): run with `python -m pytest -m slow tests/test_fresh_clone.py`."""
import os
import signal
import subprocess
import sys
import time

import pytest

from test_config_contract import IDS, ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    path = tmp_path_factory.mktemp("clone") / "repo"
    subprocess.run(["git", "clone", "--quiet", ROOT, str(path)], check=True)
    return path


def status(path):
    return subprocess.run(["git", "status", "--porcelain"], cwd=path, capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.parametrize("script", IDS)
def test_quick_run_leaves_the_clone_clean(clone, script):
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, script, "--quick"], cwd=clone,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert status(clone) == "", f"{script} --quick wrote into the committed tree"
    assert (clone / "runs" / "quick").is_dir()
    print(f"{script}: {time.perf_counter() - t0:.0f} s")


def test_ctrl_c_is_one_line_and_keeps_the_committed_results(clone):
    proc = subprocess.Popen([sys.executable, "teleport_optimization.py", "--progress=False", "--compile=False"],
                            cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(25)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted") and "Traceback" not in err
    assert status(clone) == ""
