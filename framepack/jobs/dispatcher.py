"""The dispatcher: one worker thread that claims queued jobs in queue order, atomically (never twice),
hands each to a runner and records its outcome. A job that would fill the disk half way waits, queued.
Cancel reaches the running job's token at once; the runner honours it within one sampling step."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from framepack.events import CancelToken
from framepack.jobs.eventlog import EventLog, state_event
from framepack.jobs.records import VIDEO, result_name
from framepack.jobs.runner import Runner, RunOutcome
from framepack.jobs.store import JobStore
from framepack.outputs import disk_free, disk_full_message


class Dispatcher:
    def __init__(self, store: JobStore, log: EventLog, runner: Runner, *, lock: threading.RLock,
                 needed: Callable[[str], int]) -> None:  # fmt: skip
        self.store, self.log, self.runner = store, log, runner
        self._lock, self._needed = lock, needed
        self._wake, self._stop = threading.Event(), threading.Event()
        self._running: tuple[str, CancelToken] | None = None
        self._interrupting = False  # close() cancels the running job: it becomes interrupted, not cancelled
        self._thread = threading.Thread(target=self._work, name="framepack-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def token(self, job_id: str) -> CancelToken | None:
        """The running job's cancel token, if `job_id` is the one running here."""
        running = self._running
        return running[1] if running and running[0] == job_id else None

    def close(self, timeout: float) -> None:
        """Stop the worker: a running job is cancelled after its current step and left interrupted."""
        with self._lock:
            self._interrupting = True
            if self._running:
                self._running[1].cancel()
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------------------- the worker
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._claim() if self.store.flush() else None
            except Exception as err:  # storage trouble (a full disk): nothing was claimed; try again shortly
                self.store.storage_problem = str(err)
                job = None
            if job is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                folder = self.store.jobs_dir / job.id
                outcome = self.runner.run(job, folder, lambda e, j=job.id: self._on_event(j, e), self._running[1],
                                          interrupting=lambda: self._interrupting)  # fmt: skip
            except Exception as err:  # the worker must survive anything a job does
                outcome = RunOutcome("failed", f"internal error: {type(err).__name__}: {err}", files=False)
            self.finish(job.id, outcome)

    def _claim(self):
        with self._lock:
            if self._stop.is_set():
                return None

            def ready(job_id: str) -> bool:
                needed = self._needed(job_id)
                if disk_free(self.store.jobs_dir) < needed:  # it would fail half way: it waits, queued, for space
                    self.store.storage_problem = (f"{disk_full_message(self.store.outputs, needed)}; queued jobs "
                                                  "wait for it")  # fmt: skip
                    return False
                self.store.storage_problem = None
                return True

            job = self.store.claim(ready)
            if job is None:
                return None
            self._running = (job.id, CancelToken())
            self.log.started(job.id, job.kind)
        self.log.emit(job.id, {"type": "state", "state": "running"})
        return job

    def finish(self, job_id: str, outcome: RunOutcome) -> None:
        """Record a run's outcome (and a running job's end) with its state event."""
        with self._lock:
            progress = self.log.ended(job_id)
            if self._running and self._running[0] == job_id:
                self._running = None
            try:
                request = self.store.get(job_id).request
            except Exception:  # deleted meanwhile (or the queue is closing): nothing left to record
                return
            changes: dict = {"state": outcome.state, "finished": time.time(), "error": outcome.error,
                             "video": None, "metadata": None}  # fmt: skip
            if outcome.files:
                files = self.store.jobs_dir / job_id
                sidecar = Path(result_name(request)).with_suffix(".json").name
                changes["video"] = f"{job_id}/{VIDEO}" if (files / VIDEO).is_file() else None
                changes["metadata"] = f"{job_id}/{sidecar}" if (files / sidecar).is_file() else None
            if outcome.result is not None:
                changes["result"] = outcome.result
            if progress is not None:
                changes["progress"] = progress
            self.store.finish(job_id, changes)
            self.log.emit(job_id, state_event(self.store.get(job_id)))  # before a resume can start its next run

    def _on_event(self, job_id: str, event: object) -> None:
        try:
            self.log.record(job_id, event, self.store.save_progress)
        except Exception as err:  # bookkeeping must never fail the generation it reports on
            print(f"framepack.jobs: could not record {type(event).__name__} of job {job_id}: {err!r}", file=sys.stderr)

