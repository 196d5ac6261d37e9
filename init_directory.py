"""Create data/, figures/<experiment>/ and results/<experiment>/ (idempotent).

    python init_directory.py

Optional: every script creates the folders it writes to, so forgetting this never crashes a run.
"""
import os

from lib.results import EXPERIMENTS, experiment_dirs

if __name__ == "__main__":
    os.makedirs("data", exist_ok=True)
    for name in EXPERIMENTS:
        experiment_dirs(name)
    print("created data/ and figures/, results/ for:", ", ".join(EXPERIMENTS))
