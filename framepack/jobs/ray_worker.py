"""The worker side of the Ray backend: one actor per GPU, holding one loaded pipeline.

`Worker.run` is a streaming generator: it runs the job with the in-process runner (the same engine call,
resume state and outcome rules as the embedded queue) on a thread of its own and yields, in order,

    ("event", engine event)     every event the engine reports (stage, step + preview, section, ...)
    ("files", shipping.Changes) only for a worker without the shared folder: what changed in its scratch
                                copy, after every finished section and at the end (before the outcome)
    ("outcome", RunOutcome)     last

`cancel(job_id, how)` ("cancel" / "pause") runs on another actor thread (the actor is threaded) and
reaches the engine's token at once, so a cancel stops the job within one sampling step.

A run on the shared folder writes the real job folder: before each step and section it checks that the
folder's lease still names its run, and stops when the head gave the job to another run (the head
thought this worker lost). That fence keeps one writer per job folder even on a flaky network.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from framepack.events import CancelToken, SectionDone, StageStarted, StepProgress
from framepack.jobs import shipping
from framepack.jobs.records import Job
from framepack.jobs.runner import InProcessRunner, RunContext, RunOutcome


class Worker:
    """The actor's class (made remote by `framepack.jobs.ray_runner`). `loader(model)` loads a pipeline
    here; `env` is applied first (FRAMEPACK_HOME, HF_HOME, HF_HUB_OFFLINE as on the head); `threads`:
    torch's intra-op threads (None: Ray's default for the actor)."""

    def __init__(self, name: str, loader: Callable[[str], Any], env: dict[str, str], threads: int | None) -> None:
        os.environ.update(env)
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.name = name
        self._runner = InProcessRunner(loader, RunContext(Path("."), lambda: Path("."), "all", lambda _: 0))
        self._tokens: dict[str, CancelToken] = {}
        self._early: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._scratch = Path(tempfile.mkdtemp(prefix=f"framepack-{name}-"))

    def info(self) -> dict:
        """Where this worker runs (shown in events and the README's `ray status` mapping)."""
        import ray

        context = ray.get_runtime_context()
        return {"name": self.name, "pid": os.getpid(), "host": socket.gethostname(), "node": context.get_node_id(),
                "gpus": [str(g) for g in ray.get_gpu_ids()], "model": self._runner.model}  # fmt: skip

    def sees(self, path: str, content: str) -> bool:
        """Whether the head's marker file is here at the same path (the outputs folder is shared)."""
        try:
            return Path(path).read_text() == content
        except OSError:
            return False

    def cancel(self, job_id: str, how: str) -> None:
        """Cancel or pause a job (actor calls are not ordered on a threaded actor: one that comes before
        its job's run started is kept for it)."""
        with self._lock:
            token = self._tokens.get(job_id)
            if token is None:
                self._early.setdefault(job_id, []).append(how)
                return
        token.pause() if how == "pause" else token.cancel()

    def run(self, job: Job, folder: str, files: dict[str, bytes] | None, loras: dict[str, bytes] | None,
            lease: str, context: dict) -> Iterator[tuple[str, Any]]:  # fmt: skip
        """Run `job`: on the shared `folder` (`files` None) or in a scratch copy made from `files`.
        `context`: the head's checkpoint policy, LoRA folder (shared runs) and the disk the job needs."""
        token = CancelToken()
        with self._lock:
            self._tokens[job.id] = token
            for how in self._early.pop(job.id, []):
                token.pause() if how == "pause" else token.cancel()
        try:
            if files is None:
                where, sync = Path(folder), None
                lora_folder = Path(context["lora_folder"])
                fence = _Fence(where / shipping.LEASE, lease, token)
            else:
                where = self._scratch / "jobs" / job.id
                shutil.rmtree(where, ignore_errors=True)
                where.mkdir(parents=True)
                lora_folder = self._scratch / "loras"
                shipping.unpack(where, files, [(folder, where), (context["lora_folder"], lora_folder)])
                shipping.unpack(lora_folder, loras or {})
                sync, fence = shipping.FolderSync(where, lora_folder), None
            self._runner.context = RunContext(Path(context["outputs"]), lambda: lora_folder, context["checkpoints"],
                                              lambda _: int(context["needed"]))  # fmt: skip
            yield from self._stream(job, where, token, sync, fence)
        finally:
            with self._lock:
                self._tokens.pop(job.id, None)
            if files is not None:
                shutil.rmtree(self._scratch / "jobs" / job.id, ignore_errors=True)

    def _stream(self, job: Job, folder: Path, token: CancelToken, sync: shipping.FolderSync | None,
                fence: _Fence | None) -> Iterator[tuple[str, Any]]:  # fmt: skip
        items: queue.Queue = queue.Queue()

        def on_event(event: object) -> None:  # on the engine's thread: it waits for what is done here
            if fence is not None and isinstance(event, (StepProgress, StageStarted)):
                fence.check()
            if sync is not None and isinstance(event, SectionDone) and (changes := sync.changes()):
                items.put(("files", changes))  # the section's video, checkpoint and resume state reach the head first
            items.put(("event", event))

        def work() -> None:
            try:
                outcome = self._runner.run(job, folder, on_event, token, interrupting=lambda: False)
            except BaseException as err:  # the runner catches engine errors; anything else must still end the stream
                outcome = RunOutcome("failed", f"internal error on worker {self.name}: {type(err).__name__}: {err}")
            if fence is not None and fence.lost:
                outcome = RunOutcome("failed", "stopped: the head gave this job to another worker", files=False)
            items.put(("outcome", outcome))

        thread = threading.Thread(target=work, name=f"framepack-job-{job.id}", daemon=True)
        thread.start()
        while True:
            kind, item = items.get()
            if kind == "outcome":
                if sync is not None and (changes := sync.changes()):
                    yield "files", changes
                yield kind, item
                thread.join()
                return
            yield kind, item


class _Fence:
    """The lease check of a run on the shared folder (see the module docstring)."""

    def __init__(self, path: Path, lease: str, token: CancelToken) -> None:
        self.path, self.lease, self.token, self.lost = path, lease, token, False

    def check(self) -> None:
        try:
            current = self.path.read_text()
        except OSError:
            current = None
        if current != self.lease:
            self.lost = True
            self.token.cancel()
