"""What a job is: its states, kinds, record (`Job`), errors, and how client parameters and uploads
become a checked request (the engine's whole check at submission: `check_runnable`).

Request parameters are derived from the request's fields: whatever fields `GenerationRequest` has, a
video job accepts; a frame edit (`"kind": "edit"`, `config.EditRequest`) accepts its own. The server owns
every field that holds a path (`SERVER_FIELDS`): images are uploaded with the job. A frame edit's
reference images are uploaded as control_2, control_3, ... (the start image is control 1), each with an
optional control_N_mask; the start image's mask is image_mask. In `params`, the `controls` list gives
only each reference's RoPE index, `{"index": N}` (or null: the preset's), one entry per uploaded
reference, in order. LoRAs: a job names its files in the queue's LoRA folder, by name or by an absolute
path inside it, never a file elsewhere.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from framepack.config import VIDEO_ONLY, EditRequest, GenerationRequest, RequestError, request_from_json
from framepack.outputs import disk_needed

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
    fields.update({name: upload_file(name) for name in IMAGE_UPLOADS if name in uploads})
    if "controls" in {f.name for f in dataclasses.fields(kind.request)}:  # a frame edit's reference images
        fields["controls"] = _controls(params.get("controls"), uploads)
    return request_from_json(fields).validate()


def upload_file(name: str) -> str:
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
        files = {key: upload_file(f"control_{n}{suffix}") if f"control_{n}{suffix}" in uploads else None
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


def check_options(options: dict | None) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - {"preserved_memory_gb"})
    if unknown:
        raise RequestError(f"unknown job options {unknown}; accepted: ['preserved_memory_gb']")
    gb = options.get("preserved_memory_gb")
    if gb is not None and (isinstance(gb, bool) or not isinstance(gb, (int, float)) or not 0 <= gb <= 1024):
        raise RequestError(f"preserved_memory_gb must be a number in 0..1024 (GB), got {gb!r}")
    return {k: v for k, v in options.items() if v is not None}


def absolute(request: dict, folder: Path, lora_folder: Path) -> dict:
    """The stored request (file names relative to the job folder, LoRAs named in the LoRA folder) as the
    engine gets it. RequestError for a LoRA path outside the LoRA folder."""
    out = {**request, "image": str(folder / INPUT), "output": str(folder / result_name(request))}
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


def result_name(request: dict) -> str:
    """A stored request's result file in its job folder: video.mp4, or edit.png for a frame edit."""
    kind = KINDS.get(request.get("kind", "video")) if isinstance(request.get("kind", "video"), str) else None
    return (kind or KINDS["video"]).result


def relative(summary: dict, job_id: str) -> dict:
    """A result's summary with its files (an edit's image and control images) relative to the jobs folder."""
    out = dict(summary)
    if isinstance(out.get("image"), str):
        out["image"] = f"{job_id}/{out['image']}"
    if isinstance(out.get("controls"), list):
        out["controls"] = [f"{job_id}/{name}" for name in out["controls"]]
    return out


def decode_upload(source: Any, name: str | None, *, alpha: bool = False, mask: bool = False) -> np.ndarray:
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


def space_needed(request: GenerationRequest, image_hw: tuple[int, int], model: str) -> int:
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


def check_runnable(stored: dict, folder: Path, model: str, loras: Any) -> None:
    """The engine's whole request check (prompts, anchors, inputs against the model) at submission,
    without loading any model, so the API refuses what the CLI refuses before a job is queued. Every
    LoRA file must be in the LoRA folder `loras` (a `framepack.lora.LoraLibrary`) and be a readable
    safetensors file (LoraError, a RequestError, otherwise)."""
    from framepack.oneframe import check_edit
    from framepack.pipeline import check_request
    from framepack.registry import get_spec

    request = request_from_json(absolute(stored, folder, loras.folder))
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
