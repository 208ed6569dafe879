"""The job layer: a persistent queue of generation jobs (videos and frame edits), a worker, and each
job's files. Every front end (CLI `serve`/`ui`, the HTTP API, the Gradio UI) goes through `JobQueue`.

    records.py     what a job is: states, kinds, `Job`, errors, request building and checks
    store.py       `JobStore`: SQLite (WAL) + job.json records, recovery of a damaged database or folder
    eventlog.py    `EventLog`: events with sequence numbers, buffered history, live progress, waiting
    runner.py      the `Runner` protocol and `InProcessRunner`, the default: run a job, report its events,
                   honour cancel and pause, save its resume state
    dispatcher.py  `Dispatcher`: worker threads (one per runner slot) claiming queued jobs atomically
    queue.py       `JobQueue`: the operations, over those parts
    ray_runner.py  the Ray backend's head side: `RayRunner` (a Runner), its worker pool, faults
    ray_worker.py  the Ray worker actor: one loaded pipeline per GPU, events streamed back
    shipping.py    job folders sent to workers without the shared outputs folder, and their changes back

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
    OUTPUTS/jobs/<id>/.worker-lease  (Ray, shared folder) which run of the job may write the folder

States: queued -> running -> done | failed | cancelled | interrupted | paused.
"""

from framepack.jobs.queue import JobQueue
from framepack.jobs.records import (
    CONTROL_UPLOADS,
    DB_NAME,
    EDIT,
    EDIT_REFERENCES,
    IMAGE_UPLOADS,
    INPUT,
    JOBS_DIR,
    KINDS,
    LOCK_NAME,
    RECORD,
    RESUMABLE,
    SERVER_FIELDS,
    STATE_DIR,
    STATES,
    TERMINAL,
    VIDEO,
    FileAccessError,
    Job,
    JobConflict,
    JobError,
    JobKind,
    JobNotFound,
    StorageFull,
    build_request,
    job_kind,
    request_fields,
    stored_uploads,
    upload_fields,
)
from framepack.jobs.runner import InProcessRunner, RunContext, Runner, RunOutcome

__all__ = [
    "CONTROL_UPLOADS", "DB_NAME", "EDIT", "EDIT_REFERENCES", "IMAGE_UPLOADS", "INPUT", "JOBS_DIR", "KINDS",
    "LOCK_NAME", "RECORD", "RESUMABLE", "SERVER_FIELDS", "STATES", "STATE_DIR", "TERMINAL", "VIDEO",
    "FileAccessError", "InProcessRunner", "Job", "JobConflict", "JobError", "JobKind", "JobNotFound", "JobQueue",
    "RunContext", "RunOutcome", "Runner", "StorageFull", "build_request", "job_kind", "request_fields",
    "stored_uploads", "upload_fields",
]  # fmt: skip
