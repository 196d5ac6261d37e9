"""Result files: strict JSON with the config and the environment that made them, text and
tensors, all written atomically (a temporary file renamed into place); `--plot-only` loading."""
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile

from lib.config import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(str(path))[1])
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a result file gets ordinary permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _git(*args):
    try:
        out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment():
    """Where and with what a result was made: date, git commit (and whether the tree was dirty),
    versions of python and the packages, platform, GPU, threads."""
    import numpy
    import torch
    from importlib import metadata
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("torchvision", "scipy", "matplotlib"):
        try:
            versions[name] = metadata.version(name)  # without importing it (torchvision: seconds)
        except metadata.PackageNotFoundError:
            versions[name] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
            **versions, "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads()}


def _clean(x):
    """JSON-ready: tensors and arrays as lists, non-finite floats as null (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "tolist"):
        return _clean(x.tolist())
    return x


def save_json(path, obj):
    """Write obj (tensors/arrays as lists, nan and inf as null) to path atomically, strict JSON."""
    text = json.dumps(_clean(obj), indent=1, allow_nan=False)
    return save_text(path, text + "\n")


def load_json(path):
    with open(path) as fh:
        return json.load(fh)


def load_results(path):
    """A saved results JSON for --plot-only; missing: one line saying how to make it."""
    if not os.path.exists(path):
        raise UsageError(f"--plot-only: no saved results at {path}; run once without --plot-only first")
    try:
        return load_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--plot-only: {path} is not valid JSON ({e}); run without --plot-only") from None


def save_text(path, text):
    """Write a text file (a Markdown table, a CSV) atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
    return path


def save_tensors(path, tensors):
    """Save a dict of plain tensors atomically; load back with load_tensors (weights_only)."""
    import torch
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp)
    return path


def load_tensors(path, device="cpu"):
    import torch
    return torch.load(path, map_location=device, weights_only=True)


def relative(path):
    """A path as saved in a config: relative to the repository where it lies inside it."""
    full = os.path.abspath(path)
    return os.path.relpath(full, REPO) if full.startswith(REPO + os.sep) or full == REPO else path


EXPERIMENTS = ("optimization", "generalization", "correlation", "quadratic", "curvature", "rescaling", "cnn",
               "invariance")


def experiment_dirs(experiment, root="."):
    """figures/<experiment>/ and results/<experiment>/ under root, created if missing."""
    dirs = tuple(os.path.join(root, kind, experiment) for kind in ("figures", "results"))
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    return dirs


@contextlib.contextmanager
def staged(root):
    """Yield a staging folder inside `root` to write a run's whole set of outputs into; when the
    block completes, move every file to the same place under `root` (replacing the previous
    ones); when it fails or is interrupted, discard the staging folder: the previous complete
    set stays in place."""
    try:
        os.makedirs(root, exist_ok=True)
        stage = tempfile.mkdtemp(dir=root, prefix=".staging-")
    except OSError as e:
        raise UsageError(f"--out-dir={root}: cannot write there ({e.strerror})") from None
    try:
        yield stage
        for folder, _, files in os.walk(stage):
            dest = os.path.join(root, os.path.relpath(folder, stage))
            os.makedirs(dest, exist_ok=True)
            for f in files:
                os.replace(os.path.join(folder, f), os.path.join(dest, f))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def saved_config(cfg):
    """A resolved config as results record it: OUT_DIR and DATA_DIR relative to the repository."""
    return {**cfg, "OUT_DIR": relative(cfg["OUT_DIR"]), "DATA_DIR": relative(cfg["DATA_DIR"])}


def check_replace_set(configs, path, cfg, data=None):
    """check_replace for a script's set: one results file per choice (configs: {choice: its
    resolved config}, at path(choice)) and, before the data are loaded (data=None), the summary
    at path("summary") with the script's config `cfg`."""
    for choice, ccfg in configs.items():
        check_replace(path(choice), saved_config(ccfg), data=data)
    if data is None:
        check_replace(path("summary"), saved_config(cfg))


def load_set(path, choices):
    """--plot-only for a script with one results file per choice (optimizer) at path(choice):
    the saved records, and the config they were made with (for the tables)."""
    saved = {c: load_results(path(c)) for c in choices}
    return saved, {**next(iter(saved.values()))["config"], "PLOT_ONLY": True}


def save_set(root, experiment, tag, saved, plot, summarize, run_cfg, write=True):
    """Write such a script's outputs as one staged set under `root`: per choice its record
    (<tag>_<choice>.json) and plot(choice, record, figure stem); then the summary,
    (md, fields) = summarize(), printed and saved as <tag>_summary.{json,md}. write=False
    (--plot-only): figures and the printed summary only. Returns the summary's fields."""
    with staged(root) as out:
        fig_dir, res_dir = experiment_dirs(experiment, out)
        for choice, record in saved.items():
            if write:
                save_json(os.path.join(res_dir, f"{tag}_{choice}.json"), record)
            plot(choice, record, os.path.join(fig_dir, f"{tag}_{choice}"))
        md, fields = summarize()
        print("\n" + md)
        if write:
            save_json(os.path.join(res_dir, f"{tag}_summary.json"),
                      {"config": run_cfg, "environment": environment(), **fields})
            save_text(os.path.join(res_dir, f"{tag}_summary.md"), md)
    return fields


def run_set(cfg, experiment, train_all, plot, summarize):
    """The main() of a script with one results file per optimizer under results/<experiment>/
    (teleport_optimization, teleport_cnn): train_all(path) -> (records {optimizer: record},
    lib.progress.Checkpoint), or with PLOT_ONLY the saved records (load_set); then save_set (the
    previous outputs replaced only when all new ones are written; figures only with PLOT_ONLY),
    summarize(run config, {optimizer: arms}) -> (md, fields), and the checkpoint finished.
    Returns {optimizer: arms}."""
    tag, plot_only = cfg["DATASET"], cfg["PLOT_ONLY"]
    path = lambda name: os.path.join(cfg["OUT_DIR"], "results", experiment, f"{tag}_{name}.json")  # noqa: E731
    if plot_only:  # the tables use the config the results were made with
        saved, run_cfg = load_set(path, cfg["OPTIMIZERS_RUN"])
    else:
        (saved, ckpt), run_cfg = train_all(path), saved_config(cfg)
    arms = {opt: s["arms"] for opt, s in saved.items()}
    save_set(cfg["OUT_DIR"], experiment, tag, saved, plot, lambda: summarize(run_cfg, arms), run_cfg,
             write=not plot_only)
    if not plot_only:
        ckpt.finish()
    return arms


def check_replace(path, cfg, ignore=(), data=None):
    """Refuse (one line) to replace a results file made with other settings, unless REPLACE:
    only a run of the same protocol replaces saved results. Plumbing settings (and `ignore`:
    modes that recompute the same protocol, e.g. from saved weights) are not compared; given
    `data` (lib.data.Data), results made on other data sizes (the full MNIST against the
    bundled subset) are refused too."""
    from lib.config import QUICK_OUT_DIR
    from lib.progress import PLUMBING
    if cfg.get("REPLACE") or not os.path.exists(path):
        return
    if cfg.get("QUICK") and os.path.normpath(str(cfg.get("OUT_DIR"))) == QUICK_OUT_DIR:
        return  # quick runs in runs/quick/ are throwaway smoke runs: any settings replace them
    try:
        whole = load_json(path)
        saved = whole.get("config", {})
    except (OSError, ValueError, AttributeError):
        return  # unreadable: nothing worth keeping
    was = whole.get("data") or {}
    if data is not None and [was.get(k) for k in ("n_train", "n_test")] != [data.info["n_train"], data.info["n_test"]]:
        if "n_train" in was:
            raise UsageError(f"{path} holds results made on {was['n_train']:,}/{was['n_test']:,} training/test "
                             f"images, this run has {data.info['n_train']:,}/{data.info['n_test']:,}; --out-dir=DIR "
                             f"writes elsewhere, --replace replaces them")
    cfg = _clean(cfg)  # as it would be saved: tuples as lists, non-finite floats as null
    diff = sorted(k for k in set(saved) | set(cfg)
                  if k not in PLUMBING and k not in ignore and saved.get(k) != cfg.get(k))
    if diff:
        shown = ", ".join(f"{k}={cfg.get(k)!r} (saved: {saved.get(k)!r})" for k in diff[:3])
        raise UsageError(f"{path} holds results made with other settings: {shown}; --out-dir=DIR writes "
                         f"elsewhere, --replace replaces them")
