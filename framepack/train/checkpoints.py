"""Training state on disk: atomic checkpoint files, random-number-generator states, the CSV loss log.

Contract:
  * `save_state(path, state)` writes a `torch.save` dict atomically (a crash never leaves a half file
    under the final name); `latest(directory)` finds the newest `step_XXXXXXXX.pt`; `load_state`
    reads one back (on the CPU).
  * `rng_state()` / `set_rng_state(s)` capture and restore every global generator a training step may
    touch (Python, numpy, torch CPU, and CUDA when present), so a resumed run draws the same numbers
    as an uninterrupted one.
  * `CsvLog` appends one row per logged step to a plain CSV file; `truncate(step)` drops rows written
    after a checkpoint, so a resumed run's log has no duplicated or orphaned steps.
"""

from __future__ import annotations

import csv
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

_STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def save_state(path: str | os.PathLike, state: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_state(path: str | os.PathLike) -> dict:
    # weights_only=False: the state holds numpy/python RNG tuples next to the tensors. Only load
    # checkpoints you wrote yourself.
    return torch.load(path, map_location="cpu", weights_only=False)


def latest(directory: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in `directory`, or None."""
    d = Path(directory)
    if not d.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_FILE.match(p.name)))
    return found[-1][1] if found else None


def prune(directory: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    d = Path(directory)
    found = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_FILE.match(p.name)))
    for _, p in found[:-keep]:
        p.unlink(missing_ok=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CsvLog:
    """A plain CSV loss log with a fixed header; rows are flushed as they are written."""

    def __init__(self, path: str | os.PathLike, fields: list[str]) -> None:
        self.path, self.fields = Path(path), list(fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.path.write_text(",".join(self.fields) + "\n")

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )

    def truncate(self, step: int) -> None:
        """Keep the header and the rows with step <= `step`."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if int(float(r.get("step", 0))) <= step]
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(kept)

    def rows(self) -> list[dict]:
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))
