"""The job layer: a persistent queue of generation jobs (videos and frame edits), one worker, and each
job's files.

Every front end (CLI `serve`/`ui`, the HTTP API, the Gradio UI) goes through `JobQueue`; nothing
here knows about HTTP or widgets.

Storage, all inside one outputs folder:

    OUTPUTS/jobs.sqlite3        the queue and history (SQLite, WAL: readers never wait for the worker)
    OUTPUTS/jobs.lock           held (flock) by the one process serving this folder
    OUTPUTS/jobs/<id>/input.png the start image as the engine sees it (decoded, EXIF/alpha applied)
    OUTPUTS/jobs/<id>/video.mp4 the video (grows section by section) and video.json, its sidecar
    OUTPUTS/jobs/<id>/edit.png  a frame edit's image (kind "edit") and edit.json, its sidecar
    OUTPUTS/jobs/<id>/<upload>.png  the other uploaded images: end_image, image_mask, control_N, control_N_mask
    OUTPUTS/jobs/<id>/state/    resume state, saved by the engine after every finished section
    OUTPUTS/jobs/<id>/.video.sections/  section checkpoints (framepack.checkpoints): what a branch starts from
    OUTPUTS/jobs/<id>/job.json  a copy of the job's record, rewritten on every state change

States: queued -> running -> done | failed | cancelled | interrupted | paused. A job that was `running` when
its process died is found so at the next start and becomes `interrupted`; `resume` re-queues it and
the engine continues from its last finished section (same seed -> same video as an uninterrupted
run). Cancelled and failed jobs keep their partial MP4 and can be resumed too; `pause` stops a running
video after its current section (paused: resumable). `branch` makes a new job from a video job's state
after K sections (framepack.branching): its folder gets copies of the parent's inputs, checkpoints and
shared segments at once, so it does not need the parent afterwards; `Job.branch` says where it came from.

Contract:
  * One worker thread runs one job at a time, in queue order (`move` reorders queued jobs).
  * Every operation is a short transaction on one SQLite connection behind a lock, so concurrent
    callers (HTTP threads, the UI, the worker) always see a consistent queue; no job is lost or
    claimed twice.
  * A damaged database is moved aside and the queue rebuilt from the job folders' job.json; a missing
    or damaged job folder or record is reported in that job's entry (state "failed" with an error)
    and never stops the queue. Startup problems are listed in `JobQueue.problems`.
  * Request parameters are derived from the request's fields: whatever fields `GenerationRequest` has,
    a video job accepts; a frame edit (`"kind": "edit"`, `config.EditRequest`) accepts its own. The
    server owns every field that holds a path (`SERVER_FIELDS`): images are uploaded with the job.
  * Job kinds (`KINDS`): a video resumes from its last finished section; a frame edit is one image and
    simply runs again. One worker call (`Pipeline.run`) runs either; what differs is data (the result
    file, the uploads a kind takes) and the engine's check at submission (`_check_runnable`).
  * A frame edit's reference images are uploaded as control_2, control_3, ... (the start image is control
    1), each with an optional control_N_mask; the start image's mask is image_mask. In `params`, the
    `controls` list gives only each reference's RoPE index, `{"index": N}` (or null: the preset's), one
    entry per uploaded reference, in order; without `controls` every upload gets the preset's index.
    Edit images keep their transparency (the engine reads an alpha channel as a mask, as with the CLI).
  * LoRAs: a job names its files in the queue's LoRA folder (`lora_dir`, the pipelines' `--lora-dir`):
    by name ('style.safetensors', 'sub/x.safetensors') or by an absolute path inside it, never a file
    elsewhere; each must be a readable safetensors file when the job is submitted.
  * Events: every engine event and state change of a job becomes a small JSON-able dict with a
    process-wide increasing `seq`; `events()` returns them in order (the latest ~2000 per job),
    ending with a `state` event whose state is terminal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import os
import re
import shutil
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from framepack import jobstate
from framepack.checkpoints import KeepPolicy
from framepack.config import VIDEO_ONLY, EditRequest, GenerationRequest, RequestError, request_from_json
from framepack.events import Cancelled, CancelToken, Failed, Finished, SectionDone, StageStarted, StepProgress
from framepack.outputs import disk_free, disk_full_message, disk_needed, is_disk_full
from framepack.outputs import job_id as new_job_id
from framepack.sections import FPS

STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted", "paused")
TERMINAL = frozenset({"done", "failed", "cancelled", "interrupted", "paused"})
RESUMABLE = frozenset({"interrupted", "cancelled", "failed", "paused"})
# Request fields that hold paths on the server. A client never sets them as parameters (that would let
# it make the server read or write any file); the server fills them from uploads and the job folder.
# A new request field that holds a path must be added here (tests/test_jobs.py checks the names).
SERVER_FIELDS = frozenset({"image", "output", "overwrite", "end_image", "video", "keyframes", "image_mask"})
# Of those, single images a client may upload with a job (saved as <field>.png in its folder).
IMAGE_UPLOADS = ("end_image", "image_mask")
# The paths inside each `controls` entry of a frame edit (config.EditControl): server-owned too. They come
# from the uploads control_N (image) and control_N_mask (mask), N = 2, 3, ... in the order of `controls`.
CONTROL_UPLOADS = {"image": "", "mask": "_mask"}  # EditControl field -> upload name suffix
EDIT_REFERENCES = 4  # reference images (control_2 .. control_5) one frame edit job may upload
INPUT, VIDEO, EDIT, STATE_DIR, RECORD = "input.png", "video.mp4", "edit.png", "state", "job.json"
_CONTROL_NAME = re.compile(r"^control_(\d+)(_mask)?$")
DB_NAME, LOCK_NAME, JOBS_DIR = "jobs.sqlite3", "jobs.lock", "jobs"

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_LOG_LIMIT = 2000  # events kept per job for late subscribers (steps of ~80 sections at 25 steps)
_PROGRESS_WRITE_S = 1.0  # step events reach the database at most this often (memory always has the latest)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    options TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    progress TEXT NOT NULL DEFAULT '{}',
    result TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    video TEXT,
    metadata TEXT,
    parent TEXT,
    branch TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, seq);
"""
_COLUMNS = ("id", "seq", "state", "model", "request", "options", "created", "started", "finished", "progress",
            "result", "error", "video", "metadata", "parent", "branch")  # fmt: skip
_JSON_COLUMNS = ("request", "options", "progress", "result")


class JobError(Exception):
    """A queue operation that cannot be done; the message says why."""


class JobNotFound(JobError):
    pass


class JobConflict(JobError):
    """The operation does not fit the job's state (e.g. cancelling a finished job)."""


class FileAccessError(JobError):
    """A file path that points outside the job folders (or is otherwise not allowed)."""


class StorageFull(JobError):
    """The outputs folder's disk is full (or too full for a job); the message says what is free and needed."""


@dataclasses.dataclass(frozen=True)
class JobKind:
    """What differs between job kinds (`GenerationRequest.kind`) in the job layer: data, not code paths."""

    request: type  # the request class (`config.request_from_json` picks it from the stored "kind")
    result: str  # the result file in the job folder; its sidecar has the same name with .json
    uploads: tuple[str, ...]  # the images a client may upload besides the start image
    unused: tuple[str, ...] = ()  # request fields this kind has no use for (left out of its parameters)
    alpha: bool = False  # uploaded images keep their transparency (a frame edit reads alpha as a mask)


KINDS: dict[str, JobKind] = {
    "video": JobKind(GenerationRequest, VIDEO, ("end_image",)),
    EditRequest.kind: JobKind(EditRequest, EDIT, ("image_mask", *(f"control_{n}{suffix}" for n in
                              range(2, 2 + EDIT_REFERENCES) for suffix in CONTROL_UPLOADS.values())),
                              VIDEO_ONLY, alpha=True),
}  # fmt: skip


def job_kind(name: object) -> JobKind:
    if name not in KINDS:
        raise RequestError(f"unknown job kind {name!r}; accepted: {', '.join(KINDS)}")
    return KINDS[name]


@dataclasses.dataclass(frozen=True)
class Job:
    id: str
    state: str
    model: str
    request: dict  # the request's fields ("kind": "edit" for a frame edit); its files relative to the job folder
    options: dict  # per-job runtime options (preserved_memory_gb)
    created: float
    started: float | None
    finished: float | None
    position: int | None  # 0 = next to run; None unless queued
    progress: dict  # the latest event's state: stage, section, sections, step, steps, frames, seconds, text
    result: dict  # the result's summary(): a video's frames, seconds, ...; an edit's image ("<id>/edit.png"), ...
    error: str | None
    video: str | None  # paths relative to the jobs folder ("<id>/video.mp4")
    metadata: str | None
    parent: str | None  # the job this one re-runs or branches from
    resumable: bool
    branch: dict | None = None  # a branch's parent, branch point and what changed (framepack.branching)
    seq: int = 0  # queue order (queued jobs run by increasing seq); kept in job.json for a rebuild

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def kind(self) -> str:
        """The job kind: video, or edit (a frame edit)."""
        kind = self.request.get("kind", "video")
        return kind if isinstance(kind, str) else "video"

    @property
    def output(self) -> str | None:
        """The result file relative to the jobs folder (the video, or the edited image), once there is one."""
        image = self.result.get("image")
        return self.video or (image if isinstance(image, str) else None)

    def params(self) -> dict:
        """The request without the server-owned fields (a frame edit's `controls` keep only their index):
        what a client can submit again, with the same uploads."""
        params = {k: v for k, v in self.request.items() if k not in SERVER_FIELDS}
        if isinstance(params.get("controls"), list):
            params["controls"] = [{k: v for k, v in c.items() if k not in CONTROL_UPLOADS} if isinstance(c, dict)
                                  else c for c in params["controls"]]  # fmt: skip
        return params

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def request_fields(kind: str = "video") -> list[dataclasses.Field]:
    """The request fields a client may set for a job of `kind`, in declaration order."""
    spec = job_kind(kind)
    return [f for f in dataclasses.fields(spec.request) if f.name not in SERVER_FIELDS and f.name not in spec.unused]


def build_request(params: dict, uploads: Iterable[str] = ()) -> GenerationRequest:
    """Client parameters and the names of the images uploaded with them (`upload_fields`) -> a validated
    request (defaults for what is missing) naming the job folder's files: input.png, <upload>.png and the
    result (video.mp4, or edit.png for `"kind": "edit"`). RequestError lists problems."""
    if not isinstance(params, dict):
        raise RequestError(f"parameters must be a JSON object, got {type(params).__name__}")
    owned = sorted(SERVER_FIELDS & set(params))
    if owned:
        raise RequestError(
            f"{owned} cannot be given as parameters: images are uploaded with the job and the server chooses "
            "where files go"
        )
    kind_name = params.get("kind", "video")
    kind = job_kind(kind_name)
    uploads = set(uploads)
    unknown = sorted(uploads - set(kind.uploads))
    if unknown:
        hint = "" if kind is KINDS[EditRequest.kind] else ' (image_mask and control_N are for "kind": "edit")'
        raise RequestError(f"unknown image uploads {unknown} for a {kind_name} job; accepted: {list(kind.uploads)}"
                           f"{hint}")  # fmt: skip
    fields = {**params, "image": INPUT, "output": kind.result}
    fields.update({name: _upload_file(name) for name in IMAGE_UPLOADS if name in uploads})
    if "controls" in {f.name for f in dataclasses.fields(kind.request)}:  # a frame edit's reference images
        fields["controls"] = _controls(params.get("controls"), uploads)
    return request_from_json(fields).validate()


def _upload_file(name: str) -> str:
    """Where an upload is kept, relative to its job folder."""
    return f"{name}.png"


def _controls(given: Any, uploads: set[str]) -> list[dict]:
    """A frame edit's `controls` from the client's indices and the uploaded control_N / control_N_mask."""
    numbers = sorted(int(m[1]) for name in uploads if (m := _CONTROL_NAME.match(name)) and not m[2])
    if numbers != list(range(2, 2 + len(numbers))):
        raise RequestError(f"reference images are uploaded as control_2, control_3, ... in order, without gaps; got "
                           f"{', '.join(f'control_{n}' for n in numbers)}")  # fmt: skip
    for name in sorted(uploads):
        m = _CONTROL_NAME.match(name)
        if m and m[2] and f"control_{m[1]}" not in uploads:
            raise RequestError(f"{name} was uploaded without its image control_{m[1]}")
    if given is None:  # every uploaded reference at the preset's index
        given = [{}] * len(numbers)
    if not isinstance(given, (list, tuple)):
        raise RequestError(f"controls must be a list with one {{'index': N or null}} per uploaded reference image "
                           f"(control_2, control_3, ...), got {given!r}")  # fmt: skip
    if len(given) != len(numbers):
        uploaded = ", ".join(f"control_{n}" for n in numbers) or "none"
        raise RequestError(f"controls lists {len(given)} reference image(s) but {len(numbers)} were uploaded "
                           f"({uploaded}): upload each one's image as control_2, control_3, ... in the order of "
                           "controls")  # fmt: skip
    out = []
    for n, entry in enumerate(given, 2):
        if not isinstance(entry, dict):
            raise RequestError(f"controls[{n - 2}] must be {{'index': N or null}}, got {entry!r}")
        owned = sorted(set(entry) & set(CONTROL_UPLOADS))
        if owned:
            raise RequestError(f"controls[{n - 2}]: {owned} cannot be given as parameters: upload the image as "
                               f"control_{n} and its mask as control_{n}_mask")  # fmt: skip
        unknown = sorted(set(entry) - {"index"})
        if unknown:
            raise RequestError(f"controls[{n - 2}]: unknown keys {unknown}; a control takes only 'index' (its image "
                               f"and mask are the uploads control_{n} and control_{n}_mask)")  # fmt: skip
        files = {key: _upload_file(f"control_{n}{suffix}") if f"control_{n}{suffix}" in uploads else None
                 for key, suffix in CONTROL_UPLOADS.items()}  # fmt: skip
        out.append({"image": files["image"], "index": entry.get("index"), "mask": files["mask"]})
    return out


def upload_fields(kind: str = "video") -> list[str]:
    """The image uploads (besides the start image) a job of `kind` accepts: end_image for a video;
    image_mask, control_N and control_N_mask for a frame edit."""
    return list(job_kind(kind).uploads)


def stored_uploads(request: dict) -> dict[str, str]:
    """The uploaded images a stored request names (relative to its job folder), by upload name."""
    found = {name: request[name] for name in IMAGE_UPLOADS if isinstance(request.get(name), str)}
    controls = request.get("controls")
    for n, c in enumerate(controls if isinstance(controls, list) else (), 2):
        for key, suffix in CONTROL_UPLOADS.items():
            if isinstance(c, dict) and isinstance(c.get(key), str):
                found[f"control_{n}{suffix}"] = c[key]
    return found


# The official page's wording for the stages before sampling (spec §7), where it has one.
STAGE_LABELS = {"loading": "Loading the model", "text encoding": "Text encoding",
                "image processing": "Image processing", "vae encoding": "VAE encoding",
                "image encoding": "Image encoding (SigLIP)", "sampling": "Sampling", "decoding": "Decoding",
                "writing": "Writing"}  # fmt: skip


def stage_label(stage: str | None) -> str:
    return STAGE_LABELS.get(stage or "", (stage or "starting").capitalize())


def describe_progress(progress: dict) -> str:
    """One human line for a job's latest progress (used by the UI and the API's `progress.text`)."""
    stage = progress.get("stage")
    if not stage:
        return ""
    if progress.get("kind") == EditRequest.kind:  # one frame: no sections or frames to count
        step = f" step {progress['step']}/{progress['steps']}" if stage == "sampling" and progress.get("steps") else ""
        return f"Frame edit · {stage_label(stage).lower()}{step}"
    frames, seconds = progress.get("frames") or 0, progress.get("seconds") or 0.0
    so_far = f"{frames} frames ({seconds:.2f} s) so far" if frames else "no frames yet"
    if progress.get("sections") and progress.get("section") is not None:
        where = f"Section {progress['section'] + 1}/{progress['sections']}"
        if stage == "sampling" and progress.get("steps"):
            return f"{where} · sampling step {progress['step']}/{progress['steps']} · {so_far}"
        return f"{where} · {stage_label(stage).lower()} · {so_far}"
    return f"{stage_label(stage)} ..."


class JobQueue:
    """The persistent queue of one outputs folder and its worker thread (see the module docstring).

    `loader(model_name)` returns a `framepack.pipeline.Pipeline`; the worker keeps one loaded and
    swaps it when a job asks for another model. `models` are the names jobs may use.
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
        self._loader = loader
        self.lora_dir = lora_dir  # the LoRA folder jobs name their files in (None: <FRAMEPACK_HOME>/loras)
        self.checkpoints = KeepPolicy.parse(checkpoints)  # section checkpoints kept per video job (branching)
        self._thumbs: dict[str, tuple[tuple, dict[int, bytes]]] = {}  # job -> (video file stamp, JPEG by frame)
        self._loras: Any = None
        self._lock = threading.RLock()  # guards the connection and the in-memory job state
        self._changed = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._seq = itertools.count(1)
        self._logs: dict[str, deque[dict]] = {}
        self._live: dict[str, dict] = {}  # the running job's latest progress (fresher than the database)
        self._previews: dict[str, tuple[int, np.ndarray]] = {}
        self._running: tuple[str, CancelToken] | None = None
        self._pipeline: tuple[str, Any] | None = None
        self._interrupting = False  # close() cancels the running job: it becomes interrupted, not cancelled
        self._last_write = 0.0
        self._unsaved: dict[str, dict] = {}  # job id -> columns of a finished run not yet in the database
        self.storage_problem: str | None = None  # why queued jobs wait (disk space), for the front ends
        self.problems: list[str] = []
        self._lockfile = _acquire_folder_lock(self.outputs / LOCK_NAME)
        try:
            self._db = self._open_db()
            self._recover()
        except BaseException:
            self._lockfile.close()
            raise
        self._worker = threading.Thread(target=self._work, name="framepack-worker", daemon=True)
        if start_worker:
            self._worker.start()

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
        options = _check_options(options)
        pixels = _decode(image, None, alpha=kind.alpha)  # ImageError with a precise message for corrupt files
        extra = {name: _decode(source, name, alpha=kind.alpha, mask=name.endswith("mask"))
                 for name, source in uploads.items()}  # fmt: skip
        needed = _space_needed(request, pixels.shape[:2], model)
        if disk_free(self.jobs_dir) < needed:
            raise StorageFull(disk_full_message(self.outputs, needed))
        folder = self._new_folder()
        try:
            try:
                Image.fromarray(pixels).save(folder / INPUT, compress_level=1)
                stored = request.to_json_dict()  # files relative to the job folder; made absolute when it runs
                for name, px in extra.items():
                    Image.fromarray(px).save(folder / _upload_file(name), compress_level=1)
            except OSError as err:
                if is_disk_full(err):
                    raise StorageFull(disk_full_message(self.outputs, needed)) from err
                raise
            _check_runnable(stored, folder, model, self.lora_library())  # the engine's whole check, as the CLI's
            job = self._insert(folder, model, stored, options, parent)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._wake.set()
        return job

    def _insert(self, folder: Path, model: str, stored: dict, options: dict, parent: str | None,
                branch: dict | None = None) -> Job:  # fmt: skip
        """Queue the job whose files are in `folder`: its row, record and first event together (under the
        lock, so the worker cannot claim it in between)."""
        with self._lock:
            with self._write() as db:
                db.execute(
                    "INSERT INTO jobs (id, seq, state, model, request, options, created, parent, branch)"
                    " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                    (folder.name, self._next_seq(db), model, json.dumps(stored), json.dumps(options), time.time(),
                     parent, json.dumps(branch) if branch else None),
                )  # fmt: skip
            job = self.get(folder.name)
            self._save_record(job)
            self._reset_log(job.id)
            self._emit(job.id, {"type": "state", "state": "queued", **({"branch": branch} if branch else {})})
            return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            row = self._row(job_id)
            position = None
            if row["state"] == "queued":
                position = self._db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < ?", (row["seq"],)
                ).fetchone()[0]
            return self._job(row, position)

    def list(self, states: Sequence[str] | None = None) -> list[Job]:
        """Jobs, queued ones first in run order, then the others newest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
            out, position = [], 0
            for row in rows:
                if row["state"] == "queued":
                    out.append(self._job(row, position))
                    position += 1
            others = [self._job(r, None) for r in rows if r["state"] != "queued"]
        others.sort(key=lambda j: (j.state != "running", -j.created))
        jobs = out + others
        return [j for j in jobs if j.state in states] if states else jobs

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job now, or a running one after its current step (keeping a valid MP4)."""
        with self._lock:
            job = self.get(job_id)
            if job.state == "queued":
                with self._write() as db:
                    db.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ?", (time.time(), job_id))
            elif job.state == "running" and self._running and self._running[0] == job_id:
                self._running[1].cancel()
                return job
            elif job.state == "running":  # not the worker's job (a run whose end could not be recorded)
                self._finish(job_id, "cancelled", error="cancelled; its run had ended without a record",
                             files=self.jobs_dir / job_id)  # fmt: skip
                return self.get(job_id)
            else:
                raise JobConflict(f"job {job_id} is {job.state}: only queued or running jobs can be cancelled")
            job = self.get(job_id)
            self._save_record(job)
            self._emit(job_id, _state_event(job))  # under the lock: events stay in state order
            return job

    def delete(self, job_id: str) -> None:
        """Remove a job that is not running, with its folder and files. A job folder that is a symbolic
        link loses the link (what it points to is not the queue's to delete)."""
        with self._lock:
            job = self.get(job_id)
            if job.state == "running" and self._running and self._running[0] == job_id:
                raise JobConflict(f"job {job_id} is running: cancel it first, then delete it")
            folder = self.jobs_dir / job_id
            if folder.is_symlink():
                folder.unlink()
            else:
                shutil.rmtree(folder, ignore_errors=True)
            if folder.exists() or folder.is_symlink():
                raise JobError(f"job {job_id}: its folder {folder} could not be removed (permissions?); "
                               "the job is kept")  # fmt: skip
            with self._write() as db:
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            self._unsaved.pop(job_id, None)
            self._logs.pop(job_id, None)
            self._previews.pop(job_id, None)
            self._thumbs.pop(job_id, None)
            self._changed.notify_all()

    def move(self, job_id: str, position: int) -> Job:
        """Put a queued job at `position` in the queue (0 = next; clamped to the queue's length)."""
        with self._lock:
            job = self.get(job_id)
            if job.state != "queued":
                raise JobConflict(f"job {job_id} is {job.state}: only queued jobs can be reordered")
            ids = [r[0] for r in self._db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq")]
            ids.remove(job_id)
            ids.insert(max(0, min(int(position), len(ids))), job_id)
            with self._write() as db:
                base = self._next_seq(db)
                db.executemany("UPDATE jobs SET seq = ? WHERE id = ?", [(base + i, j) for i, j in enumerate(ids)])
            for j in ids:  # the new order is in every record too, so a rebuilt database keeps it
                self._save_record(self.get(j))
            return self.get(job_id)

    def resume(self, job_id: str) -> Job:
        """Re-queue an interrupted, cancelled or failed job; it continues from its last finished section."""
        with self._lock:
            job = self.get(job_id)
            if job.state not in RESUMABLE:
                raise JobConflict(f"job {job_id} is {job.state}: only {', '.join(sorted(RESUMABLE))} jobs resume")
            if not job.resumable:
                raise JobConflict(f"job {job_id} cannot be resumed: {job.error or 'its folder or input is missing'}")
            with self._write() as db:
                db.execute(
                    "UPDATE jobs SET state = 'queued', seq = ?, finished = NULL, error = NULL WHERE id = ?",
                    (self._next_seq(db), job_id),
                )
            job = self.get(job_id)
            self._save_record(job)
            self._reset_log(job_id)  # a new run: its stream starts afresh (the worker cannot claim it yet)
            self._emit(job_id, {"type": "state", "state": "queued", "resumed": True})
        self._wake.set()
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
        from framepack.branching import BRANCH_FIELDS, find_parent, plan_branch, prepare
        from framepack.checkpoints import CheckpointError
        from framepack.registry import get_spec

        parent_job = self.get(job_id)
        if parent_job.kind != "video":
            raise JobConflict(f"job {job_id} is a {parent_job.kind} job: only videos can be branched")
        params = dict(params or {}) if isinstance(params, dict) or params is None else params
        if not isinstance(params, dict):
            raise RequestError(f"params must be a JSON object, got {type(params).__name__}")
        fixed = sorted(set(params) - set(BRANCH_FIELDS))
        if fixed:
            raise RequestError(f"{', '.join(fixed)} cannot change at a branch (the kept sections were made with the "
                               f"parent's); a branch can change: {', '.join(BRANCH_FIELDS)}")  # fmt: skip
        source = self.jobs_dir / job_id
        uploads = {name: source / Path(rel).name for name, rel in stored_uploads(parent_job.request).items()}
        missing = sorted(n for n, path in {"input": source / INPUT, **uploads}.items() if not path.is_file())
        if missing:
            raise JobConflict(f"job {job_id} has lost its {', '.join(missing)} image; it cannot be branched")
        request = build_request({**parent_job.params(), **params}, uploads)  # the branch's, checked like a submit
        options = _check_options({**parent_job.options, **(options or {})})
        folder = self._new_folder()
        try:
            for path in (source / INPUT, *uploads.values()):
                shutil.copy2(path, folder / path.name)
            stored, lora = request.to_json_dict(), self.lora_library().folder
            absolute = _absolute(stored, folder, lora)  # what the worker will run
            base = _absolute(parent_job.request, folder, lora)  # the parent's request, on the copied inputs
            for attempt in range(3):  # a running parent replaces its video after each section: read it again
                try:
                    parent = find_parent(source / VIDEO, f"job {job_id}")
                    plan = plan_branch(parent, at, {k: absolute[k] for k in params}, get_spec(parent_job.model),
                                       base=base)  # fmt: skip
                    prepare(plan, folder / STATE_DIR, Path(absolute["output"]), keep=self.checkpoints)
                    break
                except CheckpointError:
                    if parent_job.state != "running" or attempt == 2:
                        raise
                    shutil.rmtree(folder / STATE_DIR, ignore_errors=True)
            if plan.request.to_json_dict() != request_from_json(absolute).to_json_dict():
                raise JobError("internal error: the branch's request differs from its job's")
            info = {**plan.info(), "parent": job_id, "parent_video": f"{job_id}/{VIDEO}"}
            job = self._insert(folder, parent_job.model, stored, options, job_id, info)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._wake.set()
        return job

    def pause(self, job_id: str) -> Job:
        """Stop a running video job after the section it is making; it becomes `paused` (resumable)."""
        with self._lock:
            job = self.get(job_id)
            if job.state != "running" or not self._running or self._running[0] != job_id:
                raise JobConflict(f"job {job_id} is {job.state}: only a running job can be paused")
            if job.kind != "video":
                raise JobConflict(f"job {job_id} is a {job.kind} job (one image): cancel it instead")
            self._running[1].pause()
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
        with self._lock:
            log = self._logs.get(job_id)
            if log is None:
                job = self.get(job_id)
                return [_state_event(job)] if after <= 0 else []
            return [e for e in log if e["seq"] > after]

    def wait_events(self, job_id: str, after: int = 0, timeout: float = 1.0) -> list[dict]:
        """Like `events`, but waits up to `timeout` seconds for a new one."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = self.events(job_id, after)
                left = deadline - time.monotonic()
                if found or left <= 0:
                    return found
                self._changed.wait(left)

    def wait(self, job_id: str, timeout: float = 60.0) -> Job:
        """Block until the job is terminal (TimeoutError after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                job = self.get(job_id)
                if job.terminal:
                    return job
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} is still {job.state} after {timeout} s")
                self._changed.wait(min(left, 0.5))

    def preview(self, job_id: str) -> tuple[int, np.ndarray] | None:
        """(seq, RGB uint8 image) of the running job's latest latent preview, if any."""
        with self._lock:
            self._row(job_id)
            return self._previews.get(job_id)

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
        with self._lock:
            rows = self._db.execute("SELECT id, state FROM jobs").fetchall()
            states = [self._unsaved.get(i, {}).get("state", state) for i, state in rows]
        return {state: states.count(state) for state in sorted(set(states))}

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker; a running job is cancelled after its current step and left `interrupted`
        (resumable). Releases the folder lock."""
        if self._stop.is_set():
            return
        with self._lock:
            self._interrupting = True
            if self._running:
                self._running[1].cancel()
        self._stop.set()
        self._wake.set()
        if self._worker.is_alive():
            self._worker.join(timeout)
        with self._lock:
            self._db.close()
            self._lockfile.close()

    def __enter__(self) -> JobQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------- the worker
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._claim() if self._flush_unsaved() else None
            except Exception as err:  # storage trouble (a full disk): nothing was claimed; try again shortly
                self.storage_problem = str(err)
                job = None
            if job is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception as err:  # the worker must survive anything a job does
                self._finish(job.id, "failed", error=f"internal error: {type(err).__name__}: {err}")

    def _claim(self) -> Job | None:
        """Take the first queued job and mark it running, in one transaction (never claimed twice)."""
        with self._lock:
            if self._stop.is_set():
                return None
            row = self._db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                self.storage_problem = None
                return None
            needed = self._needed_by(row[0])
            if disk_free(self.jobs_dir) < needed:  # it would fail half way: it waits, queued, for space
                self.storage_problem = f"{disk_full_message(self.outputs, needed)}; queued jobs wait for it"
                return None
            self.storage_problem = None
            with self._write() as db:
                db.execute("UPDATE jobs SET state = 'running', started = ?, progress = '{}' WHERE id = ?",
                           (time.time(), row[0]))  # fmt: skip
            self._running = (row[0], CancelToken())
            self._live[row[0]] = {"kind": self.get(row[0]).kind}  # for its progress text (describe_progress)
            job = self.get(row[0])
        self._save_record(job)
        self._emit(job.id, {"type": "state", "state": "running"})
        return job

    def _run(self, job: Job) -> None:
        folder = self.jobs_dir / job.id
        token = self._running[1]
        if not (folder / INPUT).is_file():
            self._finish(job.id, "failed", error=f"the job's input image {folder / INPUT} is missing")
            return
        failure: list[str] = []

        def on_event(event: object) -> None:
            if isinstance(event, Failed):
                failure.append(event.error)
            self._on_engine_event(job.id, event)

        if not jobstate.exists(folder / STATE_DIR):  # a fresh run (an edit's is always): earlier files are stale
            result_file = _result_name(job.request)
            for name in (result_file, Path(result_file).with_suffix(".json").name):
                (folder / name).unlink(missing_ok=True)
        try:
            pipe = self._get_pipeline(job.id, job.model)
            request = request_from_json(_absolute(job.request, folder, self.lora_library().folder))
            with _job_options(pipe, job.options):
                result = pipe.run(request, on_event, token, state_dir=folder / STATE_DIR, checkpoints=self.checkpoints)
        except Exception as err:  # engine failures (after a sidecar), bad requests/images, missing weights
            if is_disk_full(err):
                error = disk_full_message(self.outputs, self._needed_by(job.id))
            elif failure:
                error = failure[0]
            elif isinstance(err, ValueError):  # RequestError, ImageError, a damaged resume state: say it plainly
                error = str(err)
            else:
                error = f"{type(err).__name__}: {err}"
            self._finish(job.id, "failed", error=error, files=folder)
            return
        state = {"finished": "done", "cancelled": "cancelled"}.get(result.status, "failed")
        if state == "cancelled" and self._interrupting:
            state = "interrupted"
        elif state == "cancelled" and token.paused:
            state = "paused"
        info = _relative(result.summary(), job.id)
        error = {"interrupted": "stopped by the server shutting down; resume to continue",
                 "paused": f"paused after section {result.summary().get('sections_done')}; resume to continue"
                 }.get(state)  # fmt: skip
        self._finish(job.id, state, error=error, files=folder, result=info)

    def _finish(self, job_id: str, state: str, *, error: str | None = None, files: Path | None = None,
                result: dict | None = None) -> None:  # fmt: skip
        with self._lock:
            progress = self._live.pop(job_id, None)
            self._previews.pop(job_id, None)
            if self._running and self._running[0] == job_id:
                self._running = None
            try:
                request = self.get(job_id).request
            except (sqlite3.Error, JobNotFound):
                return  # deleted meanwhile (or the queue is closing): nothing left to record
            changes: dict = {"state": state, "finished": time.time(), "error": error, "video": None, "metadata": None}
            if files is not None:
                sidecar = Path(_result_name(request)).with_suffix(".json").name
                changes["video"] = f"{job_id}/{VIDEO}" if (files / VIDEO).is_file() else None
                changes["metadata"] = f"{job_id}/{sidecar}" if (files / sidecar).is_file() else None
            if result is not None:
                changes["result"] = json.dumps(result)
            if progress is not None:
                changes["progress"] = json.dumps(progress)
            # Kept in memory until it is in the database (a full disk can refuse the write): the job is
            # never left "running", and the worker writes it as soon as the disk allows.
            self._unsaved[job_id] = changes
            if not self._flush_unsaved():
                self._save_record(self.get(job_id))
            self._emit(job_id, _state_event(self.get(job_id)))  # before a resume can start the job's next run

    def _flush_unsaved(self) -> bool:
        """Write the outcomes a full disk held back; False while the database still cannot be written."""
        with self._lock:
            for job_id, changes in list(self._unsaved.items()):
                try:
                    with self._write() as db:
                        cols = ", ".join(f"{c} = ?" for c in changes)
                        db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*changes.values(), job_id))
                except (sqlite3.Error, StorageFull) as err:
                    self.storage_problem = f"the job database cannot be written ({err}); outcomes wait in memory"
                    return False
                del self._unsaved[job_id]
                self._save_record(self.get(job_id))
            return True

    def _needed_by(self, job_id: str) -> int:
        """About the disk a queued job needs (its request and start image), 0 when it cannot be told."""
        from PIL import Image

        try:
            job = self.get(job_id)
            with Image.open(self.jobs_dir / job_id / INPUT) as img:
                width, height = img.size
            return _space_needed(request_from_json(job.request), (height, width), job.model)
        except Exception:  # a damaged record or image: the run itself will say what is wrong
            return 0

    def _get_pipeline(self, job_id: str, model: str) -> Any:
        if self._pipeline is not None and self._pipeline[0] == model:
            return self._pipeline[1]
        self._on_engine_event(job_id, StageStarted("loading"))
        if self._pipeline is not None:  # one model at a time: free the old one before loading the next
            self._pipeline = None
            _free_device_memory()
        self._pipeline = (model, self._loader(model))
        return self._pipeline[1]

    def _on_engine_event(self, job_id: str, event: object) -> None:
        try:
            self._record_event(job_id, event)
        except Exception as err:  # bookkeeping must never fail the generation it reports on
            print(f"framepack.jobs: could not record {type(event).__name__} of job {job_id}: {err!r}", file=sys.stderr)

    def _record_event(self, job_id: str, event: object) -> None:
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
            progress["text"] = describe_progress(progress)
            seq = self._emit(job_id, e, notify=False)
            if isinstance(event, StepProgress) and event.preview is not None:
                self._previews[job_id] = (seq, event.preview)
            now = time.monotonic()
            if not isinstance(event, StepProgress) or now - self._last_write >= _PROGRESS_WRITE_S:
                self._last_write = now
                with contextlib.suppress(sqlite3.Error, StorageFull), self._write() as db:
                    db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(progress), job_id))
            self._changed.notify_all()

    # ------------------------------------------------------------------------------- events
    def _reset_log(self, job_id: str) -> None:
        with self._lock:
            self._logs[job_id] = deque(maxlen=_LOG_LIMIT)

    def _emit(self, job_id: str, event: dict, *, notify: bool = True) -> int:
        with self._lock:
            seq = next(self._seq)
            body = {k: v for k, v in event.items() if k not in ("seq", "job", "time")}
            event = {"seq": seq, "job": job_id, "time": round(time.time(), 3), **body}
            self._logs.setdefault(job_id, deque(maxlen=_LOG_LIMIT)).append(event)
            if notify:
                self._changed.notify_all()
            return seq

    # ------------------------------------------------------------------------------- storage
    def _open_db(self) -> sqlite3.Connection:
        path = self.outputs / DB_NAME
        try:
            db = _connect(path)
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("integrity check failed")
            return db
        except sqlite3.DatabaseError as err:
            with contextlib.suppress(Exception):
                db.close()
            aside = path.with_name(f"{DB_NAME}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(path) + suffix)
                if src.exists():
                    os.replace(src, Path(str(aside) + suffix))
            self.problems.append(f"the job database {path} was damaged ({err}); moved to {aside.name} and "
                                 "rebuilt from the job folders")  # fmt: skip
            return _connect(path)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction. IMMEDIATE takes the write lock up front, so a second process on
        the same file waits (busy_timeout) instead of failing half way."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")  # a full disk fails here: roll back, or every later write fails
                except BaseException:
                    if self._db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as err:
                if is_disk_full(err):
                    raise StorageFull(f"{disk_full_message(self.outputs)} (the job database cannot grow)") from err
                raise

    def _next_seq(self, db: sqlite3.Connection) -> int:
        return db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]

    def _row(self, job_id: str) -> sqlite3.Row:
        if not isinstance(job_id, str) or not _ID.match(job_id):
            raise JobNotFound(f"no job {job_id!r}")
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return row

    def _job(self, row: sqlite3.Row, position: int | None) -> Job:
        fields = dict(zip(_COLUMNS, tuple(row)))
        fields.update(self._unsaved.get(fields["id"], {}))  # an outcome the full disk did not let us write yet
        problem = None
        for name in _JSON_COLUMNS:
            try:
                value = json.loads(fields[name] or "{}")
                if not isinstance(value, dict):
                    raise ValueError(f"expected an object, found {type(value).__name__}")
                fields[name] = value
            except ValueError as err:
                fields[name] = {}
                problem = f"the job's record is damaged ({name}: {err})"
        state = fields["state"] if fields["state"] in STATES else "failed"
        if state != fields["state"]:
            problem = f"the job's record has an unknown state {fields['state']!r}"
        if problem:
            state = "failed"
        live = self._live.get(fields["id"])
        progress = dict(live) if live is not None else fields["progress"]
        folder = self.jobs_dir / fields["id"]
        resumable = state in RESUMABLE and problem is None and (folder / INPUT).is_file()
        return Job(
            id=fields["id"], state=state, model=fields["model"], request=fields["request"], options=fields["options"],
            created=fields["created"], started=fields["started"], finished=fields["finished"],
            position=position if state == "queued" else None, progress=progress, result=fields["result"],
            error=problem or fields["error"], video=fields["video"], metadata=fields["metadata"],
            parent=fields["parent"], resumable=resumable, seq=fields["seq"], branch=_branch_info(fields["branch"]),
        )  # fmt: skip

    def _save_record(self, job: Job) -> None:
        """job.json in the job's folder: lets a lost or damaged database be rebuilt."""
        folder = self.jobs_dir / job.id
        if not folder.is_dir():
            return
        record = {k: v for k, v in job.to_dict().items() if k not in ("position", "resumable")}  # with seq
        with contextlib.suppress(OSError):
            tmp = folder / (RECORD + ".partial")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            os.replace(tmp, folder / RECORD)

    def _new_folder(self) -> Path:
        for _ in range(100):
            folder = self.jobs_dir / new_job_id()
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            return folder
        raise JobError("could not find a free job id")

    def _check_model(self, model: str | None) -> str:
        model = model or self.default_model
        if model not in self.models:
            raise RequestError(f"model must be one of {', '.join(self.models)}, got {model!r}")
        return model

    def _recover(self) -> None:
        """At startup: jobs left running died with their process; re-import folders the database lacks;
        report jobs whose folder or files are gone."""
        with self._write() as db:
            died = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = 'running'")]
            db.execute(
                "UPDATE jobs SET state = 'interrupted', finished = ?, error = ? WHERE state = 'running'",
                (time.time(), "the server stopped while this job was running; resume to continue"),
            )
        for job_id in died:
            self.problems.append(f"job {job_id} was running when the server stopped: now interrupted (resumable)")
            self._save_record(self.get(job_id))
        known = {r[0]: r for r in self._db.execute("SELECT id, state FROM jobs")}
        for folder in sorted(p for p in self.jobs_dir.iterdir() if p.is_dir()):
            if folder.name not in known and _ID.match(folder.name):
                self._import_folder(folder)
        for job_id, state in known.values():
            folder = self.jobs_dir / job_id
            error, output = None, self.get(job_id).output if state == "done" else None
            if not folder.is_dir():
                error = f"the job folder {folder} is missing"
            elif state in ("queued", "interrupted") and not (folder / INPUT).is_file():
                error = f"the job's input image {folder / INPUT} is missing"
            elif output and not (self.jobs_dir / output).is_file():
                what = "video" if output.endswith(".mp4") else "image"
                error = f"the job's {what} {self.jobs_dir / output} is missing"
            if error:
                self.problems.append(f"job {job_id}: {error}")
                with self._write() as db:
                    db.execute("UPDATE jobs SET state = 'failed', error = ? WHERE id = ?", (error, job_id))
                self._save_record(self.get(job_id))
        for job in self.list():
            if job.state in TERMINAL and job.error and job.error.startswith("the job's record"):
                self.problems.append(f"job {job.id}: {job.error}")

    def _import_folder(self, folder: Path) -> None:
        seq = None  # the record's queue position (a reorder survives the rebuild), else after the others
        try:
            record = json.loads((folder / RECORD).read_text())
            if not isinstance(record, dict) or not isinstance(record.get("request"), dict):
                raise ValueError("not a job record")
            state = record.get("state")
            state = "interrupted" if state == "running" else state if state in STATES else "failed"
            values = (folder.name, state, str(record.get("model") or self.default_model),
                      json.dumps(record["request"]), json.dumps(record.get("options") or {}),
                      float(record.get("created") or folder.stat().st_mtime), record.get("started"),
                      record.get("finished"), json.dumps(record.get("progress") or {}),
                      json.dumps(record.get("result") or {}), record.get("error"), record.get("video"),
                      record.get("metadata"), record.get("parent"),
                      json.dumps(record["branch"]) if isinstance(record.get("branch"), dict) else None)  # fmt: skip
            seq = record.get("seq")
            self.problems.append(f"job {folder.name}: re-imported from its {RECORD}")
        except (OSError, ValueError, TypeError) as err:
            error = f"the job folder {folder} has no readable {RECORD} ({err})"
            self.problems.append(f"job {folder.name}: {error}")
            values = (folder.name, "failed", self.default_model, "{}", "{}", folder.stat().st_mtime, None, None,
                      "{}", "{}", error, None, None, None, None)  # fmt: skip
        with self._write() as db:
            seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0 else self._next_seq(db)
            db.execute(
                "INSERT INTO jobs (id, seq, state, model, request, options, created, started, finished, progress,"
                " result, error, video, metadata, parent, branch)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (values[0], seq, *values[1:]),
            )


# ----------------------------------------------------------------------------------- helpers
def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) and short.
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses nothing it committed
    db.execute("PRAGMA busy_timeout=10000")
    db.executescript(_SCHEMA)
    if "branch" not in {r[1] for r in db.execute("PRAGMA table_info(jobs)")}:  # a database of an older version
        db.execute("ALTER TABLE jobs ADD COLUMN branch TEXT")
    return db


def _branch_info(text: str | None) -> dict | None:
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class _FolderLock:
    def __init__(self, fh: Any) -> None:
        self._fh = fh

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the file releases the flock
            self._fh = None


def _acquire_folder_lock(path: Path) -> _FolderLock:
    """One process per outputs folder: two workers on one queue would run jobs twice."""
    fh = open(path, "a+")  # held open (and locked) for the queue's lifetime
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one server per folder is then the user's responsibility
        return _FolderLock(fh)
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise JobError(f"{path.parent} is already served by {holder}; use another --outputs folder") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}\n")
    fh.flush()
    return _FolderLock(fh)


def _check_options(options: dict | None) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - {"preserved_memory_gb"})
    if unknown:
        raise RequestError(f"unknown job options {unknown}; accepted: ['preserved_memory_gb']")
    gb = options.get("preserved_memory_gb")
    if gb is not None and (isinstance(gb, bool) or not isinstance(gb, (int, float)) or not 0 <= gb <= 1024):
        raise RequestError(f"preserved_memory_gb must be a number in 0..1024 (GB), got {gb!r}")
    return {k: v for k, v in options.items() if v is not None}


@contextlib.contextmanager
def _job_options(pipe: Any, options: dict) -> Iterator[None]:
    """Apply per-job runtime options for one generate call. The engine reads `preserved_memory_gb`
    from its components' options when it plans each job, so swapping them in is enough (no reload)."""
    components = getattr(pipe, "c", None)
    gb = options.get("preserved_memory_gb")
    if gb is None or components is None or not hasattr(components, "options"):
        yield
        return
    saved = components.options
    components.options = dataclasses.replace(saved, preserved_memory_gb=float(gb))
    try:
        yield
    finally:
        components.options = saved


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _absolute(request: dict, folder: Path, lora_folder: Path) -> dict:
    """The stored request (file names relative to the job folder, LoRAs named in the LoRA folder) as the
    engine gets it. RequestError for a LoRA path outside the LoRA folder."""
    out = {**request, "image": str(folder / INPUT), "output": str(folder / _result_name(request))}
    for name in IMAGE_UPLOADS:
        if isinstance(out.get(name), str):
            out[name] = str(folder / Path(out[name]).name)
    if isinstance(out.get("controls"), list):  # a frame edit's reference images and masks
        out["controls"] = [{**c, **{k: str(folder / Path(c[k]).name) for k in CONTROL_UPLOADS
                                    if isinstance(c.get(k), str)}} if isinstance(c, dict) else c
                           for c in out["controls"]]  # fmt: skip
    if isinstance(out.get("loras"), (list, tuple)):
        out["loras"] = [{**r, "path": _lora_path(r["path"], lora_folder)}
                        if isinstance(r, dict) and isinstance(r.get("path"), str) and r["path"].strip() else r
                        for r in out["loras"]]  # fmt: skip
    return out


def _lora_path(path: str, lora_folder: Path) -> str:
    """A job's LoRA as a file in the LoRA folder: a name relative to it ('style.safetensors',
    'sub/x.safetensors') or an absolute path inside it (a sidecar's). A client naming any other file
    would make the server open files of its choosing (as with SERVER_FIELDS)."""
    root = Path(os.path.abspath(lora_folder))
    given = Path(path)
    full = Path(os.path.normpath(given if given.is_absolute() else root / given))
    if "\x00" in path or ".." in given.parts or not full.is_relative_to(root) or full == root:
        raise RequestError(f"LoRA {path!r} is not a file in the LoRA folder {root}: a job names each LoRA by "
                           "its name in that folder (e.g. 'style.safetensors')")  # fmt: skip
    return str(full)


def _result_name(request: dict) -> str:
    """A stored request's result file in its job folder: video.mp4, or edit.png for a frame edit."""
    kind = KINDS.get(request.get("kind", "video")) if isinstance(request.get("kind", "video"), str) else None
    return (kind or KINDS["video"]).result


def _relative(summary: dict, job_id: str) -> dict:
    """A result's summary with its files (an edit's image and control images) relative to the jobs folder."""
    out = dict(summary)
    if isinstance(out.get("image"), str):
        out["image"] = f"{job_id}/{out['image']}"
    if isinstance(out.get("controls"), list):
        out["controls"] = [f"{job_id}/{name}" for name in out["controls"]]
    return out


def _decode(source: Any, name: str | None, *, alpha: bool = False, mask: bool = False) -> np.ndarray:
    """An uploaded picture as it is stored in the job folder: (H, W, 3) uint8 RGB, (H, W, 4) with `alpha`
    when it has transparency, or a mask's (H, W) grey levels (`images.load_mask`, as the engine reads a
    mask file). ImageError, prefixed with the upload's `name`, for anything unusable."""
    from framepack.images import ImageError, load_image, load_mask, load_rgba

    try:
        if mask:
            return load_mask(source)
        return load_rgba(source) if alpha else load_image(source)  # every check, with its precise message
    except ImageError as err:
        raise ImageError(f"{name}: {err}" if name else str(err)) from None


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


def _state_event(job: Job) -> dict:
    event = {"seq": 0, "job": job.id, "time": round(time.time(), 3), "type": "state", "state": job.state}
    if job.error:
        event["error"] = job.error
    if job.video:
        event["video"] = job.video
    if job.result:
        event["result"] = job.result
    return event


def _space_needed(request: GenerationRequest, image_hw: tuple[int, int], model: str) -> int:
    """About the most disk a job holds at once (framepack.outputs.disk_needed) for its start image size;
    a frame edit: its PNG (and the control images it saves), 4 bytes a pixel at most, and 1 MiB."""
    from framepack.images import nearest_bucket
    from framepack.registry import get_spec
    from framepack.sections import make_schedule

    spec = get_spec(model)
    height, width = nearest_bucket(*image_hw, request.resolution or spec.default_resolution)
    if isinstance(request, EditRequest):
        images = 1 + (1 + len(request.controls) if request.save_controls else 0)
        return images * height * width * 4 + 2**20
    schedule = make_schedule(spec.schedule, request.window)
    frames = schedule.frames(len(schedule.sections_for(request.seconds)))  # as JobPlan.frames (no input video)
    return disk_needed(frames, height, width, request.window)


def _check_runnable(stored: dict, folder: Path, model: str, loras: Any) -> None:
    """The engine's whole request check (prompts, anchors, inputs against the model) at submission,
    without loading any model, so the API refuses what the CLI refuses before a job is queued. Every
    LoRA file must be in the LoRA folder `loras` (a `framepack.lora.LoraLibrary`) and be a readable
    safetensors file (LoraError, a RequestError, otherwise)."""
    from framepack.oneframe import check_edit
    from framepack.pipeline import check_request
    from framepack.registry import get_spec

    request = request_from_json(_absolute(stored, folder, loras.folder))
    check = {"video": check_request, EditRequest.kind: check_edit}[request.kind]
    try:
        check(request, get_spec(model))
    except ValueError as err:  # RequestError, ImageError: name the uploads, not where the server keeps them
        files = {"image": INPUT, **stored_uploads(stored)}
        text = str(err)
        for name, rel in files.items():
            text = text.replace(str(folder / Path(rel).name), f"the uploaded {name}")
        if text == str(err):
            raise
        raise type(err)(text) from None
    if request.loras:
        from framepack.models.lora import LoraError

        for given, ref in zip(stored["loras"], request.loras):
            if ref.sha256 is None and not Path(ref.path).is_file():  # in the client's words, not the server path
                raise LoraError(f"LoRA file not found: {given['path']} (not in the LoRA folder {loras.folder})")
        loras.check(tuple(request.loras))  # recorded hashes are looked up, every file is read as safetensors
