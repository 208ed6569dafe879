"""HTTP API: a thin FastAPI adapter over the job layer (`framepack.jobs.JobQueue`).

`create_app(queue)` returns the app; every route lives under /api/ and the schema is served at
/api/openapi.json (interactive docs at /api/docs). `framepack serve` runs it alone, `framepack ui`
mounts the Gradio page on the same app, so both servers answer the same routes.

    GET    /api/info                     version, models, upload limit, whether a token is required, workers
    GET    /api/params[?kind=edit]       every parameter with its default (the JobParams / EditParams schema)
    GET    /api/loras                    the server's LoRA folder and its .safetensors files (for `loras`)
    POST   /api/jobs                     multipart: image (file), params (JSON object), model, preserved_memory_gb,
                                         and the other images: end_image (a video); image_mask, control_N,
                                         control_N_mask (a frame edit, params {"kind": "edit", ...})
    GET    /api/jobs[?state=...]         queued jobs in run order, then the others (running first, newest first)
    GET    /api/jobs/{id}                one job
    POST   /api/jobs/{id}/cancel         queued: cancelled now; running: after the current step (valid MP4 kept)
    DELETE /api/jobs/{id}                a job that is not running, with its files
    POST   /api/jobs/{id}/move           {"position": n}: reorder a queued job (0 = next)
    POST   /api/jobs/{id}/resume         re-queue an interrupted/cancelled/failed job from its last section
    POST   /api/jobs/{id}/rerun          {"params": {...}, "model": ...}: a new job, this one's image and settings
    POST   /api/jobs/{id}/branch         {"at": K, "params": {...}}: a new job sharing this video's first K sections
                                         (generation order; "last": the most the changes allow), with the changed
                                         settings from section K+1 on (re-roll: a new seed; a new prompt; continue:
                                         more seconds)
    POST   /api/jobs/{id}/pause          a running video stops after its current section (state paused; resume)
    GET    /api/jobs/{id}/sections       its finished sections: frames in the video, whether each can be re-rolled
    GET    /api/jobs/{id}/sections/{k}/first.jpg|last.jpg   a section's first / last frame (small JPEG)
    GET    /api/jobs/{id}/events         Server-Sent Events, in order, ending with a terminal `state` event
    GET    /api/jobs/{id}/video|sidecar|image|preview.png
    GET    /api/jobs/{id}/result.png     a frame edit's image (its control images: /api/files/{result.controls[i]})
    GET    /api/files/{path}             any file inside the job folders (nothing outside them)

Frame edits (`framepack.oneframe`, one image with the original model): params `{"kind": "edit", "prompt":
..., "preset": "kisekaeichi", "controls": [{"index": 10}]}` with the reference images uploaded as control_2,
control_3, ... (the start image is control 1) and their optional masks as control_N_mask; `controls` gives
only each reference's RoPE index (null: the preset's), one entry per uploaded reference, and may be left
out. The start image's mask is the upload image_mask. The job's `result.image` is its PNG ("<id>/edit.png").

Errors are JSON `{"detail": "..."}`: 401 missing/wrong token, 404 unknown job or file, 400 a path that
leaves the outputs folder, 409 an operation that does not fit the job's state, 413 an upload over the
limit, 422 bad parameters or an unusable image (the message names every problem), 507 not enough disk
space for the job (free and needed), 500 anything unexpected (still JSON).
Auth: when a token is configured every /api/ request needs `Authorization: Bearer TOKEN` (or
`?token=TOKEN`, for <video> tags and EventSource, which cannot set headers).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import re
import secrets
import socket
import typing
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

from fastapi import FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

import framepack
from framepack.app.progress import describe_progress
from framepack.config import EDIT_FIELDS, LORA_WEIGHT_RANGE, REQUEST_FIELDS, EditRequest, RequestError
from framepack.images import ImageError
from framepack.jobs import (
    KINDS,
    STATES,
    TERMINAL,
    FileAccessError,
    Job,
    JobConflict,
    JobError,
    JobNotFound,
    JobQueue,
    StorageFull,
    request_fields,
    upload_fields,
)

DEFAULT_MAX_UPLOAD = 32 * 2**20
_MULTIPART_SLACK = 2**20  # room for the params field and multipart headers on top of the image
_KEEPALIVE_S = 15.0


# ------------------------------------------------------------------------------------- models
class LoraParam(BaseModel):
    """One entry of a job's `loras` (a `framepack.config.LoraRef`)."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="the file's name in the server's LoRA folder, as GET /api/loras lists it "
                      "(e.g. 'style.safetensors'); nothing outside that folder")  # fmt: skip
    weight: float = Field(1.0, ge=LORA_WEIGHT_RANGE[0], le=LORA_WEIGHT_RANGE[1],
                          description="strength: 1 = as trained, 0 = off, negative = the opposite")  # fmt: skip
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$", description="the file's sha256 (a sidecar records "
                               "it): the file in the folder with this hash is used if the name has moved")  # fmt: skip


class ControlParam(BaseModel):
    """One entry of a frame edit's `controls`: the RoPE index of the reference image uploaded as control_N
    (N = 2 for the first entry, 3 for the next, ...). Its image and mask are uploads, never parameters."""

    model_config = ConfigDict(extra="forbid")
    index: int | None = Field(None, ge=0, le=100, description="RoPE time index of this reference image (null: the "
                              "preset's, e.g. kisekaeichi 10)")  # fmt: skip


# The API's wording where a field's CLI help (flags, repetition) does not fit a JSON parameter.
_API_HELP = {"loras": "LoRA files merged into the transformer for this job: a list of {path, weight, sha256?} "
             "objects (see GET /api/loras for the files; weights add up when several touch a module)",
             "controls": "the reference images' RoPE indices: one {index} per uploaded control_2, control_3, ... "
             "in order (index null: the preset's); left out: each upload at the preset's index"}  # fmt: skip
_PARAMS_HELP = 'JSON object of JobParams fields, or of EditParams fields with "kind": "edit" (see /api/params)'
_EDIT_HELP = {"prompt": "what the edited frame shows (one prompt; no timestamps)"}
_API_TYPES: dict[str, Any] = {"loras": list[LoraParam], "controls": list[ControlParam]}
# The uploads besides the start image, of every job kind (end_image; image_mask, control_N, control_N_mask).
UPLOADS = tuple(dict.fromkeys(name for kind in KINDS for name in upload_fields(kind)))


def _upload_help(name: str) -> str:
    if name == "end_image":
        return "original model: the video ends near it"
    if name == "image_mask":
        return "frame edit: " + EDIT_FIELDS["image_mask"].help
    n, mask = re.fullmatch(r"control_(\d+)(_mask)?", name).groups()
    if mask:
        return f"frame edit: the mask of control_{n} (grayscale; white = keep; default: its alpha channel)"
    return f"frame edit: reference image {int(n) - 1} (control {n}; its index: params.controls[{int(n) - 2}])"


def _params_model(kind: str = "video") -> type[BaseModel]:
    """A pydantic model with one field per client-settable field of the kind's request class: types and
    defaults from the dataclass, descriptions, ranges and choices from `REQUEST_FIELDS` (and `EDIT_FIELDS`
    for a frame edit) (documentation in the schema; the engine's own check gives the error messages, the
    same as the CLI's). The model is never used to parse a submission (it would coerce): parameters reach
    `config.request_from_json` as sent."""
    request_class = KINDS[kind].request
    hints = {**typing.get_type_hints(request_class), **_API_TYPES}
    table = {**REQUEST_FIELDS, **EDIT_FIELDS}
    wording = {**_API_HELP, **(_EDIT_HELP if kind == EditRequest.kind else {})}
    fields: dict[str, Any] = {}
    if kind != "video":  # a video is the default kind: its parameters need no "kind"
        fields["kind"] = (Literal[kind], Field(kind, description=f"the job kind: {kind!r}"))  # type: ignore[valid-type]
    for f in request_fields(kind):
        info = table[f.name]
        extra: dict[str, Any] = {}
        if info.range is not None:
            extra.update(minimum=info.range[0], maximum=info.range[1])
        if info.choices is not None:
            extra["enum"] = list(info.choices)
        kw: dict[str, Any] = {"description": wording.get(f.name, info.help), "json_schema_extra": extra or None}
        if f.default is not dataclasses.MISSING:
            kw["default"] = list(f.default) if f.name in _API_TYPES and isinstance(f.default, tuple) else f.default
        elif f.default_factory is not dataclasses.MISSING:
            kw["default_factory"] = f.default_factory
        fields[f.name] = (hints[f.name], Field(**kw))
    video = kind == "video"
    return create_model(
        "JobParams" if video else "EditParams",
        __config__=ConfigDict(extra="forbid"),
        __doc__="Generation parameters (GenerationRequest fields); ranges are checked by the engine." if video else
        'Frame edit parameters ("kind": "edit"; EditRequest fields); ranges are checked by the engine.',
        **fields,
    )  # fmt: skip


JobParams = _params_model()
EditParams = _params_model(EditRequest.kind)


class Progress(BaseModel):
    stage: str | None = None
    section: int | None = None  # 0-based, generation order
    sections: int | None = None
    step: int | None = None
    steps: int | None = None
    frames: int | None = None  # frames in the video so far
    seconds: float | None = None
    fraction: float | None = None
    sections_done: int | None = None
    text: str | None = None


class JobResult(BaseModel):
    kind: str | None = Field(None, description='"edit" for a frame edit')
    image: str | None = Field(None, description="a frame edit's image, relative to the job folders (GET /api/files/"
                              "{image}, or /api/jobs/{id}/result.png)")  # fmt: skip
    controls: list[str] | None = Field(None, description="a frame edit's control images as the model saw them "
                                       "(save_controls), relative to the job folders")  # fmt: skip
    notes: list[str] | None = Field(None, description="a frame edit's adjustments and warnings")
    frames: int | None = None
    seconds: float | None = None
    width: int | None = None
    height: int | None = None
    sections: int | None = None
    sections_done: int | None = None
    seed: int | None = None
    peak_vram_bytes: int | None = None
    peak_rss_bytes: int | None = None
    total_s: float | None = None


class JobLinks(BaseModel):
    self: str
    events: str
    image: str
    video: str | None = None
    sidecar: str | None = None
    preview: str | None = None
    result_png: str | None = Field(None, description="a finished frame edit's image")


class BranchInfo(BaseModel):
    parent: str = Field(description="the parent job's id")
    parent_video: str
    at: int = Field(description="sections kept from the parent (generation order)")
    changed: dict[str, list[Any]] = Field(description="field -> [parent's value, this job's value]")
    parent_branch: dict[str, Any] | None = Field(None, description="the parent's own branch info, if it is one")


class BranchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at: int | Literal["last"] = Field(description="finished sections of the parent to keep (generation order; 0 = "
                                      "remake all), or 'last': the most the changes allow (continue)")  # fmt: skip
    params: dict[str, Any] = Field(default_factory=dict, description="settings that change from section at+1 on "
                                   "(seed, prompt, seconds, steps, guidance, cache and LoRA fields)")  # fmt: skip


class SectionInfo(BaseModel):
    section: int = Field(description="1-based, in generation order (the original model: from the video's end)")
    video_index: int = Field(description="0-based position in the finished video")
    frames: list[int] = Field(description="[first, last] frame of the section in the job's video")
    reroll: bool = Field(description="a branch can start before it: re-roll it, or change the prompt from it on")
    after: bool = Field(description="a branch can start after it (keeping it)")
    first: str
    last: str


class JobInfo(BaseModel):
    id: str
    kind: Literal["video", "edit"] = Field(description="video, or edit (a frame edit: one image)")
    state: Literal["queued", "running", "done", "failed", "cancelled", "interrupted", "paused"]
    model: str
    params: dict[str, Any]  # JobParams or EditParams fields (a dict: records from older versions may differ)
    options: dict[str, Any]
    created: float
    started: float | None
    finished: float | None
    position: int | None = Field(description="place in the queue, 0 = next; null unless queued")
    progress: Progress
    result: JobResult
    error: str | None
    resumable: bool
    parent: str | None
    branch: BranchInfo | None = Field(None, description="a branch's parent job, branch point and changed settings")
    links: JobLinks


class MoveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    position: int = Field(ge=0, description="new place in the queue, 0 = next (clamped to the queue length)")


class RerunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    params: dict[str, Any] = Field(default_factory=dict, description="JobParams (EditParams) fields to change")
    model: str | None = None
    preserved_memory_gb: float | None = None


class Info(BaseModel):
    version: str
    models: list[str]
    default_model: str
    max_upload_bytes: int
    auth: bool
    jobs: dict[str, int]
    storage: str | None = Field(None, description="why queued jobs wait or submissions are refused (disk space)")
    workers: list[dict] = Field(default_factory=list, description="what runs jobs: the in-process worker, or "
                                "each Ray worker (name, host, gpus, model loaded, job running)")  # fmt: skip


class LoraFile(BaseModel):
    name: str = Field(description="relative to the LoRA folder, '/'-separated: what a job's loras[].path takes")
    size: int = Field(description="bytes")
    modified: float = Field(description="modification time (seconds since the epoch)")


class LoraList(BaseModel):
    folder: str = Field(description="the server's LoRA folder (`--lora-dir`)")
    exists: bool = Field(description="false: the folder does not exist yet (no files)")
    files: list[LoraFile]


class ErrorBody(BaseModel):
    detail: str


_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 422, 507)}


# ------------------------------------------------------------------------------------- the app
def create_app(
    queue: JobQueue,
    *,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
) -> FastAPI:
    """The FastAPI app serving `queue` under /api/. `token`: required on every /api/ request."""
    app = FastAPI(
        title="FramePack",
        version=framepack.__version__,
        description="Image-to-video jobs: submit, follow (SSE), download. Every route is under /api/.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.state.queue = queue
    app.add_middleware(_Guard, token=token, max_body=max_upload_bytes + _MULTIPART_SLACK)
    _add_error_handlers(app, max_upload_bytes)

    def info(job: Job) -> JobInfo:
        base = f"/api/jobs/{job.id}"
        links = JobLinks(
            self=base,
            events=f"{base}/events",
            image=f"{base}/image",
            video=f"{base}/video" if job.video or job.progress.get("video") else None,
            sidecar=f"{base}/sidecar" if job.metadata else None,
            preview=f"{base}/preview.png" if job.state == "running" else None,
            result_png=f"{base}/result.png" if job.kind == EditRequest.kind and job.output else None,
        )
        progress = {k: v for k, v in job.progress.items() if k in Progress.model_fields}
        progress["text"] = describe_progress(job.progress) or None
        result = {k: v for k, v in job.result.items() if k in JobResult.model_fields}
        return JobInfo(
            id=job.id, kind=job.kind if job.kind in KINDS else "video", state=job.state, model=job.model,
            params=job.params(), options=job.options, created=job.created, started=job.started,
            finished=job.finished, position=job.position,
            progress=Progress(**progress), result=JobResult(**result), error=job.error, resumable=job.resumable,
            parent=job.parent, branch=BranchInfo(**job.branch) if job.branch else None, links=links,
        )  # fmt: skip

    @app.get("/api/info", response_model=Info, tags=["server"])
    def get_info() -> Info:
        return Info(version=framepack.__version__, models=list(queue.models), default_model=queue.default_model,
                    max_upload_bytes=max_upload_bytes, auth=token is not None, jobs=queue.counts(),
                    storage=queue.storage_problem, workers=queue.workers())  # fmt: skip

    @app.get("/api/params", response_model=JobParams | EditParams, tags=["server"])  # type: ignore[valid-type]
    def get_params(
        kind: Annotated[Literal["video", "edit"], Query(description="edit: a frame edit's parameters")] = "video",
    ) -> Any:
        """Every parameter a job of this kind accepts, with its default."""
        return EditParams() if kind == EditRequest.kind else JobParams()

    @app.get("/api/loras", response_model=LoraList, tags=["server"])
    def get_loras() -> LoraList:
        """The LoRA files a job can use (read afresh on every call: files added since are listed)."""
        library = queue.lora_library()
        files = []
        for path in library.files():
            try:
                st = path.stat()
            except OSError:  # removed while listing
                continue
            name = path.relative_to(library.folder).as_posix()
            files.append(LoraFile(name=name, size=st.st_size, modified=st.st_mtime))
        return LoraList(folder=str(library.folder), exists=library.folder.is_dir(), files=files)

    async def submit(
        image: Annotated[UploadFile, File(description="start image: PNG, JPEG, WebP, GIF, BMP, TIFF, AVIF...")],
        params: Annotated[str, Form(description=_PARAMS_HELP)] = "{}",
        model: Annotated[str | None, Form(description="model name (see /api/info); default the server's")] = None,
        preserved_memory_gb: Annotated[float | None, Form(description="GPU memory to leave free")] = None,
        **files: UploadFile | None,
    ) -> JobInfo:
        data = await _read_upload(image, "image", max_upload_bytes)
        uploads = {name: await _read_upload(f, name, max_upload_bytes) for name, f in files.items() if f}
        fields = _parse_params(params)
        options = {"preserved_memory_gb": preserved_memory_gb}
        job = await run_in_threadpool(queue.submit, data, fields, model=model, options=options, uploads=uploads)
        return info(job)

    _with_uploads(submit, UPLOADS)  # one optional file field per upload name of every kind (**files)
    app.post("/api/jobs", status_code=201, response_model=JobInfo, responses=_ERRORS, tags=["jobs"])(submit)

    @app.get("/api/jobs", response_model=list[JobInfo], tags=["jobs"])
    def list_jobs(
        state: Annotated[list[Literal[STATES]] | None, Query(description="only jobs in these states")] = None,  # type: ignore[valid-type]
    ) -> list[JobInfo]:
        return [info(j) for j in queue.list(state)]

    @app.get("/api/jobs/{job_id}", response_model=JobInfo, responses=_ERRORS, tags=["jobs"])
    def get_job(job_id: str) -> JobInfo:
        return info(queue.get(job_id))

    @app.post("/api/jobs/{job_id}/cancel", response_model=JobInfo, responses=_ERRORS, tags=["jobs"])
    def cancel_job(job_id: str) -> JobInfo:
        return info(queue.cancel(job_id))

    @app.delete("/api/jobs/{job_id}", status_code=204, responses=_ERRORS, tags=["jobs"])
    def delete_job(job_id: str) -> Response:
        queue.delete(job_id)
        return Response(status_code=204)

    @app.post("/api/jobs/{job_id}/move", response_model=JobInfo, responses=_ERRORS, tags=["jobs"])
    def move_job(job_id: str, body: MoveBody) -> JobInfo:
        return info(queue.move(job_id, body.position))

    @app.post("/api/jobs/{job_id}/resume", response_model=JobInfo, responses=_ERRORS, tags=["jobs"])
    def resume_job(job_id: str) -> JobInfo:
        return info(queue.resume(job_id))

    @app.post("/api/jobs/{job_id}/rerun", status_code=201, response_model=JobInfo, responses=_ERRORS, tags=["jobs"])
    def rerun_job(job_id: str, body: RerunBody | None = None) -> JobInfo:
        body = body or RerunBody()
        merged = {**queue.get(job_id).params(), **body.params}
        fields = _validated(merged)
        return info(queue.rerun(job_id, fields, model=body.model,
                                options={"preserved_memory_gb": body.preserved_memory_gb}))  # fmt: skip

    @app.post("/api/jobs/{job_id}/branch", status_code=201, response_model=JobInfo, responses=_ERRORS,
              tags=["jobs"])  # fmt: skip
    def branch_job(job_id: str, body: BranchBody) -> JobInfo:
        """A new job from this video's state after `at` sections; `params` change from section at+1 on. F1
        keeps the video's beginning and remakes its end; the original model (back to front) keeps the end
        and remakes the part before it."""
        return info(queue.branch(job_id, body.at, body.params))

    @app.post("/api/jobs/{job_id}/pause", response_model=JobInfo, responses=_ERRORS, tags=["jobs"])
    def pause_job(job_id: str) -> JobInfo:
        return info(queue.pause(job_id))

    @app.get("/api/jobs/{job_id}/sections", response_model=list[SectionInfo], responses=_ERRORS, tags=["jobs"])
    def job_sections(job_id: str) -> list[SectionInfo]:
        base = f"/api/jobs/{job_id}/sections"
        return [SectionInfo(**row, first=f"{base}/{row['section']}/first.jpg", last=f"{base}/{row['section']}/last.jpg")
                for row in queue.sections(job_id)]  # fmt: skip

    @app.get("/api/jobs/{job_id}/sections/{section}/{which}.jpg", responses=_ERRORS, tags=["files"])
    def section_frame(job_id: str, section: int, which: Literal["first", "last"]) -> Response:
        return Response(queue.section_frame(job_id, section, which), media_type="image/jpeg",
                        headers={"Cache-Control": "no-cache"})  # fmt: skip

    @app.get(
        "/api/jobs/{job_id}/events", tags=["jobs"], responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}}
    )
    async def job_events(
        job_id: str,
        after: Annotated[int, Query(description="only events with a larger seq (resume a stream)")] = 0,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> StreamingResponse:
        """Server-Sent Events: one JSON object per event (`event:` is its type, `id:` its seq), in
        order, ending with a `state` event whose state is terminal (done, failed, cancelled, interrupted)."""
        queue.get(job_id)  # 404 before the stream starts
        if last_event_id and last_event_id.isdigit():  # EventSource reconnects say where they stopped
            after = max(after, int(last_event_id))
        return StreamingResponse(_sse(queue, job_id, after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    @app.get("/api/jobs/{job_id}/video", response_class=FileResponse, responses=_ERRORS, tags=["files"])
    def get_video(job_id: str) -> FileResponse:
        """The MP4 (while running: the video of the finished sections so far). Range requests work."""
        job = queue.get(job_id)
        if job.kind == EditRequest.kind:
            raise JobNotFound(f"job {job_id} is a frame edit: it makes an image, not a video "
                              f"(GET /api/jobs/{job_id}/result.png)")  # fmt: skip
        rel = job.video or job.progress.get("video")
        if not rel:
            raise JobNotFound(f"job {job_id} ({job.state}) has no video yet")
        return FileResponse(queue.file(rel), media_type="video/mp4", filename=f"{job_id}.mp4",
                            content_disposition_type="inline")  # fmt: skip

    @app.get("/api/jobs/{job_id}/sidecar", response_class=FileResponse, responses=_ERRORS, tags=["files"])
    def get_sidecar(job_id: str) -> FileResponse:
        """The JSON sidecar: every setting, model ids, versions, timings, peak memory."""
        return FileResponse(queue.job_file(job_id, "metadata"), media_type="application/json",
                            filename=f"{job_id}.json")  # fmt: skip

    @app.get("/api/jobs/{job_id}/image", response_class=FileResponse, responses=_ERRORS, tags=["files"])
    def get_image(job_id: str) -> FileResponse:
        return FileResponse(queue.job_file(job_id, "image"), media_type="image/png")

    @app.get("/api/jobs/{job_id}/result.png", response_class=FileResponse, responses=_ERRORS, tags=["files"])
    def get_result_png(job_id: str) -> FileResponse:
        """A finished frame edit's image (the PNG carries its settings in a text chunk, as the CLI writes it)."""
        return FileResponse(queue.job_file(job_id, "edit"), media_type="image/png", filename=f"{job_id}.png",
                            content_disposition_type="inline")  # fmt: skip

    @app.get("/api/jobs/{job_id}/preview.png", responses=_ERRORS, tags=["files"])
    def get_preview(job_id: str) -> Response:
        """The latest latent preview of a running job's current section."""
        png = queue.preview_png(job_id)
        if png is None:
            raise JobNotFound(f"job {job_id} has no preview (only a running job has one)")
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/api/files/{path:path}", response_class=FileResponse, responses=_ERRORS, tags=["files"])
    def get_file(path: str) -> FileResponse:
        """A file inside the job folders, by its path relative to them (e.g. `<id>/video.json`)."""
        return FileResponse(queue.file(path))

    return app


def _with_uploads(handler: Callable, names: tuple[str, ...]) -> None:
    """Give `handler` (whose `**files` collects them) one optional multipart file parameter per name, so
    FastAPI reads them and the schema lists them; the names come from the job kinds (`upload_fields`)."""
    signature = inspect.signature(handler, eval_str=True)
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation=Annotated[UploadFile | None, File(description=_upload_help(name))])
             for name in names]  # fmt: skip
    handler.__signature__ = signature.replace(parameters=[*fixed, *extra])  # type: ignore[attr-defined]


async def _read_upload(upload: UploadFile, name: str, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise _TooLarge(limit)
    if not data:
        raise ImageError(f"the uploaded {name} is empty (0 bytes)")
    return data


def _parse_params(text: str) -> dict:
    try:
        fields = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise RequestError(f"params is not valid JSON: {err}") from None
    if not isinstance(fields, dict):
        raise RequestError(f"params must be a JSON object, got {type(fields).__name__}")
    return _validated(fields)


def _validated(fields: dict) -> dict:
    """The parameters as sent: no coercion (pydantic's lax mode would turn "25" into 25 and true into 1.0).
    The queue checks them with the engine's own `validate` (GenerationRequest's, EditRequest's: strict
    types, ranges, unknown and server-owned fields), so the API and the CLI refuse the same things in the
    same words."""
    if not isinstance(fields, dict):
        raise RequestError(f"params must be a JSON object, got {type(fields).__name__}")
    return dict(fields)


async def _sse(queue: JobQueue, job_id: str, after: int) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    last_sent = loop.time()
    while True:
        try:
            batch = queue.events(job_id, after)  # in memory, under a lock held only for microseconds
        except JobError:  # deleted while streaming
            yield _frame({"type": "state", "state": "deleted", "job": job_id, "seq": after + 1})
            return
        for event in batch:
            after = max(after, event["seq"])
            yield _frame(_public_event(event))
            last_sent = loop.time()
            if event["type"] == "state" and event["state"] in TERMINAL:
                return
        # A closed connection ends the stream from Starlette's side (the response watches for it).
        if loop.time() - last_sent > _KEEPALIVE_S:
            yield ": keep-alive\n\n"  # a comment line: keeps proxies from closing an idle stream
            last_sent = loop.time()
        await asyncio.sleep(0.1)


def _public_event(event: dict) -> dict:
    out = dict(event)
    base = f"/api/jobs/{event['job']}"
    if out.get("video"):
        out["video"] = f"{base}/video"
    if out["type"] == "step":
        out["preview"] = f"{base}/preview.png?seq={event['seq']}"
    return out


def _frame(event: dict) -> str:
    return f"id: {event['seq']}\nevent: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


# ------------------------------------------------------------------------------------- errors
class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the upload is larger than the limit of {_mb(limit)} (set with --max-upload-mb)")


def _mb(n: int) -> str:
    return f"{n / 2**20:g} MB"


def _add_error_handlers(app: FastAPI, max_upload_bytes: int) -> None:
    def handler(status: int) -> Callable:
        async def handle(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status)

        return handle

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own checks (a missing upload, a malformed body): one readable line like ours.
        problems = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"detail": "invalid request: " + "; ".join(problems)}, status_code=422)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # anything else still answers JSON (never a bare-text 500); the server goes on serving
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    app.add_exception_handler(RequestValidationError, invalid)
    for exc_type, status in ((JobNotFound, 404), (FileAccessError, 400), (JobConflict, 409), (StorageFull, 507),
                             (JobError, 409), (RequestError, 422), (ImageError, 422), (_TooLarge, 413),
                             (Exception, 500)):  # fmt: skip
        app.add_exception_handler(exc_type, handler(status) if exc_type is not Exception else unexpected)


class _Guard:
    """ASGI middleware for /api/: the token check, and refusing oversized bodies from their
    Content-Length before any byte is read (a chunked upload is still capped by the route)."""

    def __init__(self, app: Any, *, token: str | None, max_body: int) -> None:
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token is not None and not self._authorised(headers, scope.get("query_string", b"")):
            body = {"detail": "a token is required: send 'Authorization: Bearer TOKEN' (or ?token=TOKEN)"}
            await _send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            detail = f"the request body is {_mb(int(length))}, over the upload limit (--max-upload-mb)"
            await _send_json(send, 413, {"detail": detail})
            return
        await self.app(scope, receive, send)

    def _authorised(self, headers: dict[str, str], query: bytes) -> bool:
        given = ""
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        else:
            given = (parse_qs(query.decode("latin-1")).get("token") or [""])[0]
        return secrets.compare_digest(given.encode(), self.token.encode())


async def _send_json(send: Callable, status: int, body: dict, extra: list | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


# ------------------------------------------------------------------------------------- serving
def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: an ephemeral port, read it back from getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(2048)
    return sock


def run(app: Any, sock: socket.socket, *, log_level: str = "warning") -> None:
    """Serve `app` on `sock` until SIGINT/SIGTERM (uvicorn), then return."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"
