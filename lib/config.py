"""Script plumbing: the fenced config block, presets, `--NAME=value`, `--help`, one-line errors.

The contract every script follows:

- A script's settings are the UPPER_CASE assignments of literals between a line that starts with
  `# ---- config` and the next line that starts with `# ----` (the fence). Each carries a trailing
  comment: meaning, unit, allowed values; comment lines right below a setting continue it. Only
  fenced names are options; nothing outside the fence is.
- `PRESETS` (beside the fence, optional) holds per-dataset or per-optimizer values:
  {SELECTOR: {choice: {NAME: value}}}. A fenced setting whose value is None takes the preset of
  the chosen dataset/optimizer; any other value (edited in the file or given on the command
  line) wins. Where SELECTOR is a fenced scalar setting (e.g. DATASET) `configure` applies it;
  a script that runs several choices in one go (e.g. four optimizers) calls `with_preset`.
- `QUICK_SETTINGS` (optional): the values `--quick` sets, before the user's own overrides.
  `--quick` without `--out-dir` writes under runs/quick/ (git-ignored), never into the
  committed figures/ and results/.
- `--help` is generated from the fence (names, defaults, comments, presets) and the docstring's
  "Outputs:" paragraph.
"""
import ast
import difflib
import io
import os
import sys
import tokenize

FENCE_OPEN, FENCE_CLOSE = "# ---- config", "# ----"
QUICK_OUT_DIR = os.path.join("runs", "quick")


class UsageError(Exception):
    """Bad input from the command line, the config or the environment: printed as one line,
    exit status 2."""


def fenced_settings(path):
    """{NAME: (default, comment)} of the fenced config block of the script at `path`, in order."""
    with open(path) as fh:
        lines = fh.read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(FENCE_OPEN)), None)
    if start is None:
        raise ValueError(f"{path}: no '{FENCE_OPEN}' line")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(FENCE_CLOSE))
    block = "\n".join(lines[start + 1:end]) + "\n"
    comments = {t.start[0]: t.string.lstrip("# ").rstrip() for t in
                tokenize.generate_tokens(io.StringIO(block).readline) if t.type == tokenize.COMMENT}
    out, last = {}, None
    nodes = {n.lineno: n for n in ast.parse(block).body}
    for no in range(1, end - start):
        node = nodes.get(no)
        if node is not None:
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper()):
                raise ValueError(f"{path}:{start + no + 1}: only NAME = literal belongs in the config fence")
            last = node.targets[0].id
            out[last] = [ast.literal_eval(node.value), comments.get(node.end_lineno, "")]
        elif last is not None and no in comments and lines[start + no].lstrip().startswith("#"):
            out[last][1] += " " + comments[no]
    return {k: tuple(v) for k, v in out.items()}


def _parse(name, text, default):
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        bare = text.replace("_", "").replace("-", "").replace(",", "").replace(".", "").isalnum()
        if bare and isinstance(default, list):
            return text.split(",")  # --optimizers=sgd,adam: a list of words
        if default is None:
            return text  # a None setting (filled by a preset, or a path) given words: a string
        raise UsageError(f"--{name}: cannot parse {text!r} as a {type(default).__name__}") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if default is not None and not isinstance(value, type(default)):
        if not (isinstance(default, (list, tuple)) and isinstance(value, (list, tuple))):
            raise UsageError(f"--{name}: expected a {type(default).__name__}, got {text!r}")
    return value


def _unknown(arg, names):
    word = arg.partition("=")[0].lstrip("-").replace("-", "_").lower()
    lower = [n.lower() for n in names]
    close = difflib.get_close_matches(word, lower, n=3, cutoff=0.5)
    close += [n for n in lower if n not in close and len(n) > 1 and (n in word or word in n)][:3 - len(close)]
    hint = f"; did you mean {', '.join('--' + c.replace('_', '-') for c in close)}?" if close else ""
    return UsageError(f"unknown setting {arg!r}{hint} (--help lists them)")


def with_preset(cfg, presets, selector, choice):
    """cfg with presets[selector][choice] filled in where cfg holds None: presets first, then the
    user's values. An unknown choice is a UsageError naming the known ones."""
    table = presets.get(selector, {})
    check_choice(selector.lower(), choice, table)
    return {**cfg, **{k: v for k, v in table[choice].items() if cfg.get(k) is None}}


def configure(defaults, argv=None, quick=None, presets=None):
    """Resolve a script's config. `defaults`: the script's globals (its fence is parsed from
    `__file__`) or a plain {NAME: value} dict. Order: defaults, then `quick` (with --quick),
    then every --NAME=value (case-insensitive, '-' for '_'; a bare --NAME sets True), then the
    presets of fenced scalar selectors. Returns the resolved dict, which is what the run reads
    and what is saved with its results."""
    if "__file__" in defaults:
        cfg = {k: defaults[k] for k in fenced_settings(defaults["__file__"])}
    else:
        cfg = {k: v for k, v in defaults.items() if k.isupper()}
    cfg.setdefault("QUICK", False)
    overrides = {}
    for arg in sys.argv[1:] if argv is None else argv:
        flag, given, text = arg.partition("=")
        name = flag.lstrip("-").replace("-", "_").upper()
        if not arg.startswith("--") or name not in cfg:
            raise _unknown(arg, cfg)
        overrides[name] = _parse(name.lower(), text, cfg[name]) if given else True  # --flag: True
    if overrides.get("QUICK"):
        cfg.update(quick or {})
        if "OUT_DIR" in cfg:
            cfg["OUT_DIR"] = QUICK_OUT_DIR
    cfg.update(overrides)
    for selector in presets or {}:
        if selector in cfg and not isinstance(cfg[selector], (list, tuple, dict)):
            cfg = with_preset(cfg, presets, selector, cfg[selector])
    if "DEVICE" in cfg:
        cfg["DEVICE"] = check_device(cfg["DEVICE"])
    return cfg


def check_device(name):
    """'auto' -> cuda if available else cpu; an unknown or unavailable device is a UsageError."""
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device: unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device={name}: no CUDA GPU is available here; use --device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device={name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device={name}: only cpu and cuda are supported")
    return name


def check_choice(name, value, choices):
    if value not in choices:
        raise UsageError(f"unknown {name} {value!r}; known: {', '.join(map(str, choices))}")


def check_positive(name, value, allow_zero=True):
    if not (value >= 0 if allow_zero else value > 0):
        raise UsageError(f"{name} must be {'>=' if allow_zero else '>'} 0, got {value}")


def help_text(defaults, quick=None, presets=None):
    """--help: the docstring's first paragraph, every fenced setting with its default and comment
    (and its presets), what --quick changes, and the docstring's "Outputs:" paragraph."""
    doc = (defaults.get("__doc__") or "").strip().split("\n\n")
    script = os.path.basename(defaults["__file__"])
    lines = [doc[0], "", f"usage: python {script} [--quick] [--NAME=value ...]", "", "settings:"]
    preset_of = {k: (sel, table) for sel, t in (presets or {}).items()
                 for table in [t] for choice in t.values() for k in choice}
    for name, (default, comment) in fenced_settings(defaults["__file__"]).items():
        lines.append(f"  --{name.lower().replace('_', '-')}={default!r}")
        lines.append(f"      {comment}")
        if name in preset_of:
            sel, table = preset_of[name]
            vals = ", ".join(f"{c}: {v[name]!r}" for c, v in table.items() if name in v)
            lines.append(f"      None takes the preset for {sel}: {vals}")
    if quick:
        lines += ["", "--quick sets: " + ", ".join(f"{k}={v!r}" for k, v in quick.items())
                  + f"; and writes under {QUICK_OUT_DIR}/ unless --out-dir is given"]
    outputs = [p for p in doc if p.lstrip().startswith("Outputs:")]
    lines += ["", *(p.strip() for p in outputs)]
    return "\n".join(lines)


def resolve(module, argv=None):
    """The resolved config of a script module, as its run would see it (for tests)."""
    g = vars(module)
    return configure(g, argv or [], g.get("QUICK_SETTINGS"), g.get("PRESETS"))


def run(main, defaults, argv=None, on_interrupt=None):
    """Resolve the config of the script whose globals are `defaults` (its QUICK_SETTINGS and
    PRESETS too) and call main(cfg). --help prints the settings. A UsageError exits with one
    line and status 2; Ctrl-C with one line (what progress was saved and the command that
    resumes, or on_interrupt(cfg)'s words) and status 130."""
    argv = sys.argv[1:] if argv is None else argv
    quick, presets = defaults.get("QUICK_SETTINGS"), defaults.get("PRESETS")
    if "-h" in argv or "--help" in argv:
        print(help_text(defaults, quick, presets))
        return None
    cfg = None
    try:
        cfg = configure(defaults, argv, quick, presets)
        return main(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        from lib.progress import interrupt_message
        said = on_interrupt(cfg) if (on_interrupt and cfg is not None) else interrupt_message()
        print(f"interrupted: {said}; the previous outputs are unchanged", file=sys.stderr)
        sys.exit(130)
