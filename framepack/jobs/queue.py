"""The job queue: what every front end calls (submit, cancel, pause, resume, move, re-run, branch,
delete, events, files). It composes the job layer's parts:

    records.py     what a job is: states, kinds, `Job`, errors, request building and checks
    store.py       `JobStore`: SQLite (WAL) + job.json records, recovery of a damaged database or folder
    eventlog.py    `EventLog`: events with sequence numbers, buffered history, live progress, waiting
    runner.py      the `Runner` protocol ("run this job, report events, honour cancel, save resume
                   state") and `InProcessRunner`, the default
    dispatcher.py  `Dispatcher`: worker threads (one per runner slot) claiming queued jobs atomically
    ray_runner.py  the Ray backend (`RayRunner`; its actors: ray_worker.py; file shipping: shipping.py)

Contract: each worker runs one job at a time, in queue order (`move` reorders queued jobs); a job that
was `running` when its process died is found `interrupted` at the next start and `resume` continues it
from its last finished section (same seed -> same video as an uninterrupted run). Cancelled, failed
and paused jobs keep their partial MP4 and can be resumed too. A frame edit is one image and simply
runs again. `branch` makes a new job from a video job's state after K sections (framepack.branching):
its folder gets copies of the parent's inputs, checkpoints and shared segments at once. Nothing here
knows about HTTP or widgets; the wording of progress is the front ends' (framepack.app.progress).
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from framepack.checkpoints import KeepPolicy
from framepack.config import EditRequest, RequestError, request_from_json
from framepack.jobs.dispatcher import Dispatcher
from framepack.jobs.eventlog import EventLog, state_event
from framepack.jobs.records import (
    INPUT,
    JOBS_DIR,
    LOCK_NAME,
    RESUMABLE,
    STATE_DIR,
    VIDEO,
    FileAccessError,
    Job,
    JobConflict,
    JobError,
    JobNotFound,
    StorageFull,
    absolute,
    build_request,
    check_options,
    check_runnable,
    decode_upload,
    job_kind,
    space_needed,
    stored_uploads,
    upload_file,
)
from framepack.jobs.runner import InProcessRunner, RunContext, Runner, RunOutcome
from framepack.jobs.store import FolderLock, JobStore
from framepack.outputs import disk_free, disk_full_message, is_disk_full


class JobQueue:
    """The persistent queue of one outputs folder and its worker (see the module docstring).

    `loader(model_name)` returns a `framepack.pipeline.Pipeline`; the default runner keeps one loaded and
    swaps it when a job asks for another model (`runner`: another `Runner`, or a factory making one from
    the queue's `RunContext`, e.g. `framepack.jobs.ray_runner.RayRunner`). `models` are the names jobs
    may use; `checkpoints`: the section checkpoints kept per video job ("all", N or "none");
    `requeue_running`: jobs found running at startup (their workers died with the old server) go back to
    the front of the queue instead of becoming interrupted.
    """

    def __init__(
        self,
        outputs: str | os.PathLike,
        *,
        loader: Callable[[str], Any],
        models: Sequence[str],
        default_model: str | None = None,
        start_worker: bool = True,
        lora_dir: str | os.PathLike | None = None,
        checkpoints: str | int | None = "all",
        runner: Runner | Callable[[RunContext], Runner] | None = None,
        requeue_running: bool = False,
    ) -> None:
        self.outputs = Path(outputs).expanduser().resolve()
        self.jobs_dir = self.outputs / JOBS_DIR
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.models = tuple(models)
        if not self.models:
            raise ValueError("at least one model name is needed")
        self.default_model = default_model or self.models[0]
        if self.default_model not in self.models:
            raise ValueError(f"default model {self.default_model!r} is not among {self.models}")
        self.lora_dir = lora_dir  # the LoRA folder jobs name their files in (None: <FRAMEPACK_HOME>/loras)
        self.checkpoints = KeepPolicy.parse(checkpoints)  # section checkpoints kept per video job (branching)
        self._loras: Any = None
        self._lock = threading.RLock()  # guards the store and the event log together
        self._thumbs: dict[str, tuple[tuple, dict[int, bytes]]] = {}  # job -> (video file stamp, JPEG by frame)
        self._folder_lock = FolderLock(self.outputs / LOCK_NAME)
        try:
            self.log = EventLog(self._lock)
            self.store = JobStore(self.outputs, self.jobs_dir, default_model=self.default_model, lock=self._lock,
                                  live=self.log.live)  # fmt: skip
            self.store.recover(lambda job: job.output, requeue=requeue_running)
        except BaseException:
            self._folder_lock.close()
            raise
        context = RunContext(self.outputs, lambda: self.lora_library().folder, self.checkpoints, self._needed_by)
        if runner is None:
            runner = InProcessRunner(loader, context)
        elif not hasattr(runner, "run"):  # a factory: RunContext -> Runner (e.g. framepack.jobs.ray_runner)
            try:
                runner = runner(context)
            except BaseException:  # e.g. the Ray cluster cannot hold the workers: this folder stays free
                self.store.close()
                self._folder_lock.close()
                raise
        self.runner = runner
        self.dispatcher = Dispatcher(self.store, self.log, runner, lock=self._lock, needed=self._needed_by)
        if start_worker:
            self.dispatcher.start()

    @property
    def problems(self) -> list[str]:
        """What startup found (a damaged database, jobs that died running, missing folders)."""
        return self.store.problems

    def workers(self) -> list[dict]:
        """What runs the jobs: one entry per worker (name, where, model loaded, the job it runs)."""
        listing = getattr(self.runner, "workers", None)
        if listing is not None:
            return listing()
        job = next(iter(self.dispatcher.running()), None)
        return [{"name": "in-process", "host": None, "gpus": [], "model": getattr(self.runner, "model", None),
                 "job": job}]  # fmt: skip

    @property
    def storage_problem(self) -> str | None:
        """Why queued jobs wait (disk space), for the front ends."""
        return self.store.storage_problem

    # ------------------------------------------------------------------------------- operations
    def lora_library(self) -> Any:
        """The LoRA folder (`framepack.lora.LoraLibrary`) whose files jobs may use: the same folder as the
        pipelines' (`RuntimeOptions.lora_dir`), so the server passes one `--lora-dir` to both."""
        if self._loras is None:
            from framepack.lora import LoraLibrary

            self._loras = LoraLibrary(self.lora_dir)
        return self._loras

    def submit(
        self,
        image: bytes | np.ndarray | str | os.PathLike,
        params: dict,
        *,
        model: str | None = None,
        options: dict | None = None,
        parent: str | None = None,
        uploads: dict[str, bytes | np.ndarray | str | os.PathLike] | None = None,
    ) -> Job:
        """Queue a job: a video, or a frame edit (`params["kind"] == "edit"`). `uploads`: the other images
        by name (`upload_fields(kind)`: end_image; image_mask, control_N, control_N_mask). ImageError for an
        unusable image, RequestError for bad parameters or model (the engine's whole check, as the CLI's)."""
        from PIL import Image

        uploads = {k: v for k, v in (uploads or {}).items() if v is not None}
        request = build_request(params, uploads)
        kind = job_kind(request.kind)
        model = self._check_model(model)
        options = check_options(options)
        pixels = decode_upload(image, None, alpha=kind.alpha)  # ImageError with a precise message for corrupt files
        extra = {name: decode_upload(source, name, alpha=kind.alpha, mask=name.endswith("mask"))
                 for name, source in uploads.items()}  # fmt: skip
        needed = space_needed(request, pixels.shape[:2], model)
        if disk_free(self.jobs_dir) < needed:
            raise StorageFull(disk_full_message(self.outputs, needed))
        folder = self.store.new_folder()
        try:
            try:
                Image.fromarray(pixels).save(folder / INPUT, compress_level=1)
                stored = request.to_json_dict()  # files relative to the job folder; made absolute when it runs
                for name, px in extra.items():
                    Image.fromarray(px).save(folder / upload_file(name), compress_level=1)
            except OSError as err:
                if is_disk_full(err):
                    raise StorageFull(disk_full_message(self.outputs, needed)) from err
                raise
            check_runnable(stored, folder, model, self.lora_library())  # the engine's whole check, as the CLI's
            job = self._insert(folder, model, stored, options, parent)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.dispatcher.wake()
        return job

    def _insert(self, folder: Path, model: str, stored: dict, options: dict, parent: str | None,
                branch: dict | None = None) -> Job:  # fmt: skip
        """Queue the job whose files are in `folder`: its row, record and first event together (under the
        lock, so the worker cannot claim it in between)."""
        with self._lock:
            job = self.store.insert(folder.name, model, stored, options, parent, branch)
            self.log.reset(job.id)
            self.log.emit(job.id, {"type": "state", "state": "queued", **({"branch": branch} if branch else {})})
            return job

    def get(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def list(self, states: Sequence[str] | None = None) -> list[Job]:
        """Jobs, queued ones first in run order, then the others (running first, newest first)."""
        jobs = self.store.list()
        return [j for j in jobs if j.state in states] if states else jobs

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job now, or a running one after its current step (keeping a valid MP4)."""
        with self._lock:
            job = self.get(job_id)
            if job.state == "queued":
                job = self.store.update(job_id, state="cancelled", finished=time.time())
            elif job.state == "running" and (token := self.dispatcher.token(job_id)) is not None:
                token.cancel()
                return job
            elif job.state == "running":  # not the worker's job (a run whose end could not be recorded)
                self.dispatcher.finish(job_id, RunOutcome("cancelled", "cancelled; its run had ended without a record"))
                return self.get(job_id)
            else:
                raise JobConflict(f"job {job_id} is {job.state}: only queued or running jobs can be cancelled")
            self.log.emit(job_id, state_event(job))  # under the lock: events stay in state order
            return job

    def delete(self, job_id: str) -> None:
        """Remove a job that is not running, with its folder and files. A job folder that is a symbolic
        link loses the link (what it points to is not the queue's to delete)."""
        with self._lock:
            job = self.get(job_id)
            if job.state == "running" and self.dispatcher.token(job_id) is not None:
                raise JobConflict(f"job {job_id} is running: cancel it first, then delete it")
            folder = self.jobs_dir / job_id
            if folder.is_symlink():
                folder.unlink()
            else:
                shutil.rmtree(folder, ignore_errors=True)
            if folder.exists() or folder.is_symlink():
                raise JobError(f"job {job_id}: its folder {folder} could not be removed (permissions?); "
                               "the job is kept")  # fmt: skip
            self.store.delete(job_id)
            self._thumbs.pop(job_id, None)
            self.log.forget(job_id)

    def move(self, job_id: str, position: int) -> Job:
        """Put a queued job at `position` in the queue (0 = next; clamped to the queue's length)."""
        with self._lock:
            job = self.get(job_id)
            if job.state != "queued":
                raise JobConflict(f"job {job_id} is {job.state}: only queued jobs can be reordered")
            ids = self.store.queued_ids()
            ids.remove(job_id)
            ids.insert(max(0, min(int(position), len(ids))), job_id)
            self.store.requeue(ids)
            return self.get(job_id)

    def resume(self, job_id: str) -> Job:
        """Re-queue an interrupted, cancelled or failed job; it continues from its last finished section."""
        with self._lock:
            job = self.get(job_id)
            if job.state not in RESUMABLE:
                raise JobConflict(f"job {job_id} is {job.state}: only {', '.join(sorted(RESUMABLE))} jobs resume")
            if not job.resumable:
                raise JobConflict(f"job {job_id} cannot be resumed: {job.error or 'its folder or input is missing'}")
            self.store.requeue([job_id])
            job = self.store.update(job_id, state="queued", finished=None, error=None)
            self.log.reset(job_id)  # a new run: its stream starts afresh (the worker cannot claim it yet)
            self.log.emit(job_id, {"type": "state", "state": "queued", "resumed": True})
        self.dispatcher.wake()
        return job

    def rerun(self, job_id: str, params: dict | None = None, *, model: str | None = None,
              options: dict | None = None) -> Job:  # fmt: skip
        """A new job with this job's image and parameters, `params` overriding some of them."""
        job = self.get(job_id)
        image = self.jobs_dir / job_id / INPUT
        if not image.is_file():
            raise JobConflict(f"job {job_id} has no input image left ({image} is missing); it cannot be re-run")
        merged = {**job.params(), **(params or {})}
        uploads = {name: self.jobs_dir / job_id / Path(rel).name for name, rel in stored_uploads(job.request).items()}
        missing = sorted(name for name, path in uploads.items() if not path.is_file())
        if missing:
            raise JobConflict(f"job {job_id} has lost its uploaded {', '.join(missing)}; it cannot be re-run")
        return self.submit(image, merged, model=model or job.model, options={**job.options, **(options or {})},
                           parent=job_id, uploads=uploads)  # fmt: skip

    def branch(self, job_id: str, at: int | str, params: dict | None = None, *, options: dict | None = None) -> Job:
        """A new job from video job `job_id`'s state after `at` finished sections (generation order; "last":
        the most the changes allow), `params` (`branching.BRANCH_FIELDS`) changing from section at+1 on.
        Its folder gets copies of the parent's inputs, checkpoints 0..at and the shared sections' video
        segments now, so it stays whole if the parent is deleted. RequestError for what cannot be
        branched (the message says what can change and where); JobConflict for a job with no video."""
        from PIL import Image

        from framepack.branching import check_changeable, find_parent, plan_branch, prepare
        from framepack.checkpoints import CheckpointError
        from framepack.registry import get_spec

        parent_job = self.get(job_id)
        if parent_job.kind != "video":
            raise JobConflict(f"job {job_id} is a {parent_job.kind} job: only videos can be branched")
        if params is not None and not isinstance(params, dict):
            raise RequestError(f"params must be a JSON object, got {type(params).__name__}")
        params = dict(params or {})
        check_changeable(params)  # before anything is copied (output / overwrite are the server's here)
        source = self.jobs_dir / job_id
        uploads = {name: source / Path(rel).name for name, rel in stored_uploads(parent_job.request).items()}
        missing = sorted(n for n, path in {"input": source / INPUT, **uploads}.items() if not path.is_file())
        if missing:
            raise JobConflict(f"job {job_id} has lost its {', '.join(missing)} image; it cannot be branched")
        request = build_request({**parent_job.params(), **params}, uploads)  # the branch's, checked like a submit
        options = check_options({**parent_job.options, **(options or {})})
        with Image.open(source / INPUT) as img:
            width, height = img.size
        needed = space_needed(request, (height, width), parent_job.model)  # the whole video, as a submit's
        if disk_free(self.jobs_dir) < needed:
            raise StorageFull(disk_full_message(self.outputs, needed))
        folder = self.store.new_folder()
        try:
            for path in (source / INPUT, *uploads.values()):
                shutil.copy2(path, folder / path.name)
            stored, lora = request.to_json_dict(), self.lora_library().folder
            runs_as = absolute(stored, folder, lora)  # what the worker will run
            base = absolute(parent_job.request, folder, lora)  # the parent's request, on the copied inputs
            for attempt in range(3):  # a running parent replaces its video after each section: read it again
                try:
                    parent = find_parent(source / VIDEO, f"job {job_id}")
                    plan = plan_branch(parent, at, {k: runs_as[k] for k in params}, get_spec(parent_job.model),
                                       base=base)  # fmt: skip
                    prepare(plan, folder / STATE_DIR, Path(runs_as["output"]), keep=self.checkpoints)
                    break
                except CheckpointError:
                    if parent_job.state != "running" or attempt == 2:
                        raise
                    shutil.rmtree(folder / STATE_DIR, ignore_errors=True)
            if plan.request.to_json_dict() != request_from_json(runs_as).to_json_dict():
                raise JobError("internal error: the branch's request differs from its job's")
            info = {**plan.info(), "parent": job_id, "parent_video": f"{job_id}/{VIDEO}"}
            job = self._insert(folder, parent_job.model, stored, options, job_id, info)
        except OSError as err:
            shutil.rmtree(folder, ignore_errors=True)
            if is_disk_full(err):
                raise StorageFull(disk_full_message(self.outputs, needed)) from err
            raise
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.dispatcher.wake()
        return job

    def pause(self, job_id: str) -> Job:
        """Stop a running video job after the section it is making; it becomes `paused` (resumable)."""
        with self._lock:
            job = self.get(job_id)
            token = self.dispatcher.token(job_id)
            if job.state != "running" or token is None:
                raise JobConflict(f"job {job_id} is {job.state}: only a running job can be paused")
            if job.kind != "video":
                raise JobConflict(f"job {job_id} is a {job.kind} job (one image): cancel it instead")
            token.pause()
            return job

    def sections(self, job_id: str) -> list[dict]:
        """The job's finished sections (generation order): where each one's frames are in its video,
        and whether it can be re-rolled (a branch before it) or branched after (`branching.section_table`)."""
        from framepack.branching import section_table
        from framepack.checkpoints import SectionStore, sections_dir
        from framepack.video import probe

        job = self.get(job_id)
        video = self.jobs_dir / job_id / VIDEO
        if job.kind != "video" or not video.is_file():
            return []
        try:
            store = SectionStore.open(sections_dir(video), f"job {job_id}")
            return section_table(store, probe(video)["frames"])
        except ValueError:  # no checkpoints (turned off, or an older job), or a video being replaced
            return []

    def section_frame(self, job_id: str, section: int, which: str = "last") -> bytes:
        """A JPEG (at most 256 px wide) of a finished section's first or last frame (the UI's strip);
        JobNotFound if there is none."""
        from PIL import Image

        from framepack.video import frames_at

        if which not in ("first", "last"):
            raise JobNotFound(f"a section's frame is 'first' or 'last', not {which!r}")
        rows = {r["section"]: r for r in self.sections(job_id)}
        if section not in rows:
            raise JobNotFound(f"job {job_id} has no finished section {section}")
        video = self.jobs_dir / job_id / VIDEO
        st = video.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        cached = self._thumbs.get(job_id)
        if cached is None or cached[0] != stamp:  # every section's two frames in one decoding pass
            jpegs = {}
            for i, frame in frames_at(video, [i for r in rows.values() for i in r["frames"]]).items():
                image = Image.fromarray(frame)
                image.thumbnail((256, 256))
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=85)
                jpegs[i] = buf.getvalue()
            cached = (stamp, jpegs)
            self._thumbs[job_id] = cached
            while len(self._thumbs) > 16:  # the strips of the jobs looked at last
                self._thumbs.pop(next(iter(self._thumbs)))
        jpeg = cached[1].get(rows[section]["frames"][0 if which == "first" else 1])
        if jpeg is None:
            raise JobNotFound(f"job {job_id}: section {section}'s {which} frame is not in its video")
        return jpeg

    def events(self, job_id: str, after: int = 0) -> list[dict]:
        """The job's events with seq > after, in order. A job with no events in this process (e.g. one
        that finished before a restart) gets one `state` event describing where it stands."""
        return self.log.events(job_id, after, lambda: self.get(job_id))

    def wait_events(self, job_id: str, after: int = 0, timeout: float = 1.0) -> list[dict]:
        """Like `events`, but waits up to `timeout` seconds for a new one."""
        deadline = time.monotonic() + timeout
        with self.log.changed:
            while True:
                found = self.events(job_id, after)
                left = deadline - time.monotonic()
                if found or left <= 0:
                    return found
                self.log.changed.wait(left)

    def wait(self, job_id: str, timeout: float = 60.0) -> Job:
        """Block until the job is terminal (TimeoutError after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        with self.log.changed:
            while True:
                job = self.get(job_id)
                if job.terminal:
                    return job
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} is still {job.state} after {timeout} s")
                self.log.changed.wait(min(left, 0.5))

    def preview(self, job_id: str) -> tuple[int, np.ndarray] | None:
        """(seq, RGB uint8 image) of the running job's latest latent preview, if any."""
        with self._lock:
            self.get(job_id)
            return self.log.preview(job_id)

    def preview_png(self, job_id: str) -> bytes | None:
        from PIL import Image

        found = self.preview(job_id)
        if found is None:
            return None
        buf = io.BytesIO()
        Image.fromarray(found[1]).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def file(self, relative: str) -> Path:
        """A file inside the job folders, from a path relative to them ('<id>/video.mp4').

        FileAccessError for anything that could leave the folder (absolute paths, '..', links out of
        it) or for the database and lock files; JobNotFound when there is no such file."""
        if not relative or "\x00" in relative or "\\" in relative:
            raise FileAccessError(f"not an allowed file path: {relative!r}")
        parts = Path(relative).parts
        if Path(relative).is_absolute() or any(p in ("..", ".") for p in parts) or relative.startswith("/"):
            raise FileAccessError(f"file paths must stay inside the outputs folder; {relative!r} does not")
        root = self.jobs_dir.resolve()
        path = (root / relative).resolve()
        if not path.is_relative_to(root) or path == root:
            raise FileAccessError(f"file paths must stay inside the outputs folder; {relative!r} does not")
        if not path.is_file():
            raise JobNotFound(f"no file {relative!r} in the outputs folder")
        return path

    def job_file(self, job_id: str, kind: str) -> Path:
        """A job's 'video', 'metadata' (sidecar), 'image' (the start image) or 'edit' (a frame edit's
        image). JobNotFound (with the reason) if absent."""
        job = self.get(job_id)
        if kind == "edit" and job.kind != EditRequest.kind:
            raise JobNotFound(f"job {job_id} is a {job.kind} job: it has no edited image")
        rel = {"video": job.video, "metadata": job.metadata, "image": f"{job_id}/{INPUT}",
               "edit": job.output if job.kind == EditRequest.kind else None}[kind]  # fmt: skip
        if rel is None:
            raise JobNotFound(f"job {job_id} ({job.state}) has no {'edited image' if kind == 'edit' else kind} yet")
        try:
            return self.file(rel)
        except JobNotFound:
            raise JobNotFound(f"job {job_id}: its {kind} file {rel} is missing") from None

    def counts(self) -> dict[str, int]:
        return self.store.counts()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker; a running job is cancelled after its current step and left `interrupted`
        (resumable). Releases the folder lock."""
        if self.dispatcher.stopped:
            return
        self.dispatcher.close(timeout)
        self.store.close()
        self._folder_lock.close()

    def __enter__(self) -> JobQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------- internals
    def _check_model(self, model: str | None) -> str:
        model = model or self.default_model
        if model not in self.models:
            raise RequestError(f"model must be one of {', '.join(self.models)}, got {model!r}")
        return model

    def _needed_by(self, job_id: str) -> int:
        """About the disk a queued job needs (its request and start image), 0 when it cannot be told."""
        from PIL import Image

        try:
            job = self.get(job_id)
            with Image.open(self.jobs_dir / job_id / INPUT) as img:
                width, height = img.size
            return space_needed(request_from_json(job.request), (height, width), job.model)
        except Exception:  # a damaged record or image: the run itself will say what is wrong
            return 0
