"""Section checkpoints: what a branch needs to continue a video after any of its finished sections.

Beside a video (unless turned off), a hidden folder `.<video stem>.sections/` holds:

    index.json               the job (request, model, schedule, window, section count, encode seed), the
                             kept range and policy, and where each MP4 segment lies in the video file
    base.safetensors         the latent history at the oldest kept checkpoint (all-zero frames trimmed),
                             the RNG state there, and the writer's segment list (metadata)
    section-0007.safetensors the latents section 7 (generation order, 1-based) generated, the RNG state
                             after it, and the writer's segment list after it (metadata)

The history after section K is the base's with `Schedule.append` folded over the sections after it up
to K: each checkpoint adds one section's latents, not a whole history. No pixels are kept: the video's
own segments hold them, and a branch copies their packets out of the video file (`video.copy_segment`,
located by the index's layout), so the frames it shares decode bit-identically.

Policy (`KeepPolicy`): all checkpoints (the default), or the last N, whose oldest becomes the base (the
sections before it are folded into it and their files removed), or none (no folder at all).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from framepack.config import RequestError
from framepack.outputs import write_atomically
from framepack.sections import History, make_schedule

INDEX, BASE = "index.json", "base.safetensors"
VERSION = 1


def sections_dir(video: str | os.PathLike) -> Path:
    """The checkpoint folder of a video: hidden, beside it, named after it."""
    video = Path(video)
    return video.with_name(f".{video.stem}.sections")


def _delta_name(at: int) -> str:
    return f"section-{at:04d}.safetensors"


class CheckpointError(RequestError):
    """A branch point that cannot be loaded: out of range, pruned, or its files are gone or damaged."""


@dataclass(frozen=True)
class KeepPolicy:
    """How many section checkpoints a job keeps: all (`last` None) or the last N (N >= 1)."""

    last: int | None = None

    @staticmethod
    def parse(value: object) -> KeepPolicy | None:
        """'all' (or None) -> keep all; N or 'N' -> the last N; 'none' / 0 / False -> None (no checkpoints)."""
        if value is None or value == "all":
            return KeepPolicy()
        if value is False or value in ("none", "0", 0):
            return None
        try:
            n = int(value) if not isinstance(value, (bool, float)) else None
        except (TypeError, ValueError):
            n = None
        if n is None or n < 0:
            raise RequestError(f"section checkpoints: expected 'all', 'none' or a number of sections N >= 1 (keep "
                               f"the last N), got {value!r}")  # fmt: skip
        return KeepPolicy(n)

    def describe(self) -> str:
        return "all" if self.last is None else f"last {self.last}"


KEEP_ALL = KeepPolicy()


@dataclass(frozen=True)
class Checkpoint:
    """The state after `at` finished sections (generation order): enough to continue from there."""

    at: int
    history: History
    rng_state: torch.Tensor  # the noise generator's state (torch.Generator.get_state())
    writer: dict  # video.SectionVideoWriter.state(): the final segments so far


class SectionStore:
    """The checkpoint folder of one video (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, index: dict) -> None:
        self.folder = Path(folder)
        self.index = index

    # ------------------------------------------------------------------------------- writing
    @classmethod
    def create(cls, folder: str | os.PathLike, header: dict, keep: KeepPolicy, *, history: History,
               rng: torch.Generator, writer: dict, at: int = 0) -> SectionStore:  # fmt: skip
        """A new folder (an older one at that place is replaced) whose base is the state after `at`
        sections (0: before the first). `header`: request, model, schedule, window, sections,
        encode_seed, branch (a branch's parent, branch point and changes)."""
        folder = Path(folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        store = cls(folder, {"version": VERSION, **header, "keep": keep.last, "base": at, "last": at, "video": None})
        store._save_base(at, history, rng.get_state(), writer)
        store._save_index()
        return store

    def add(self, at: int, generated: torch.Tensor, rng: torch.Generator, writer: dict, video: Path,
            layout: list[list]) -> None:  # fmt: skip
        """Section `at` (1-based) finished: it generated `generated` (B, C, T, h, w); `rng` and `writer`
        are their states after it, `video` and `layout` the file it was written to (as `set_video`).
        Older checkpoints beyond the policy are folded into the base."""
        if at != self.index["last"] + 1:
            raise ValueError(f"section checkpoint {at} follows {self.index['last']}: they are added in order")
        self._save(_delta_name(at), {"generated": generated.detach().float().cpu().contiguous(),
                                     "rng_state": rng.get_state()}, {"writer": json.dumps(writer)})  # fmt: skip
        self.index["last"] = at
        self._describe_video(video, layout)
        keep = self.index["keep"]
        if keep is not None and at - self.index["base"] + 1 > keep:
            new_base = at - keep + 1
            cp = self.load(new_base)
            self._save_base(new_base, cp.history, cp.rng_state, cp.writer)
            old = self.index["base"]
            self.index["base"] = new_base
            self._save_index()  # the index names the new base before the folded files go
            for k in range(old + 1, new_base + 1):
                (self.folder / _delta_name(k)).unlink(missing_ok=True)
            return
        self._save_index()

    def set_video(self, video: Path, layout: list[list]) -> None:
        """Where the video file's segments are (`SectionVideoWriter.layout()`), after it was written."""
        self._describe_video(video, layout)
        self._save_index()

    def _describe_video(self, video: Path, layout: list[list]) -> None:
        self.index["video"] = {"name": video.name, "bytes": video.stat().st_size, "segments": layout}

    def truncate(self, at: int) -> None:
        """Forget checkpoints after `at` (a job resumed from its saved state after section `at`: a crash
        between the checkpoint and the state may have left one more)."""
        for k in range(at + 1, self.index["last"] + 1):
            (self.folder / _delta_name(k)).unlink(missing_ok=True)
        self.index["last"] = min(self.index["last"], at)
        self._save_index()

    def update(self, **fields) -> None:
        self.index.update(fields)
        self._save_index()

    # ------------------------------------------------------------------------------- reading
    @classmethod
    def open(cls, folder: str | os.PathLike, what: str = "this video") -> SectionStore:
        folder = Path(folder)
        try:
            index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{what} has no section checkpoints (no {folder / INDEX}): it was made with "
                                  "checkpoints off, by an older version, or they were deleted") from None  # fmt: skip
        except (OSError, ValueError) as err:
            raise CheckpointError(f"the section checkpoints of {what} are damaged ({folder / INDEX}: {err})") from None
        if not isinstance(index, dict) or index.get("version") != VERSION:
            raise CheckpointError(f"{folder / INDEX} is not a section checkpoint index this version reads")
        return cls(folder, index)

    @property
    def kept(self) -> range:
        """The branch points that can be loaded: sections done, oldest kept to newest."""
        return range(self.index["base"], self.index["last"] + 1)

    def load(self, at: int) -> Checkpoint:
        """The state after `at` finished sections; CheckpointError if it is out of range or pruned."""
        kept = self.kept
        if at not in kept:
            if 0 <= at < kept.start:
                raise CheckpointError(f"the checkpoint after section {at} was pruned: this job keeps the last "
                                      f"{self.index['keep']} ({kept.start}..{kept.stop - 1} can be branched from)")
            raise CheckpointError(f"no checkpoint after section {at}: {self._range_text()}")
        tensors, meta = self._read(BASE)
        latents = tensors["latents"]
        lead, trail = int(meta["lead"]), int(meta["trail"])
        if lead or trail:  # the all-zero frames the base left out
            b, c, _, h, w = latents.shape
            zeros = latents.new_zeros
            latents = torch.cat([zeros(b, c, lead, h, w), latents, zeros(b, c, trail, h, w)], dim=2)
        history = History(tensors["start"], latents, int(meta["total"]), meta["extended"] == "1")
        rng, writer = tensors["rng_state"], json.loads(meta["writer"])
        schedule = make_schedule(self.index["schedule"], self.index["window"])
        sections = schedule.sections(self.index["sections"])
        for k in range(kept.start + 1, at + 1):
            t, m = self._read(_delta_name(k))
            history = schedule.append(history, sections[k - 1], t["generated"])
            rng, writer = t["rng_state"], json.loads(m["writer"])
        return Checkpoint(at, history, rng, writer)

    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())

    def copy_to(self, folder: str | os.PathLike, at: int, header: dict) -> SectionStore:
        """A new store (a branch's) holding this one's checkpoints up to `at`, with another header."""
        folder = Path(folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        shutil.copy2(self.folder / BASE, folder / BASE)
        for k in range(self.index["base"] + 1, at + 1):
            shutil.copy2(self.folder / _delta_name(k), folder / _delta_name(k))
        index = {**self.index, **header, "last": at, "video": None}
        store = SectionStore(folder, index)
        store._save_index()
        return store

    # ------------------------------------------------------------------------------- internals
    def _range_text(self) -> str:
        kept = self.kept
        return f"sections {kept.start}..{kept.stop - 1} can be branched from (0 = before the first)"

    def _save_base(self, at: int, history: History, rng_state: torch.Tensor, writer: dict) -> None:
        latents = history.latents
        nonzero = [i for i in range(latents.shape[2]) if bool(latents[:, :, i].any())]
        lead = nonzero[0] if nonzero else latents.shape[2]
        trail = latents.shape[2] - 1 - nonzero[-1] if nonzero else 0
        core = latents[:, :, lead : latents.shape[2] - trail]  # (B, C, K', h, w)
        meta = {"at": str(at), "total": str(history.total), "extended": "1" if history.extended else "0",
                "lead": str(lead), "trail": str(trail), "writer": json.dumps(writer)}  # fmt: skip
        self._save(BASE, {"start": history.start.contiguous(), "latents": core.contiguous(), "rng_state": rng_state},
                   meta)  # fmt: skip

    def _save(self, name: str, tensors: dict, meta: dict) -> None:
        write_atomically(self.folder / name, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def _read(self, name: str) -> tuple[dict, dict]:
        path = self.folder / name
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except FileNotFoundError:
            raise CheckpointError(f"section checkpoint file {path} is missing") from None
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"section checkpoint file {path} is damaged ({err})") from None

    def _save_index(self) -> None:
        text = json.dumps(self.index, indent=1) + "\n"
        write_atomically(self.folder / INDEX, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
