"""The config contract, for every script: the fenced block is the only source of options, every
fenced name reaches the resolved config the run reads (never the module global behind its back),
--quick never writes into the committed folders, --help lists the settings and the outputs, and
an unknown or mistyped name is a one-line error that suggests the close names."""
import ast
import glob
import importlib.util
import os

import pytest

from lib.config import QUICK_OUT_DIR, UsageError, fenced_settings, help_text, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(p for p in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py"))
                 if os.path.relpath(p, ROOT).split(os.sep)[0] not in ("lib", "tests", "benchmarks")
                 and not os.path.basename(p).startswith("_"))
IDS = [os.path.relpath(p, ROOT) for p in SCRIPTS]


# settings that a lib function reads from the config the script hands it
LIB_READERS = {"REPLACE": ("check_replace", "check_replace_set"), "CHECKPOINT_S": ("Checkpoint",),
               **{k: ("run_set",) for k in ("DATASET", "OUT_DIR", "PLOT_ONLY", "OPTIMIZERS_RUN")}}


def load_script(path):
    name = "script_" + os.path.relpath(path, ROOT).replace(os.sep, "_").replace("-", "_")[:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def changed(value, preset_values=()):
    """A value of the same type as `value` that differs from it (and from any preset)."""
    if value is None:
        value = next(iter(preset_values), 7)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.5
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, (list, tuple)):
        return list(value[:1]) if len(value) > 1 else list(value) * 2 or [1]
    if isinstance(value, dict):
        return {k: changed(v) for k, v in value.items()} or {"a": 1}
    raise TypeError(type(value))


def fence_lines(path):
    lines = open(path).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# ---- config"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("# ----"))
    return start + 1, end + 1  # 1-based, exclusive of the markers


@pytest.mark.parametrize("path", SCRIPTS, ids=IDS)
def test_every_fenced_name_is_read_through_the_config(path):
    settings = fenced_settings(path)
    assert settings, "a script has at least one setting"
    start, end = fence_lines(path)
    tree = ast.parse(open(path).read())
    behind = sorted({f"{n.id} (line {n.lineno})" for n in ast.walk(tree)
                     if isinstance(n, ast.Name) and n.id in settings and isinstance(n.ctx, ast.Load)
                     and not start < n.lineno < end})
    assert not behind, f"module globals read behind the config's back: {behind}"
    keys = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and not start < n.lineno < end}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    keys |= {k for k, readers in LIB_READERS.items() if names & set(readers)}  # read by a lib function
    unread = sorted(set(settings) - keys)
    assert not unread, f"fenced settings the run never reads: {unread}"
    for name, (_, comment) in settings.items():
        assert comment, f"{name} has no trailing comment"


@pytest.mark.parametrize("path", SCRIPTS, ids=IDS)
def test_every_override_reaches_the_resolved_config(path):
    module = load_script(path)
    settings = fenced_settings(path)
    presets = getattr(module, "PRESETS", None) or {}
    assert set(resolve(module)) == set(settings) | {"QUICK"}
    for name, (default, _) in settings.items():
        preset_values = [t[name] for sel in presets.values() for t in sel.values() if name in t]
        value = changed(default, preset_values)
        if name in presets:  # a preset selector: another of its choices
            value = next(c for c in presets[name] if c != default)
        elif name == "DEVICE":  # a device that exists here
            value = "cpu:0" if default == "cpu" else "cpu"
        text = value if isinstance(value, str) else repr(value)
        cfg = resolve(module, [f"--{name.lower().replace('_', '-')}={text}"])
        assert cfg[name] == value, name
        for selector, table in presets.items():  # a preset never overrides the user's value
            from lib.config import with_preset
            for choice in table:
                assert with_preset(cfg, presets, selector, choice)[name] == value, (name, choice)


@pytest.mark.parametrize("path", SCRIPTS, ids=IDS)
def test_unknown_name_is_one_line_with_suggestions(path):
    module = load_script(path)
    name = next(iter(fenced_settings(path))).lower()
    with pytest.raises(UsageError) as e:
        resolve(module, [f"--{name}x=1"])
    assert "\n" not in str(e.value) and f"did you mean --{name.replace('_', '-')}" in str(e.value)


@pytest.mark.parametrize("path", SCRIPTS, ids=IDS)
def test_help_lists_settings_and_outputs(path):
    module = load_script(path)
    text = help_text(vars(module), getattr(module, "QUICK_SETTINGS", None), getattr(module, "PRESETS", None))
    for name in fenced_settings(path):
        assert f"--{name.lower().replace('_', '-')}=" in text
    assert "Outputs:" in text


@pytest.mark.parametrize("path", SCRIPTS, ids=IDS)
def test_quick_writes_outside_the_committed_folders(path):
    module = load_script(path)
    cfg = resolve(module, ["--quick"])
    if "OUT_DIR" in cfg:
        assert cfg["OUT_DIR"] == QUICK_OUT_DIR
        assert resolve(module, ["--quick", "--out-dir=elsewhere"])["OUT_DIR"] == "elsewhere"
