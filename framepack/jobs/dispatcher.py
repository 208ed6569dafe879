"""The dispatcher: worker threads (one per runner slot: `runner.slots`, default 1) that claim queued
jobs in queue order, atomically (never twice), hand each to the runner and record its outcome. A job
that would fill the disk half way waits, queued. Cancel and pause reach a running job's token at once;
the runner honours them within one sampling step (pause: at the next section boundary). A run whose
worker was lost (`RunOutcome("queued")`) goes back to the front of the queue and resumes from its last
finished section."""

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
        self._wake, self._stop = threading.Condition(lock), threading.Event()
        self._running: dict[str, CancelToken] = {}
        self._interrupting = False  # close() cancels the running jobs: they become interrupted, not cancelled
        slots = int(getattr(runner, "slots", 1))
        if slots < 1:
            raise ValueError(f"a runner needs at least one slot, got {slots}")
        self._threads = [threading.Thread(target=self._work, name=f"framepack-worker-{i}", daemon=True)
                         for i in range(slots)]  # fmt: skip

    @property
    def slots(self) -> int:
        return len(self._threads)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def wake(self) -> None:
        with self._lock:
            self._wake.notify_all()

    def token(self, job_id: str) -> CancelToken | None:
        """The running job's cancel token, if `job_id` runs here."""
        return self._running.get(job_id)

    def running(self) -> list[str]:
        return list(self._running)

    def close(self, timeout: float) -> None:
        """Stop the workers: running jobs are cancelled after their current step and left interrupted."""
        with self._lock:
            self._interrupting = True
            for token in self._running.values():
                token.cancel()
            self._stop.set()
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

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
                with self._lock:
                    if not self._stop.is_set():
                        self._wake.wait(1.0)
                continue
            try:
                folder = self.store.jobs_dir / job.id
                outcome = self.runner.run(job, folder, lambda e, j=job.id: self._on_event(j, e),
                                          self._running[job.id], interrupting=lambda: self._interrupting)  # fmt: skip
            except Exception as err:  # the worker must survive anything a job does
                outcome = RunOutcome("failed", f"internal error: {type(err).__name__}: {err}", files=False)
            self.finish(job.id, outcome)

    def _claim(self):
        with self._lock:
            if self._stop.is_set():
                return None
            reserve = getattr(self.runner, "reserve", None)

            def ready(job_id: str) -> bool:
                needed = self._needed(job_id)
                if disk_free(self.store.jobs_dir) < needed:  # it would fail half way: it waits, queued, for space
                    self.store.storage_problem = (f"{disk_full_message(self.store.outputs, needed)}; queued jobs "
                                                  "wait for it")  # fmt: skip
                    return False
                self.store.storage_problem = None
                return reserve is None or reserve()  # a runner with a few workers: one is free (held for us)

            job = self.store.claim(ready)
            if job is None:
                if (unreserve := getattr(self.runner, "unreserve", None)) is not None:
                    unreserve()
                return None
            self._running[job.id] = CancelToken()
            self.log.started(job.id, job.kind)
        self.log.emit(job.id, {"type": "state", "state": "running"})
        return job

    def finish(self, job_id: str, outcome: RunOutcome) -> None:
        """Record a run's outcome (and a running job's end) with its state event."""
        with self._lock:
            progress = self.log.ended(job_id)
            self._running.pop(job_id, None)
            try:
                request = self.store.get(job_id).request
            except Exception:  # deleted meanwhile (or the queue is closing): nothing left to record
                return
            if outcome.state == "queued":  # its worker was lost: it runs next, from its last finished section
                if progress is not None:
                    self.store.save_progress(job_id, progress)
                job = self.store.return_to_queue(job_id)
                self.log.emit(job_id, {**state_event(job), "requeued": outcome.error or "its worker was lost"})
                self._wake.notify_all()
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

