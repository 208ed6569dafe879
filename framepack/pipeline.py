"""Image-to-video generation: the FramePack section loop.

    image, prompt ─► encoders (LLaMA + CLIP, cached by prompt; SigLIP) ─► VAE encode ─► start latent
    for section in schedule.sections(N):            inverted (original) or forward (F1), from the registry
        context = schedule.context(history, section)  1x / 2x / 4x clean latents + frame indices
        latents = sampler(transformer, noise, context)  UniPC flow matching, TeaCache attached from outside
        history = schedule.append(history, section, latents)
        assembler.add(vae.decode(schedule.to_decode(history, section)))   cross-fade + incremental MP4
        on_event(SectionDone(...))                    a playable MP4 exists after every section

Cost per section does not depend on video length: bounded latent history, decoding only the newest
latents, and an MP4 writer that encodes each frame once. The engine reports through events and
checks a CancelToken every step; it imports nothing from the front ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from framepack import sampling, vae
from framepack.config import GenerationRequest, RequestError, RuntimeOptions
from framepack.events import (
    Cancelled,
    CancelToken,
    Failed,
    Finished,
    GenerationCancelled,
    SectionDone,
    StageStarted,
    StepProgress,
)
from framepack.images import prepare_image
from framepack.memory import peaks, release_host_memory, reset_peaks
from framepack.models.caches import TeaCache
from framepack.sections import FPS, make_schedule, section_count
from framepack.video import OverlapAssembler, SectionVideoWriter

EventCallback = Callable[[object], None]


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


class Pipeline:
    def __init__(self, components, *, device: torch.device) -> None:
        self.c = components  # framepack.components.Components
        self.spec = components.spec
        self.device = device

    @torch.no_grad()
    def generate(
        self,
        request: GenerationRequest,
        on_event: EventCallback | None = None,
        cancel: CancelToken | None = None,
        *,
        image: np.ndarray | None = None,
    ) -> GenerationResult:
        """Run one job. `image` (uint8 HWC) may replace `request.image` for in-process callers."""
        emit = on_event or (lambda event: None)
        cancel = cancel or CancelToken()
        if image is not None and request.image is None:
            request = dataclasses.replace(request, image="<array>")
        request.validate()
        base = request.resolution or self.spec.default_resolution
        pixels, (height, width) = prepare_image(image if image is not None else request.image, base)
        video_path, meta_path = check_output(request)
        timings: dict = {"sections": []}
        t0 = time.perf_counter()
        reset_peaks(self.device)

        prompts = [request.prompt] + ([request.negative_prompt] if request.cfg != 1 else [])
        need_text = any(self.c.cached_prompt(p) is None for p in prompts)
        manager = self.c.plan_job(height=height // 8, width=width // 8, window=request.window, with_text=need_text)

        def phase(name: str) -> contextlib.AbstractContextManager:
            return manager.use(name) if manager is not None else contextlib.nullcontext()

        try:
            emit(StageStarted("text encoding"))
            with phase("text_encoder") if need_text else contextlib.nullcontext():
                pos = self.c.encode_prompt(request.prompt)
                neg = self.c.encode_prompt(request.negative_prompt) if request.cfg != 1 else pos.zeros_like()
            if need_text:
                if manager is not None:
                    manager.drop("text_encoder")
                self.c.free_text_encoders()
            emit(StageStarted("vae encoding"))
            with phase("vae"):
                start = vae.encode(self.c.vae, pixels, torch.Generator().manual_seed(request.seed))
            emit(StageStarted("image encoding"))
            with phase("image_encoder"):
                siglip = self.c.image_encoder.encode(pixels)
        except BaseException:
            if manager is not None:
                manager.close()
            raise
        timings["conditioning_s"] = round(time.perf_counter() - t0, 3)
        tiling = manager is not None and not manager.plan.high_vram and self.device.type != "cpu"
        self._plan_text = manager.plan.describe() if manager is not None else None

        cond = self.c.transformer_inputs(pos, siglip, request.distilled_guidance)
        uncond = self.c.transformer_inputs(neg, siglip, request.distilled_guidance)
        schedule = make_schedule(self.spec.schedule, request.window)
        sections = schedule.sections(section_count(request.seconds, request.window))
        history = schedule.start(start)
        writer = SectionVideoWriter(video_path, fps=FPS, crf=request.crf)
        assembler = OverlapAssembler(writer, schedule.overlap(), schedule.direction)
        rng = torch.Generator("cpu").manual_seed(request.seed)
        cache = TeaCache(request.teacache_threshold) if request.teacache else None
        transformer = self.c.transformer
        transformer.step_cache = cache
        done, status, error = 0, "finished", None
        try:
            for section in sections:
                cancel.check()
                ts = time.perf_counter()
                ctx = {k: v.to(self.device, transformer.dtype) if v.is_floating_point() else v.to(self.device)
                       for k, v in schedule.context(history, section).as_kwargs().items()}  # fmt: skip

                def velocity(x, t, pass_name, ctx=ctx):
                    kw = cond if pass_name == "cond" else uncond
                    return transformer(hidden_states=x, timestep=t, **kw, **ctx).sample

                with phase("transformer"):
                    latents = self._sample(request, velocity, cache, start.shape, rng, section, len(sections),
                                           writer.num_frames, emit, cancel)  # fmt: skip
                history = schedule.append(history, section, latents)
                td = time.perf_counter()
                emit(StageStarted("decoding", section.index, len(sections)))
                with phase("vae"):
                    pixels_out = vae.decode(self.c.vae, schedule.to_decode(history, section), tiling=tiling)
                assembler.add(pixels_out)
                done += 1
                release_host_memory()  # the decode's temporaries: keep RSS flat from section to section
                timings["sections"].append(
                    {"sample_s": round(td - ts, 3), "decode_write_s": round(time.perf_counter() - td, 3)}
                )
                emit(SectionDone(section.index, len(sections), video_path, writer.num_frames, writer.num_frames / FPS))
        except GenerationCancelled:
            status = "cancelled"
        except Exception as err:
            status, error = "failed", f"{type(err).__name__}: {err}"
        finally:
            transformer.step_cache = None
            transformer.clear_section_cache()
            if manager is not None:
                manager.close()
        video = None
        try:
            if done:
                video = assembler.finish()
            else:
                writer.abort()
        except Exception as err:  # keep the first error if there was one
            writer.abort()
            status, error = "failed", error or f"{type(err).__name__}: {err}"
        release_host_memory()
        timings["total_s"] = round(time.perf_counter() - t0, 3)
        peak_vram, peak_rss = peaks(self.device)
        result = GenerationResult(status, video, meta_path, writer.num_frames if video else 0,
                                  (writer.num_frames if video else 0) / FPS, width, height, done, len(sections),
                                  request.seed, timings, peak_vram, peak_rss)  # fmt: skip
        self._write_metadata(result, request, writer, cache, error)
        if status == "finished":
            emit(Finished(result))
        elif status == "cancelled":
            emit(Cancelled(result))
        else:
            emit(Failed(error))
            raise RuntimeError(f"generation failed: {error} (partial results: {meta_path})")
        return result

    def _sample(self, request, velocity, cache, start_shape, rng, section, count, frames_done, emit, cancel):
        b, c, _, h, w = start_shape
        noise = torch.randn((b, c, request.window, h, w), generator=rng).to(self.device)
        sigmas = sampling.flow_sigmas(request.steps, seq_len=request.window * h * w // 4, shift=request.shift)
        if cache is not None:
            cache.reset(request.steps)
        model = sampling.guided_model(
            velocity, cfg=request.cfg, rescale=request.cfg_rescale, model_dtype=self.c.transformer.dtype,
            on_pass=cache.select if cache is not None else None,
        )  # fmt: skip

        def progress(info: sampling.StepInfo) -> None:
            emit(StepProgress(section.index, count, info.step + 1, info.total, frames_done, vae.preview(info.denoised)))

        emit(StageStarted("sampling", section.index, count))
        run = sampling.sample_euler if request.sampler == "euler" else sampling.sample_unipc
        kwargs = {} if request.sampler == "euler" else {"variant": "bh2" if request.sampler == "unipc-bh2" else "bh1"}
        return run(model, noise, sigmas, callback=progress, check_cancel=cancel.check, **kwargs)

    _plan_text: str | None = None

    def _write_metadata(self, result: GenerationResult, request, writer, cache, error) -> None:
        import diffusers
        import transformers

        import framepack

        meta = {
            "framepack_version": framepack.__version__,
            "status": result.status,
            "error": error,
            "created": datetime.now().isoformat(timespec="seconds"),
            "request": request.to_json_dict(),
            "model": {
                "name": self.spec.name,
                "schedule": self.spec.schedule,
                "sources": {k: s.describe() for k, s in self.spec.sources.items()},
            },
            "video": result.video.name if result.video else None,
            "frames": result.frames,
            "fps": FPS,
            "duration_s": round(result.seconds, 3),
            "width": result.width,
            "height": result.height,
            "sections": result.sections,
            "sections_done": result.sections_done,
            "effective_crf": writer.effective_crf,
            "teacache_computed_fraction": round(cache.computed_fraction, 3) if cache else None,
            "peak_vram_bytes": result.peak_vram_bytes,
            "peak_rss_bytes": result.peak_rss_bytes,
            "memory_plan": self._plan_text,
            "device": str(self.device),
            "dtype": str(self.c.transformer.dtype).replace("torch.", ""),
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


def load_pipeline(
    model: str = "tiny",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attention: str = "auto",
    models_dir: str | os.PathLike | None = None,
    download: bool = True,
    prompt_cache_dir: str | os.PathLike | None = None,
    options: RuntimeOptions | None = None,
) -> Pipeline:
    """Load the named model (see framepack.registry) onto `device` (default: CUDA if available, else CPU)."""
    from framepack.components import load_components
    from framepack.memory import configure_host_allocator

    configure_host_allocator()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    components = load_components(model, dev, dtype=dtype, attention=attention, models_dir=models_dir,
                                 download=download, prompt_cache_dir=prompt_cache_dir, options=options)  # fmt: skip
    return Pipeline(components, device=dev)
