"""The Ray backend: the queue stays on the head (store, events, API, UI); jobs run on GPU worker actors.

    head (framepack serve --ray)                         Ray cluster
    JobQueue -> Dispatcher (one slot per worker) -> RayRunner.run --- Worker actor (num_gpus=1) x N
                                                     ^ events, files   (framepack.jobs.ray_worker)

* One actor per GPU (`--workers N`, default: the cluster's GPU count), each with one loaded pipeline of
  the model its last job used (loaded on first use, kept while jobs of that model keep coming; a job
  prefers a free worker that has its model loaded).
* A job's events stream back over a Ray streaming generator as they happen: stage, every step (with its
  latent preview), every section. Cancel and pause travel as actor calls that run beside the job (a
  threaded actor), so a cancel reaches the engine at once and stops it within one sampling step.
* Files: a worker that sees the head's outputs folder at the same path (an NFS mount or one machine)
  writes the job folder itself, fenced by a lease file naming its run. A worker that does not gets the
  job folder with the job (`framepack.jobs.shipping`), runs it in a scratch copy and sends back what
  changed after every finished section and at the end; the head writes it into the job folder. Either
  way the head's job folder holds the resume state of the last finished section.
* Faults: a worker (or its node) that dies mid-job is replaced; its job goes back to the front of the
  queue and resumes from its last finished section on the next free worker: the same video as an
  uninterrupted run (same seed). A job whose workers die `MAX_LOSSES` times in a row fails instead (a
  job that crashes every worker). The dispatcher claims jobs atomically and a worker runs one job at a
  time, so a job never runs twice at once; the lease stops a worker the head wrongly gave up on.
  Actors belong to the head process: a head that dies takes them with it, and the restarted head puts
  the jobs that were running back in the queue (`JobQueue(requeue_running=True)`).
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from framepack.events import CancelToken
from framepack.jobs import shipping
from framepack.jobs.records import Job, JobError, absolute
from framepack.jobs.runner import RunContext, RunOutcome
from framepack.outputs import write_atomically

RAY_VERSION = "2.60.0"  # what the [cluster] extra pins (tested here)
INSTALL = f'pip install -e ".[cluster]"  (Ray {RAY_VERSION})'
MAX_LOSSES = 3  # worker losses in a row after which a job fails instead of going back to the queue
MARKER = ".framepack-ray-head"  # in the outputs folder: a worker reading the same text there shares the folder
WORKER_ENV = ("FRAMEPACK_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
FILES = ("auto", "shared", "ship")


class RayError(JobError):
    """Ray is missing, unreachable, or the cluster cannot hold the workers asked for; the message says what to do."""


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


@dataclass(frozen=True)
class RaySettings:
    """How the head uses Ray. `address`: a running cluster ("auto", "HOST:6379", "ray://HOST:10001"), or
    None to start a local Ray instance on this machine; `workers`: actors to start (None: one per GPU of
    the cluster); `files`: "auto" (shared when the worker sees the outputs folder, else shipped),
    "shared" or "ship"; `gpus_per_worker`: each actor's GPUs (0: CPU workers, one CPU each; N: a group of
    N ranks per job, `serve --ray --gpus N`); `threads`: torch threads in each worker (None: Ray's default)."""

    address: str | None = None
    workers: int | None = None
    files: str = "auto"
    gpus_per_worker: float = 1.0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.files not in FILES:
            raise RayError(f"the Ray file mode must be one of {', '.join(FILES)}, got {self.files!r}")
        if self.workers is not None and self.workers < 1:
            raise RayError(f"--workers must be at least 1, got {self.workers}")
        if not self.gpus_per_worker >= 0:
            raise RayError(f"a Ray worker's GPU share must be positive (or 0: CPU workers), got {self.gpus_per_worker}")


@dataclass(frozen=True)
class WorkerAssigned:
    """The job runs on this Ray worker now (an event: `worker_assigned` in the job's stream)."""

    worker: str
    host: str
    gpus: list[str]
    files: str  # shared | shipped


class _Handle:
    def __init__(self, name: str, actor: Any) -> None:
        self.name, self.actor = name, actor
        self.info: dict = {}
        self.shares = False  # sees the head's outputs folder
        self.model: str | None = None
        self.job: str | None = None  # the job it runs now


class WorkerPool:
    """The worker actors: started in the background, handed out one job at a time, replaced when lost."""

    def __init__(self, make: Callable[[str], Any], count: int, probe: Callable[[_Handle], None]) -> None:
        self._make, self._probe = make, probe
        self._cond = threading.Condition()
        self._serial = itertools.count()
        self._all: list[_Handle] = []
        self._idle: list[_Handle] = []
        self._mine = threading.local()  # the worker a dispatcher thread reserved for its next run
        self._closed = False
        self.problems: list[str] = []
        for _ in range(count):
            self._spawn()

    def _spawn(self) -> None:
        name = f"worker-{next(self._serial)}"
        handle = _Handle(name, self._make(name))
        self._all.append(handle)
        threading.Thread(target=self._start, args=(handle,), name=f"framepack-{name}-start", daemon=True).start()

    def _start(self, handle: _Handle) -> None:
        try:
            self._probe(handle)  # returns once the actor runs (the cluster had room for it)
        except Exception as err:
            with self._cond:
                self.problems.append(f"Ray worker {handle.name} did not start: {type(err).__name__}: {err}")
                print(f"framepack: {self.problems[-1]}", file=sys.stderr)
                if handle in self._all:
                    self._all.remove(handle)
                    if not self._closed:
                        threading.Timer(5.0, self._respawn).start()  # a node may come back; try again shortly
            return
        with self._cond:
            if handle in self._all and not self._closed:
                self._idle.append(handle)
                self._cond.notify_all()

    def _respawn(self) -> None:
        with self._cond:
            if not self._closed:
                self._spawn()

    @property
    def ready(self) -> list[_Handle]:
        with self._cond:
            return [h for h in self._all if h.info]

    def wait_ready(self, count: int, timeout: float) -> bool:
        """Block until `count` workers run (tests, benchmarks); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len([h for h in self._all if h.info]) >= count, timeout)

    def reserve(self) -> bool:
        with self._cond:
            if getattr(self._mine, "handle", None) is not None:
                return True
            if not self._idle or self._closed:
                return False
            self._mine.handle = self._idle.pop(0)
            return True

    def unreserve(self) -> None:
        with self._cond:
            handle, self._mine.handle = getattr(self._mine, "handle", None), None
            if handle is not None and handle in self._all:
                self._idle.insert(0, handle)
                self._cond.notify_all()

    def take(self, model: str) -> _Handle | None:
        """This thread's reserved worker, or a free one that has `model` loaded instead; waits for one
        when none is reserved. None when the pool is closing."""
        with self._cond:
            handle, self._mine.handle = getattr(self._mine, "handle", None), None
            while True:
                if self._closed:
                    if handle is not None:
                        self._idle.append(handle)
                    return None
                if handle is None or handle.model != model:
                    better = next((h for h in self._idle if h.model == model), None)
                    if better is not None:
                        self._idle.remove(better)
                        if handle is not None:
                            self._idle.insert(0, handle)
                        handle = better
                    elif handle is None and self._idle:
                        handle = self._idle.pop(0)
                if handle is not None:
                    handle.model = model
                    return handle
                self._cond.wait(1.0)

    def release(self, handle: _Handle) -> None:
        with self._cond:
            if handle in self._all and not self._closed:
                self._idle.append(handle)
                self._cond.notify_all()

    def lost(self, handle: _Handle, kill: Callable[[Any], None]) -> None:
        """A worker died (or can no longer be reached): drop it, start a replacement."""
        with self._cond:
            if handle in self._all:
                self._all.remove(handle)
                if handle in self._idle:
                    self._idle.remove(handle)
                if not self._closed:
                    self._spawn()
        try:
            kill(handle.actor)
        except Exception:  # already gone
            pass

    def close(self, kill: Callable[[Any], None]) -> None:
        with self._cond:
            self._closed = True
            handles, self._all, self._idle = self._all, [], []
            self._cond.notify_all()
        for handle in handles:
            try:
                kill(handle.actor)
            except Exception:
                pass


class RayRunner:
    """The `Runner` of `framepack serve --ray`: `slots` = workers; see the module docstring. Made by the
    queue from its `RunContext` (`JobQueue(runner=RayRunner.factory(loader, settings))`)."""

    def __init__(self, loader: Callable[[str], Any], settings: RaySettings, context: RunContext) -> None:
        ray = self._ray = require_ray()
        self.settings, self.context = settings, context
        self.connection = _connect(ray, settings)
        self.address = _address(ray)
        count = self._count(ray, settings)
        self._marker = (str(context.outputs / MARKER), uuid.uuid4().hex)
        write_atomically(Path(self._marker[0]), lambda tmp: tmp.write_text(self._marker[1]))
        self._losses: Counter[str] = Counter()
        self._loras = shipping.LoraShipment(Path(context.lora_folder()))
        env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
        gpu = settings.gpus_per_worker > 0  # else CPU workers (--device cpu): one CPU each
        actor = ray.remote(_worker_class()).options(num_gpus=settings.gpus_per_worker, num_cpus=0 if gpu else 1,
                                                    max_concurrency=4, max_restarts=0)  # fmt: skip
        self.pool = WorkerPool(lambda name: actor.remote(name, loader, env, settings.threads), count, self._probe)
        self.slots = count

    @classmethod
    def factory(cls, loader: Callable[[str], Any], settings: RaySettings) -> Callable[[RunContext], RayRunner]:
        return lambda context: cls(loader, settings, context)

    def workers(self) -> list[dict]:
        """The running workers: name, host, GPUs, the model loaded, the job they run (None: free)."""
        return [{"name": h.name, "host": h.info.get("host"), "gpus": h.info.get("gpus", []), "model": h.model,
                 "job": h.job} for h in self.pool.ready]  # fmt: skip

    # ------------------------------------------------------------------------------- the Runner
    def reserve(self) -> bool:
        """A free worker, held for this dispatcher thread's next run (the dispatcher claims a job only then)."""
        return self.pool.reserve()

    def unreserve(self) -> None:
        self.pool.unreserve()

    def run(self, job: Job, folder: Path, on_event: Callable[[object], None], token: CancelToken, *,
            interrupting: Callable[[], bool]) -> RunOutcome:  # fmt: skip
        ray = self._ray
        worker = self.pool.take(job.model)
        if worker is None:  # the head is closing: the job waits in the queue for the next start
            return RunOutcome("queued", "the server stopped before a Ray worker took the job")
        lease = f"{worker.name}:{uuid.uuid4().hex}"
        shared = self.settings.files == "shared" or (self.settings.files == "auto" and worker.shares)
        try:
            request, loras = self._portable(job, folder)
            if shared:
                write_atomically(folder / shipping.LEASE, lambda tmp: tmp.write_text(lease))
                files = shipped = None
            else:
                (folder / shipping.LEASE).unlink(missing_ok=True)
                files, shipped = shipping.bundle(folder), self._loras.missing(worker.name, loras)
        except Exception as err:  # a LoRA outside the folder, an unreadable file: the job's problem, not the worker's
            self.pool.release(worker)
            return RunOutcome("failed", str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}")
        context = {"outputs": str(self.context.outputs), "lora_folder": str(self.context.lora_folder()),
                   "checkpoints": self.context.checkpoints, "needed": self.context.needed(job.id)}  # fmt: skip
        worker.job = job.id
        on_event(WorkerAssigned(worker.name, worker.info.get("host", "?"), worker.info.get("gpus", []),
                                "shared" if shared else "shipped"))  # fmt: skip

        def forward(how: str) -> None:
            worker.actor.cancel.remote(job.id, how)

        outcome = None
        token.watch(forward)
        try:
            stream = worker.actor.run.options(num_returns="streaming").remote(
                replace(job, request=request), str(folder), files, shipped, lease, context)  # fmt: skip
            for ref in stream:
                kind, item = ray.get(ref)
                if kind == "event":
                    on_event(item)
                elif kind == "files":
                    shipping.apply_changes(folder, item, Path(self.context.lora_folder()))
                elif kind == "outcome":
                    outcome = item
        except Exception as err:
            if not _is_lost(ray, err):
                self.pool.release(worker)
                return RunOutcome("failed", f"Ray worker {worker.name}: {type(err).__name__}: {err}")
            self._loras.forget(worker.name)
            self.pool.lost(worker, ray.kill)
            return self._lost(job, worker, err, token, interrupting)
        finally:
            token.unwatch(forward)
            worker.job = None
        self.pool.release(worker)
        self._losses.pop(job.id, None)
        if outcome is None:
            return RunOutcome("failed", f"Ray worker {worker.name} ended the job without an outcome")
        if outcome.state == "cancelled" and interrupting():
            return replace(outcome, state="interrupted",
                           error="stopped by the server shutting down; resume to continue")  # fmt: skip
        return outcome

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close(self._ray.kill)
        if getattr(self, "connection", None) == "started":
            self._ray.shutdown()

    # ------------------------------------------------------------------------------- internals
    def _count(self, ray: Any, settings: RaySettings) -> int:
        """The workers to start: asked for, or one per GPU (CPU workers: one); RayError if they cannot fit."""
        unit, share = ("GPU", settings.gpus_per_worker) if settings.gpus_per_worker > 0 else ("CPU", 1.0)
        have = float(ray.cluster_resources().get(unit, 0))
        count = settings.workers or (int(have // share) if unit == "GPU" else 1)
        if count >= 1 and count * share <= have + 1e-9:
            return count
        self.close()
        has = f"{have:g} {unit}{'s' if have != 1 else ''}"
        want = f"asked for {count} worker{'s' if count != 1 else ''} of {share:g} {unit} each" if settings.workers \
            else "no worker fits"  # fmt: skip
        raise RayError(f"the Ray cluster has {has} ({want}): add {unit} nodes (`ray start --address=HEAD:6379` on "
                       "each; `ray status` lists them), or ask for fewer --workers")  # fmt: skip

    def _probe(self, handle: _Handle) -> None:
        ray = self._ray
        handle.shares = bool(ray.get(handle.actor.sees.remote(*self._marker)))
        handle.info = ray.get(handle.actor.info.remote())

    def _portable(self, job: Job, folder: Path) -> tuple[dict, list[str]]:
        """The request with its LoRAs named relative to the LoRA folder (valid on any worker), and their files."""
        root = Path(self.context.lora_folder())
        full = absolute(job.request, folder, root).get("loras") or []
        paths = [r["path"] for r in full if isinstance(r, dict) and isinstance(r.get("path"), str) and r["path"]]
        request = dict(job.request)
        if paths:
            request["loras"] = [{**r, "path": Path(r["path"]).relative_to(root).as_posix()}
                                if isinstance(r, dict) and r.get("path") in paths else r for r in full]  # fmt: skip
        return request, paths

    def _lost(self, job: Job, worker: _Handle, err: Exception, token: CancelToken,
              interrupting: Callable[[], bool]) -> RunOutcome:  # fmt: skip
        where = worker.info.get("host", "?")
        what = f"Ray worker {worker.name} on {where} was lost while running it ({type(err).__name__})"
        if interrupting():
            return RunOutcome("interrupted", f"{what}; resume to continue")
        if token.cancelled:
            return RunOutcome("cancelled", f"{what} as it was being cancelled")
        self._losses[job.id] += 1
        if self._losses[job.id] >= MAX_LOSSES:
            del self._losses[job.id]
            return RunOutcome("failed", f"{what}; its workers were lost {MAX_LOSSES} times in a row, so it is not "
                              "retried again (resume to try once more)")  # fmt: skip
        return RunOutcome("queued", f"{what}; it resumes from its last finished section on the next free worker")


def _connect(ray: Any, settings: RaySettings) -> str:
    """Attach to the process's Ray session, a cluster at `settings.address`, or start a local instance."""
    if ray.is_initialized():
        return "attached"
    try:
        if settings.address:
            ray.init(address=settings.address, namespace="framepack", log_to_driver=True)
            return "connected"
        ray.init(namespace="framepack")
        return "started"
    except ConnectionError as err:
        raise RayError(f"could not reach the Ray cluster at {settings.address!r}: {err} (is `ray start --head` "
                       "running there? `ray status` on that machine says)") from None  # fmt: skip


def _address(ray: Any) -> str:
    """The cluster's address for messages (the GCS address of this session)."""
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:
        return "?"


def _is_lost(ray: Any, err: Exception) -> bool:
    """The worker process (or its node) is gone, as opposed to an error in what it ran."""
    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
             "ObjectLostError", "OwnerDiedError")  # fmt: skip
    return isinstance(err, tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n)))


def _worker_class() -> type:
    from framepack.jobs.ray_worker import Worker

    return Worker
