"""Create data/, figures/<experiment>/ and results/<experiment>/ (idempotent).

    python init_directory.py

Optional: every script creates the folders it writes to, so forgetting this never crashes a run.

Outputs: the empty folders data/, figures/<experiment>/ and results/<experiment>/ under OUT_DIR,
for every experiment in lib.io.EXPERIMENTS; no files.
"""
import os

from lib.config import run
from lib.io import EXPERIMENTS, experiment_dirs

# ---- config -------------------------------------------------------------------------------
OUT_DIR = "."  # root under which data/, figures/ and results/ are created
# --------------------------------------------------------------------------------------------


def main(cfg):
    os.makedirs(os.path.join(cfg["OUT_DIR"], "data"), exist_ok=True)
    for name in EXPERIMENTS:
        experiment_dirs(name, cfg["OUT_DIR"])
    print(f"created under {cfg['OUT_DIR']}: data/ and figures/, results/ for:", ", ".join(EXPERIMENTS))


if __name__ == "__main__":
    run(main, globals())
