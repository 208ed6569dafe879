"""What a job leaves behind: the MP4 and its JSON sidecar (every setting, model ids, versions, timings,
memory), and where they go. `framepack generate --from result.json` re-runs a sidecar's request."""

from __future__ import annotations

import errno
import json
import os
import platform
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from framepack.config import GenerationRequest, RequestError
from framepack.sections import FPS


@dataclass(frozen=True)
class GenerationResult:
    status: str  # "finished" | "cancelled" | "failed"
    video: Path | None
    metadata: Path
    frames: int
    seconds: float  # video duration
    width: int
    height: int
    sections_done: int
    sections: int
    seed: int
    timings: dict
    peak_vram_bytes: int | None = None  # None without CUDA
    peak_rss_bytes: int | None = None

    def summary(self) -> dict:
        """What a job record keeps of the result."""
        return {"frames": self.frames, "seconds": round(self.seconds, 3), "width": self.width, "height": self.height,
                "sections": self.sections, "sections_done": self.sections_done, "seed": self.seed,
                "peak_vram_bytes": self.peak_vram_bytes, "peak_rss_bytes": self.peak_rss_bytes,
                "total_s": self.timings.get("total_s")}  # fmt: skip


def job_id() -> str:
    """Official naming: %y%m%d_%H%M%S_mmm_rand."""
    now = datetime.now()
    return f"{now:%y%m%d_%H%M%S}_{now.microsecond // 1000:03d}_{random.randint(0, 9999)}"


# Suffixes of videos we do not write: `--out x.webm` is an error naming .mp4, not a folder called x.webm.
OTHER_VIDEO_SUFFIXES = frozenset({".webm", ".mkv", ".mov", ".avi", ".gif", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
                                  ".ts", ".ogv", ".3gp"})  # fmt: skip


@dataclass(frozen=True)
class OutputPaths:
    """Where a job writes. `video` / `metadata` are written while it runs; `replaces` is an existing
    video the user allowed to be replaced (`overwrite`): the job then writes beside it, at
    `<name>.partial.mp4`, and `commit()` moves video and sidecar over the old ones once it is complete,
    so an interrupted run leaves the old video untouched."""

    video: Path
    metadata: Path
    replaces: Path | None = None

    def commit(self) -> tuple[Path, Path]:
        """The finished video moved over the one it replaces (an atomic rename), and its section
        checkpoints over the old video's; returns where the video is and where its sidecar goes."""
        if self.replaces is None:
            return self.video, self.metadata
        from framepack.checkpoints import sections_dir

        os.replace(self.video, self.replaces)
        old, new = sections_dir(self.replaces), sections_dir(self.video)
        shutil.rmtree(old, ignore_errors=True)  # the old video's checkpoints describe a file that is gone
        if new.is_dir():
            os.replace(new, old)
        return self.replaces, self.replaces.with_suffix(".json")


def _inputs_of(request: GenerationRequest) -> list[tuple[str, Path]]:
    named = request.input_files()
    return [(what, Path(p).expanduser()) for what, p in named if isinstance(p, str) and p and p != "<array>"]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


# Suffixes of images we do not write: `--out x.jpg` for an edit is an error naming .png.
OTHER_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".avif", ".gif"})


def check_output(request: GenerationRequest, suffix: str = ".mp4") -> OutputPaths:
    """Where a request's result (a video, `suffix` .mp4, or an edited image, .png) and its sidecar go;
    RequestError (before any model runs) for an output that cannot be written, that would replace an
    existing file without `overwrite`, or that is one of the job's inputs (never allowed)."""
    what, others = ("video", OTHER_VIDEO_SUFFIXES) if suffix == ".mp4" else ("image", OTHER_IMAGE_SUFFIXES)
    target = Path(request.output or "outputs").expanduser()
    given = target.suffix.lower()
    if given in others:
        raise RequestError(f"cannot write {target}: {what}s are written as {suffix[1:].upper()}; give a path ending "
                           f"in {suffix} or a folder")  # fmt: skip
    if given == suffix:
        if target.is_dir():
            raise RequestError(f"cannot write {what} to {target}: it is a folder; give a file path such as "
                               f"out{suffix}")  # fmt: skip
        folder, result = target.parent, target
    else:
        if target.exists() and not target.is_dir():
            raise RequestError(f"--out {target} exists and is not a folder; give a folder or a path ending in {suffix}")
        folder, result = target, None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".framepack-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RequestError(f"cannot write to output folder {folder}: {err.strerror or err}") from None
    if result is None:  # a folder: a fresh job name
        result = folder / f"{job_id()}{suffix}"
        while result.exists() or result.with_suffix(".json").exists():
            result = folder / f"{job_id()}{suffix}"
    meta = result.with_suffix(".json")
    for flag, path in _inputs_of(request):
        for out in (result, meta):
            if _same_file(out, path) or out.resolve() == path.resolve():
                raise RequestError(f"the output {out} is this job's input ({flag} {path}); choose another --out "
                                   "(an input is never written over)")  # fmt: skip
    existing = [p for p in (result, meta) if p.exists()]
    if not existing:
        return OutputPaths(result, meta)
    if not request.overwrite:
        names = " and ".join(str(p) for p in existing)
        raise RequestError(f"{names} already exist{'s' if len(existing) == 1 else ''}; pass --overwrite to replace "
                           f"it once the new {what} is complete, or choose another --out")  # fmt: skip
    partial = result.with_name(f"{result.stem}.partial{suffix}")
    return OutputPaths(partial, partial.with_suffix(".json"), replaces=result)


# ------------------------------------------------------------------------------------------ disk space
BYTES_PER_PIXEL_FRAME = 0.25  # H.264 at crf 16 of noise-like tiny-model video (measured 0.22-0.24); footage needs less


def disk_free(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds `path` (its nearest existing folder)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def disk_needed(frames: int, height: int, width: int, window: int = 9) -> int:
    """About the most disk a job of `frames` frames at height x width holds at once: the MP4 and its
    segments side by side while the finished file is joined (2x the video), the resume state's latent
    history (fp32, 16 channels at 1/8 size) and 1 MiB of headroom."""
    video = frames * height * width * BYTES_PER_PIXEL_FRAME
    history = 4 * 16 * max(19, 2 * window + 1) * (height // 8) * (width // 8)
    return int(2 * video + 2 * history + 2**20)


def is_disk_full(err: BaseException | None) -> bool:
    """An error (or one it was raised from) that means the disk is full: ENOSPC / EDQUOT, or SQLite's."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if type(err).__name__ == "OperationalError" and "full" in str(err):  # sqlite3: database or disk is full
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def disk_full_message(folder: str | os.PathLike, needed: int | None = None) -> str:
    free = disk_free(folder)
    need = f"; this job needs about {_mib(needed)}" if needed else ""
    return f"out of disk space in {folder}: {_mib(free)} free{need}. Free some space and try again"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.2f} GB"


@dataclass(frozen=True)
class RunInfo:
    """How a job ran, for its sidecar (besides its GenerationResult)."""

    request: GenerationRequest
    spec: object  # registry.ModelSpec
    device: torch.device
    dtype: torch.dtype  # the transformer's
    effective_crf: int | None  # None: no video writer was opened
    step_cache: dict | None  # the step cache's report (models.caches.StepCache.report)
    memory_plan: str | None
    error: str | None  # "Type: message" of what stopped a failed job
    loras: list[dict] | None = None  # framepack.lora.LoadedLora.describe() of each merged LoRA
    speed: dict | None = None  # how the transformer computed: {"fp8": None | "storage" | "compute", "compile": bool}
    branch: dict | None = None  # a branch's parent, branch point and what changed (framepack.branching)
    checkpoints: dict | None = None  # the video's section checkpoints: folder, policy, kept range, bytes


def run_metadata(status: str, run: RunInfo) -> dict:
    """What every sidecar holds: version, outcome, the request, the model, how it ran."""
    import diffusers
    import transformers

    import framepack

    spec, cache = run.spec, run.step_cache
    return {
        "framepack_version": framepack.__version__,
        "status": status,
        "error": run.error,
        "created": datetime.now().isoformat(timespec="seconds"),
        "request": run.request.to_json_dict(),
        "model": {
            "name": spec.name,
            "schedule": spec.schedule,
            "sources": {k: s.describe() for k, s in spec.sources.items()},
        },
        "step_cache": cache,
        "loras": run.loras or [],
        "memory_plan": run.memory_plan,
        "speed": run.speed,
        "device": str(run.device),
        "dtype": str(run.dtype).replace("torch.", ""),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a .partial sibling of `path`, then renamed over it: never a half-written file."""
    tmp = path.with_name(path.name + ".partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def relocate(value: Any, old: str, new: str) -> Any:
    """`value` (JSON data) with every path string inside folder `old` moved to folder `new` (a job folder
    resumed elsewhere: a moved outputs folder, another worker's scratch copy)."""
    if isinstance(value, str):
        if value == old:
            return new
        return new + value[len(old) :] if value.startswith(old.rstrip(os.sep) + os.sep) else value
    if isinstance(value, list):
        return [relocate(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: relocate(v, old, new) for k, v in value.items()}
    return value


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON at `path`, replaced atomically (never a half-written sidecar)."""
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def write_metadata(result: GenerationResult, run: RunInfo) -> None:
    """The JSON sidecar next to the video, replaced atomically."""
    cache = run.step_cache
    meta = run_metadata(result.status, run)
    meta.update({
        "video": result.video.name if result.video else None,
        "frames": result.frames,
        "fps": FPS,
        "duration_s": round(result.seconds, 3),
        "width": result.width,
        "height": result.height,
        "sections": result.sections,
        "sections_done": result.sections_done,
        "effective_crf": run.effective_crf,
        "teacache_computed_fraction": cache["computed_fraction"] if cache else None,  # the key of earlier versions
        "peak_vram_bytes": result.peak_vram_bytes,
        "peak_rss_bytes": result.peak_rss_bytes,
        "timings": result.timings,
        "branch": run.branch,
        "checkpoints": run.checkpoints,
    })  # fmt: skip
    write_json(result.metadata, meta)
