"""The event log: every engine event and state change of a job as a small JSON-able dict with a
process-wide increasing `seq`, the latest ~2000 per job kept for late subscribers, a running job's
latest progress and latent preview, and waiting for what comes next.

Engine events (framepack.events) become: stage, step, section, error, and for other dataclass events
their snake_case type with their fields (e.g. job_planned, loras_applied). Finished / Cancelled add
nothing: the `state` event that follows carries the outcome.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from framepack.events import Cancelled, Failed, Finished, SectionDone, StageStarted, StepProgress
from framepack.jobs.records import Job
from framepack.sections import FPS

LOG_LIMIT = 2000  # events kept per job for late subscribers (steps of ~80 sections at 25 steps)
PROGRESS_WRITE_S = 1.0  # step events reach the database at most this often (memory always has the latest)


class EventLog:
    """Events and live progress of the queue's jobs. `lock` is the queue's: an event is emitted under it,
    so events stay in the order of the state changes they report; `changed` wakes waiters."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self.changed = threading.Condition(lock)
        self._seq = itertools.count(1)
        self._logs: dict[str, deque[dict]] = {}
        self._live: dict[str, dict] = {}  # the running job's latest progress (fresher than the database)
        self._previews: dict[str, tuple[int, np.ndarray]] = {}
        self._last_write = 0.0

    def reset(self, job_id: str) -> None:
        """A new run of the job: its stream starts afresh."""
        with self._lock:
            self._logs[job_id] = deque(maxlen=LOG_LIMIT)

    def emit(self, job_id: str, event: dict, *, notify: bool = True) -> int:
        with self._lock:
            seq = next(self._seq)
            body = {k: v for k, v in event.items() if k not in ("seq", "job", "time")}
            event = {"seq": seq, "job": job_id, "time": round(time.time(), 3), **body}
            self._logs.setdefault(job_id, deque(maxlen=LOG_LIMIT)).append(event)
            if notify:
                self.changed.notify_all()
            return seq

    def events(self, job_id: str, after: int, current: Callable[[], Job]) -> list[dict]:
        """The job's events with seq > after, in order; a job with none in this process (one finished
        before a restart) gets one `state` event from `current()`."""
        with self._lock:
            log = self._logs.get(job_id)
            if log is None:
                return [state_event(current())] if after <= 0 else []
            return [e for e in log if e["seq"] > after]

    def started(self, job_id: str, kind: str) -> None:
        self._live[job_id] = {"kind": kind}  # for its progress text (app.progress.describe_progress)

    def live(self, job_id: str) -> dict | None:
        return self._live.get(job_id)

    def preview(self, job_id: str) -> tuple[int, np.ndarray] | None:
        return self._previews.get(job_id)

    def ended(self, job_id: str) -> dict | None:
        """The run is over: its live progress (to be stored) and preview go."""
        with self._lock:
            self._previews.pop(job_id, None)
            return self._live.pop(job_id, None)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._logs.pop(job_id, None)
            self._previews.pop(job_id, None)
            self._live.pop(job_id, None)
            self.changed.notify_all()

    def record(self, job_id: str, event: object, persist: Callable[[str, dict], None]) -> None:
        """An engine event of a running job: logged, folded into its live progress; `persist(job_id,
        progress)` stores the progress (at most every PROGRESS_WRITE_S for step events)."""
        with self._lock:
            progress = self._live.setdefault(job_id, {})
            if isinstance(event, StageStarted):
                e = {"type": "stage", "stage": event.stage, "section": event.section, "sections": event.sections}
                progress.update(stage=event.stage)
                if event.section is not None:
                    progress.update(section=event.section, sections=event.sections, step=None, steps=None)
            elif isinstance(event, StepProgress):
                e = {"type": "step", "section": event.section, "sections": event.sections, "step": event.step,
                     "steps": event.steps, "frames": event.frames_done,
                     "fraction": round(event.fraction, 4)}  # fmt: skip
                progress.update(stage="sampling", section=event.section, sections=event.sections, step=event.step,
                                steps=event.steps, fraction=e["fraction"])  # fmt: skip
                progress.update(frames=event.frames_done, seconds=round(event.frames_done / FPS, 3))
            elif isinstance(event, SectionDone):
                video = f"{job_id}/{Path(event.video).name}"
                e = {"type": "section", "section": event.section, "sections": event.sections, "video": video,
                     "frames": event.frames, "seconds": round(event.seconds, 3)}  # fmt: skip
                progress.update(section=event.section, sections=event.sections, frames=event.frames,
                                seconds=round(event.seconds, 3), sections_done=event.section + 1,
                                fraction=(event.section + 1) / event.sections, video=video)  # fmt: skip
            elif isinstance(event, Failed):
                e = {"type": "error", "error": event.error}
            elif isinstance(event, (Finished, Cancelled)):
                return  # the state event that follows carries the outcome
            elif dataclasses.is_dataclass(event):  # e.g. JobPlanned: passed on as snake_case type + fields
                name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(event).__name__).lower()
                e = {"type": name, **_event_fields(event)}
                if isinstance(getattr(event, "sections", None), int):
                    progress.setdefault("sections", event.sections)
            else:
                return
            seq = self.emit(job_id, e, notify=False)
            if isinstance(event, StepProgress) and event.preview is not None:
                self._previews[job_id] = (seq, event.preview)
            now = time.monotonic()
            if not isinstance(event, StepProgress) or now - self._last_write >= PROGRESS_WRITE_S:
                self._last_write = now
                persist(job_id, progress)
            self.changed.notify_all()


def state_event(job: Job) -> dict:
    event = {"seq": 0, "job": job.id, "time": round(time.time(), 3), "type": "state", "state": job.state}
    if job.error:
        event["error"] = job.error
    if job.video:
        event["video"] = job.video
    if job.result:
        event["result"] = job.result
    return event


def _event_fields(event: object) -> dict:
    """A JSON-able dict of an engine event this layer has no special case for (newer engine events)."""
    out = {}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if isinstance(value, np.ndarray):
            continue
        if isinstance(value, Path):
            value = value.name
        try:
            json.dumps(value)
        except TypeError:
            value = str(value)
        out[f.name] = value
    return out
