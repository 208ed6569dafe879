"""What a resumable job saves after every finished section, so it continues after a crash, kill or reboot.

    STATE_DIR/state.json            request, model, sections done, output path, the writer's segment list
    STATE_DIR/history.safetensors   start latent, the bounded latent history, the noise generator's state
    STATE_DIR/segments/             the MP4 segments of every final frame (see video.SectionVideoWriter)

Both files are replaced atomically after the section's frames are in the segments; the pending
edge is not saved (it is a slice of the last section's decode, recomputed on resume). Resuming
with the same request and seed therefore gives the same latents as an uninterrupted run.

state.json records the folder holding STATE_DIR when it was saved; a state found in another folder
(the outputs folder was moved, or another worker runs a copy of the job) has the paths inside that
folder moved with it, so the job resumes where it now is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from framepack.outputs import relocate, write_atomically, write_json
from framepack.sections import History

STATE, TENSORS, SEGMENTS = "state.json", "history.safetensors", "segments"


@dataclass(frozen=True)
class SavedJob:
    request: dict
    model: str
    sections_done: int
    video: Path
    writer: dict
    history: History
    rng_state: torch.Tensor
    encode_seed: int | None = None  # the seed the images were encoded with (a branch's parent's); None: the request's
    branch: dict | None = None  # a branch's parent, branch point and what changed (for the sidecar)
    replaces: Path | None = None  # the video it replaces once complete (outputs.OutputPaths.replaces)


def exists(state_dir: str | os.PathLike | None) -> bool:
    return state_dir is not None and (Path(state_dir) / STATE).exists()


def save(state_dir, *, request: dict, model: str, sections_done: int, video: Path, writer: dict,
         history: History, rng: torch.Generator | torch.Tensor, encode_seed: int | None = None,
         branch: dict | None = None, replaces: Path | None = None) -> None:  # fmt: skip
    """`rng`: the noise generator, or its state."""
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    state = rng if isinstance(rng, torch.Tensor) else rng.get_state()
    tensors = {"start": history.start.contiguous(), "latents": history.latents.contiguous(), "rng_state": state}
    write_atomically(d / TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    meta = {"request": request, "model": model, "sections_done": sections_done, "video": str(video),
            "writer": writer, "history_total": history.total, "history_extended": history.extended,
            "encode_seed": encode_seed, "branch": branch, "replaces": str(replaces) if replaces else None,
            "folder": _folder(d)}  # fmt: skip
    write_json(d / STATE, meta)


def _folder(state_dir: Path) -> str:
    return os.path.abspath(state_dir.parent)


def load(state_dir) -> SavedJob:
    d = Path(state_dir)
    try:
        meta = json.loads((d / STATE).read_text())
        t = load_file(str(d / TENSORS))
    except Exception as err:  # a damaged state is reported, not fatal to whoever lists jobs
        raise ValueError(f"cannot resume from {d}: its saved state is missing or damaged ({err})") from err
    if meta.get("folder") and meta["folder"] != _folder(d):  # the job folder moved: its paths move with it
        moved = {k: meta.pop(k) for k in ("request", "video", "replaces", "writer")}
        meta.update(relocate(moved, meta["folder"], _folder(d)))
    history = History(t["start"], t["latents"], meta["history_total"], bool(meta.get("history_extended")))
    replaces = meta.get("replaces")
    return SavedJob(meta["request"], meta["model"], meta["sections_done"], Path(meta["video"]), meta["writer"],
                    history, t["rng_state"], meta.get("encode_seed"), meta.get("branch"),
                    Path(replaces) if replaces else None)  # fmt: skip
