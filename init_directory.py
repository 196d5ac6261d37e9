"""Create data/, figures/<experiment>/ and results/<experiment>/ (idempotent).

    python init_directory.py

Optional: every script creates the folders it writes to, so forgetting this never crashes a run.
It only creates folders that are missing, so it never replaces or removes anything.

Outputs: the empty folders data/, figures/<experiment>/ and results/<experiment>/ under OUT_DIR,
for every experiment in lib.io.EXPERIMENTS; no files.
"""
import os

from lib.config import UsageError, run
from lib.io import EXPERIMENTS, experiment_dirs

# ---- config -------------------------------------------------------------------------------
OUT_DIR = "."  # root under which data/, figures/ and results/ are created
# --------------------------------------------------------------------------------------------


def main(cfg):
    try:
        os.makedirs(os.path.join(cfg["OUT_DIR"], "data"), exist_ok=True)
        for name in EXPERIMENTS:
            experiment_dirs(name, cfg["OUT_DIR"])
    except OSError as e:  # a file where a folder should be, no permission, ...
        raise UsageError(f"cannot create folders under {cfg['OUT_DIR']!r}: {e.strerror} ({e.filename})") from None
    print(f"created under {cfg['OUT_DIR']}: data/ and figures/, results/ for:", ", ".join(EXPERIMENTS))


if __name__ == "__main__":
    run(main, globals())
