"""Runners: "run this job, report its events, honour cancel and pause, save its resume state".

`Runner` is the protocol the dispatcher hands claimed jobs to; `InProcessRunner` (the default) runs them
in this process on one loaded pipeline, swapped when a job asks for another model. A runner never
touches the store: it returns a `RunOutcome` and reports through `on_event`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from framepack import jobstate
from framepack.config import request_from_json
from framepack.events import CancelToken, Failed, StageStarted
from framepack.jobs.records import INPUT, STATE_DIR, Job, absolute, relative, result_name
from framepack.outputs import disk_full_message, is_disk_full


@dataclass(frozen=True)
class RunOutcome:
    state: str  # done | failed | cancelled | interrupted | paused, or queued: give the job back (its worker was lost)
    error: str | None = None  # for queued: why it went back
    result: dict | None = None  # the result's summary (files relative to the jobs folder)
    files: bool = True  # the job folder holds what the run left (its video / image and sidecar)


@dataclass(frozen=True)
class RunContext:
    """What every runner gets from the queue: `outputs` (the folder, for messages), `lora_folder()` (where
    jobs' LoRA names are), `checkpoints` (the section checkpoint policy), `needed(job_id)` (the disk a
    job needs, for a full-disk message)."""

    outputs: Path
    lora_folder: Callable[[], Path]
    checkpoints: Any
    needed: Callable[[str], int]


class Runner(Protocol):
    """Optional members: `slots` (jobs it runs at once; the dispatcher starts that many worker threads,
    default 1), `reserve()` / `unreserve()` (hold a free worker for the calling thread before it claims a
    job; False: none is free, the job stays queued) and `close()` (called when the queue closes, after the
    running jobs ended)."""

    def run(self, job: Job, folder: Path, on_event: Callable[[object], None], token: CancelToken, *,
            interrupting: Callable[[], bool]) -> RunOutcome:  # fmt: skip
        """Run `job` (its files in `folder`) to its end; `interrupting()`: the server is shutting down
        (a cancel then leaves the job interrupted, not cancelled)."""
        ...


class InProcessRunner:
    """Runs jobs here, on `loader(model)`'s pipeline (one at a time: the old one is freed first)."""

    def __init__(self, loader: Callable[[str], Any], context: RunContext) -> None:
        self._loader, self.context = loader, context
        self._pipeline: tuple[str, Any] | None = None

    @property
    def model(self) -> str | None:
        """The model loaded now (None before the first job)."""
        return self._pipeline[0] if self._pipeline else None

    def run(self, job: Job, folder: Path, on_event: Callable[[object], None], token: CancelToken, *,
            interrupting: Callable[[], bool]) -> RunOutcome:  # fmt: skip
        if not (folder / INPUT).is_file():
            return RunOutcome("failed", f"the job's input image {folder / INPUT} is missing", files=False)
        failure: list[str] = []

        def report(event: object) -> None:
            if isinstance(event, Failed):
                failure.append(event.error)
            on_event(event)

        if not jobstate.exists(folder / STATE_DIR):  # a fresh run (an edit's is always): earlier files are stale
            result_file = result_name(job.request)
            for name in (result_file, Path(result_file).with_suffix(".json").name):
                (folder / name).unlink(missing_ok=True)
        try:
            pipe = self._pipeline_for(job.model, report)
            request = request_from_json(absolute(job.request, folder, self.context.lora_folder()))
            gb = job.options.get("preserved_memory_gb")
            result = pipe.run(request, report, token, state_dir=folder / STATE_DIR,
                              checkpoints=self.context.checkpoints,
                              preserved_memory_gb=None if gb is None else float(gb))  # fmt: skip
        except Exception as err:  # engine failures (after a sidecar), bad requests/images, missing weights
            if is_disk_full(err):
                error = disk_full_message(self.context.outputs, self.context.needed(job.id))
            elif failure:
                error = failure[0]
            elif isinstance(err, ValueError):  # RequestError, ImageError, a damaged resume state: say it plainly
                error = str(err)
            else:
                error = f"{type(err).__name__}: {err}"
            return RunOutcome("failed", error)
        state = {"finished": "done", "cancelled": "cancelled"}.get(result.status, "failed")
        if state == "cancelled" and interrupting():
            state = "interrupted"
        elif state == "cancelled" and token.paused:
            state = "paused"
        summary = result.summary()
        error = {"interrupted": "stopped by the server shutting down; resume to continue",
                 "paused": f"paused after section {summary.get('sections_done')}; resume to continue"
                 }.get(state)  # fmt: skip
        return RunOutcome(state, error, relative(summary, job.id))

    def _pipeline_for(self, model: str, report: Callable[[object], None]) -> Any:
        if self._pipeline is not None and self._pipeline[0] == model:
            return self._pipeline[1]
        report(StageStarted("loading"))
        if self._pipeline is not None:  # one model at a time: free the old one before loading the next
            self.close()
            _free_device_memory()
        self._pipeline = (model, self._loader(model))
        return self._pipeline[1]

    def close(self) -> None:
        """Let the loaded pipeline go (a loader with `release`, e.g. one whose pipelines have ranks on
        other GPUs, frees what it started for it)."""
        if self._pipeline is None:
            return
        pipe, self._pipeline = self._pipeline[1], None
        release = getattr(self._loader, "release", None)
        if release is not None:
            release(pipe)


def _free_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
