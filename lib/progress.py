"""Progress of long runs: saved as they go, resumed by running the same command again.

A checkpoint is one file, OUT_DIR/.progress/<name>.pt, written atomically (a temporary file
renamed into place, so a kill at any moment leaves the previous checkpoint whole) and holding
only tensors, numbers, strings, lists and dicts: it loads with torch.load(weights_only=True).
It is keyed on the run's settings: a checkpoint made with other settings is not resumed.
"""
import hashlib
import json
import os
import sys
import time

import torch

from lib.io import atomic_path

# settings that do not change a run's numbers: a checkpoint saved under other values still resumes
PLUMBING = {"QUICK", "PROGRESS", "PLOT_ONLY", "DEVICE", "DATA_DIR", "OUT_DIR", "FIG_DPI", "THREADS",
            "CHECKPOINT_S", "REPLACE", "COMPILE"}
ACTIVE = []  # the checkpoints of the running script, for the one-line message on Ctrl-C


def settings_key(cfg):
    """A hash of the settings that change a run's numbers."""
    core = {k: v for k, v in sorted(cfg.items()) if k not in PLUMBING}
    return hashlib.sha1(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Checkpoint:
    """The progress of one run, in units (an arm, a dataset, an optimizer): `done` holds the
    results of finished units, `current` the state of the unit in progress. Saved at most every
    cfg["CHECKPOINT_S"] seconds of work (0: at every epoch) and when a unit finishes; loaded
    back when the same run is started again with the same settings."""

    def __init__(self, cfg, name):
        self.path = os.path.join(cfg["OUT_DIR"], ".progress", f"{name}.pt")
        self.key, self.every = settings_key(cfg), cfg.get("CHECKPOINT_S", 30.0)
        self.last, self.what = time.monotonic(), None
        ACTIVE.append(self)
        saved = self.load() or {}
        self.done, self.current = saved.get("done", {}), saved.get("current")

    def unit(self, name):
        """The saved result of a finished unit, or None."""
        return self.done.get(name)

    def finish_unit(self, name, result):
        """Record a finished unit's result (numbers, lists, dicts, tensors) and save at once."""
        self.done[name], self.current = result, None
        self.save({"done": self.done, "current": None}, f"{name} done", force=True)
        return result

    def fit(self, unit, W, opt, data, act, epochs, batch_size, hook=None, **kw):
        """lib.train.fit as a unit of this run: resumes it if it was in progress (weights,
        optimizer state, hook state and history restored), saves progress after epochs."""
        from lib.train import fit
        resume = None
        if self.current is not None and self.current["unit"] == unit:
            with torch.no_grad():
                for w, v in zip(W, self.current["W"]):
                    w.copy_(v)
            opt.load_state_dict(self.current["opt"])
            if hook is not None:
                hook.load_state_dict(self.current["hook"])
            resume = self.current["hist"]

        def on_epoch(hist):
            current = {"unit": unit, "W": [w.detach().cpu() for w in W], "opt": opt.state_dict(),
                       "hook": None if hook is None else hook.state_dict(), "hist": hist}
            self.save({"done": self.done, "current": current}, f"{unit}, epoch {len(hist['train_loss'])} of {epochs}")
        return fit(W, opt, data, act, epochs, batch_size, hook=hook, resume=resume, on_epoch=on_epoch, **kw)

    def load(self):
        """The saved state of this run, or None (nothing saved, other settings, unreadable)."""
        if not os.path.exists(self.path):
            return None
        try:
            saved = torch.load(self.path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any damage: start afresh, saying so
            print(f"{self.path}: unreadable ({type(e).__name__}); starting fresh", file=sys.stderr)
            return None
        if saved.get("key") != self.key:
            print(f"{self.path}: saved with other settings; starting fresh", file=sys.stderr)
            return None
        self.what = saved["what"]
        print(f"resuming from {self.path} ({self.what})", file=sys.stderr)
        return saved["state"]

    def save(self, state, what, force=False):
        """Write the checkpoint if CHECKPOINT_S seconds passed since the last one (or force)."""
        if not force and time.monotonic() - self.last < self.every:
            return False
        with atomic_path(self.path) as tmp:
            torch.save({"key": self.key, "what": what, "state": state}, tmp)
        self.last, self.what = time.monotonic(), what
        return True

    def finish(self):
        """The run completed and wrote its outputs: the checkpoint is no longer needed."""
        if os.path.exists(self.path):
            os.remove(self.path)
        if self in ACTIVE:
            ACTIVE.remove(self)


def interrupt_message(argv=None):
    """What was saved, and the command that resumes (for the line printed on Ctrl-C)."""
    saved = [c for c in ACTIVE if c.what is not None]
    if not saved:
        return "nothing was saved yet"
    cmd = " ".join(["python", *(sys.argv if argv is None else argv)])
    return f"progress saved ({saved[-1].what}) in {saved[-1].path}; `{cmd}` resumes"

