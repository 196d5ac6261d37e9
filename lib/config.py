"""Script plumbing: UPPER_CASE globals overridden by `--NAME=value`, `--quick`, one-line errors."""
import ast
import sys


class UsageError(Exception):
    """Bad input from the command line or config: printed as one line, exit status 2."""


FLAGS = {"--quick": ("QUICK", True), "--data-dir": ("DATA_DIR", None), "--device": ("DEVICE", None)}


def _parse(name, text, default):
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UsageError(f"--{name}: cannot parse {text!r} as a {type(default).__name__}") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if default is not None and not isinstance(value, type(default)):
        raise UsageError(f"--{name}: expected a {type(default).__name__}, got {text!r}")
    return value


def _from_lib(name, value):
    """True for a constant a script imported from lib (e.g. lib.results.COLORS): not an option."""
    if isinstance(value, (bool, int, float, type(None))):
        return False  # such values are shared objects: identity says nothing
    return any(name in vars(m) and vars(m)[name] is value for n, m in list(sys.modules.items())
               if n.startswith("lib.") and m is not None)


def configure(defaults, argv=None, quick=None):
    """Resolve a script's config: the UPPER_CASE entries of `defaults` (the script's globals),
    then `quick` (a dict of scaled-down values) if --quick is given, then every --NAME=value
    (case-insensitive, '-' for '_'). Returns the resolved dict, to be saved with results."""
    cfg = {k: v for k, v in defaults.items() if k.isupper() and not k.startswith("_")
           and isinstance(v, (bool, int, float, str, list, tuple, dict, type(None)))
           and not _from_lib(k, v)}
    cfg.setdefault("QUICK", False)
    overrides = {}
    for arg in sys.argv[1:] if argv is None else argv:
        flag, _, text = arg.partition("=")
        name = FLAGS.get(flag, (flag.lstrip("-").replace("-", "_").upper(),))[0]
        if not arg.startswith("--") or name not in cfg:
            known = ", ".join(f"--{k.lower()}" for k in cfg)
            raise UsageError(f"unknown option {arg!r}; known: {known}")
        overrides[name] = _parse(name.lower(), text, cfg[name]) if text else True
    if overrides.get("QUICK"):
        cfg.update(quick or {})
    cfg.update(overrides)
    if cfg.get("DEVICE") == "auto":
        import torch
        cfg["DEVICE"] = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


def check_choice(name, value, choices):
    if value not in choices:
        raise UsageError(f"unknown {name} {value!r}; known: {', '.join(map(str, choices))}")


def check_positive(name, value, allow_zero=True):
    if not (value >= 0 if allow_zero else value > 0):
        raise UsageError(f"{name} must be {'>=' if allow_zero else '>'} 0, got {value}")


def run(main, defaults, quick=None, argv=None):
    """Resolve the config and call main(cfg); a UsageError exits with one line and status 2."""
    try:
        return main(configure(defaults, argv, quick))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
