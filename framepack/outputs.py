"""What a job leaves behind: the MP4 and its JSON sidecar (every setting, model ids, versions, timings,
memory), and where they go. `framepack generate --from result.json` re-runs a sidecar's request."""

from __future__ import annotations

import json
import os
import platform
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

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


def job_id() -> str:
    """Official naming: %y%m%d_%H%M%S_mmm_rand."""
    now = datetime.now()
    return f"{now:%y%m%d_%H%M%S}_{now.microsecond // 1000:03d}_{random.randint(0, 9999)}"


def check_output(request: GenerationRequest) -> tuple[Path, Path]:
    """(video path, sidecar path) for a request; RequestError if the folder cannot be written."""
    target = Path(request.output or "outputs").expanduser()
    video = target if target.suffix.lower() == ".mp4" else target / f"{job_id()}.mp4"
    folder = video.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".framepack-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RequestError(f"cannot write to output folder {folder}: {err.strerror or err}") from None
    return video, video.with_suffix(".json")


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


def write_metadata(result: GenerationResult, run: RunInfo) -> None:
    """The JSON sidecar next to the video, replaced atomically."""
    import diffusers
    import transformers

    import framepack

    spec, cache = run.spec, run.step_cache
    meta = {
        "framepack_version": framepack.__version__,
        "status": result.status,
        "error": run.error,
        "created": datetime.now().isoformat(timespec="seconds"),
        "request": run.request.to_json_dict(),
        "model": {
            "name": spec.name,
            "schedule": spec.schedule,
            "sources": {k: s.describe() for k, s in spec.sources.items()},
        },
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
        "step_cache": cache,
        "peak_vram_bytes": result.peak_vram_bytes,
        "peak_rss_bytes": result.peak_rss_bytes,
        "memory_plan": run.memory_plan,
        "device": str(run.device),
        "dtype": str(run.dtype).replace("torch.", ""),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "timings": result.timings,
    }
    tmp = result.metadata.with_name(result.metadata.name + ".partial")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, result.metadata)
