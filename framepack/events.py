"""What a generation reports while it runs, and how a caller stops it.

The engine knows nothing of its callers: it calls `on_event(event)` with these typed, immutable
events (CLI progress bar, UI, HTTP API and job queue all consume the same ones), and checks a
`CancelToken` between sampler steps.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class GenerationCancelled(Exception):
    """Raised inside the engine when its CancelToken is set; the pipeline turns it into `Cancelled`."""


class CancelToken:
    """Stop a job: `cancel()` after the current sampler step, `pause()` after the current section (a
    resumable job then continues from the next one)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._pause = threading.Event()
        self._watchers: list[Any] = []

    def cancel(self) -> None:
        self._event.set()
        self._tell("cancel")

    def pause(self) -> None:
        self._pause.set()
        self._tell("pause")

    def watch(self, callback: Any) -> None:
        """Call `callback("cancel" | "pause")` on each cancel / pause from now on, and at once for one asked
        for already (a runner forwarding them to a job running elsewhere)."""
        self._watchers.append(callback)
        if self._pause.is_set():
            callback("pause")
        if self._event.is_set():
            callback("cancel")

    def unwatch(self, callback: Any) -> None:
        if callback in self._watchers:
            self._watchers.remove(callback)

    def _tell(self, how: str) -> None:
        for callback in list(self._watchers):
            callback(how)

    @property
    def paused(self) -> bool:
        """A pause was asked for (the job stops at its next section boundary)."""
        return self._pause.is_set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise GenerationCancelled


@dataclass(frozen=True)
class JobPlanned:
    """The job's shape, once its inputs are checked: report snapped times back to the user."""

    sections: int
    frames: int  # pixel frames of the finished video (input video frames included)
    prompt_times: list[tuple[float, str]]  # (snapped start in seconds, prompt)
    anchors: list[tuple[str, float]]  # (what: "end" / "keyframe N", snapped time in seconds)
    notes: tuple[str, ...] = ()  # what the checks adjusted or warn about (a mask resized, an index beyond ~40)


@dataclass(frozen=True)
class LorasApplied:
    """The job's LoRAs are merged into the transformer (before any sampling)."""

    lines: list[str]  # one per file: format, rank, alpha, scale, modules matched, keys not applied
    loras: list[dict]  # framepack.lora.LoadedLora.describe() of each
    seconds: float  # the switch from the previous job's set


@dataclass(frozen=True)
class StageStarted:
    stage: str  # "loading", "text encoding", "image processing", "vae encoding", "image encoding",
    # "sampling", "decoding", "writing"
    section: int | None = None  # 0-based generation order, for per-section stages
    sections: int | None = None


@dataclass(frozen=True)
class StepProgress:
    section: int
    sections: int
    step: int  # 1-based: steps finished in this section
    steps: int
    frames_done: int  # pixel frames finished before this section
    preview: np.ndarray | None = None  # (h, T*w, 3) uint8 latent preview of the section being denoised

    @property
    def fraction(self) -> float:
        return (self.section + self.step / self.steps) / self.sections


@dataclass(frozen=True)
class SectionDone:
    section: int
    sections: int
    video: Path  # a playable MP4 of everything generated so far
    frames: int
    seconds: float  # video duration so far


@dataclass(frozen=True)
class Finished:
    result: Any  # pipeline.GenerationResult


@dataclass(frozen=True)
class Cancelled:
    result: Any  # pipeline.GenerationResult of the finished sections (video None if none finished)


@dataclass(frozen=True)
class Failed:
    error: str


Event = JobPlanned | LorasApplied | StageStarted | StepProgress | SectionDone | Finished | Cancelled | Failed
