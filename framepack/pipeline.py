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
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from framepack import jobstate, sampling, vae
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
from framepack.outputs import GenerationResult, check_output, write_metadata
from framepack.sections import FPS, make_schedule, section_count
from framepack.video import OverlapAssembler, SectionVideoWriter

EventCallback = Callable[[object], None]


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
        state_dir: str | os.PathLike | None = None,
    ) -> GenerationResult:
        """Run one job. `image` (uint8 HWC) may replace `request.image` for in-process callers.

        `state_dir`: make the job resumable. State is saved there after every finished section; if
        the folder already holds a saved state for the same request, the job continues from it (the
        result equals an uninterrupted run's). Removed when the job finishes.
        """
        emit = on_event or (lambda event: None)
        cancel = cancel or CancelToken()
        if image is not None and request.image is None:
            request = dataclasses.replace(request, image="<array>")
        request.validate()
        saved = jobstate.load(state_dir) if jobstate.exists(state_dir) else None
        if saved is not None and (saved.request != request.to_json_dict() or saved.model != self.spec.name):
            raise RequestError(f"{state_dir} holds a different job's state (another request or model); cannot resume")
        base = request.resolution or self.spec.default_resolution
        pixels, (height, width) = prepare_image(image if image is not None else request.image, base)
        video_path, meta_path = (
            check_output(request) if saved is None else (saved.video, saved.video.with_suffix(".json"))
        )
        timings: dict = {"sections": []}
        t0 = time.perf_counter()
        reset_peaks(self.device)

        prompts = [request.prompt] + ([request.negative_prompt] if request.cfg != 1 else [])
        need_text = any(self.c.cached_prompt(p) is None for p in prompts)
        manager = self.c.plan_job(height=height // 8, width=width // 8, window=request.window, with_text=need_text)

        def phase(name: str) -> contextlib.AbstractContextManager:
            return manager.use(name) if manager is not None else contextlib.nullcontext()

        try:
            pos, neg, start, siglip = self._condition(request, pixels, phase, manager, need_text, emit)
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
        rng = torch.Generator("cpu").manual_seed(request.seed)
        parts = Path(state_dir) / jobstate.SEGMENTS if state_dir is not None else None
        if saved is None:
            history, done = schedule.start(start), 0
            writer = SectionVideoWriter(video_path, fps=FPS, crf=request.crf, parts_dir=parts)
        else:
            history, done = saved.history, saved.sections_done
            rng.set_state(saved.rng_state)
            writer = SectionVideoWriter.restore(video_path, saved.writer, parts)
        assembler = OverlapAssembler(writer, schedule.overlap(), schedule.direction)
        if done:  # the edge still to be cross-faded: re-decoded from the last finished section's latents
            with phase("vae"):
                last = vae.decode(self.c.vae, schedule.to_decode(history, sections[done - 1]), tiling=tiling)
            assembler.restore(last, done)
        cache = TeaCache(request.teacache_threshold) if request.teacache else None
        transformer = self.c.transformer
        transformer.step_cache = cache
        status, error = "finished", None
        try:
            for section in sections[done:]:
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
                    decoded = vae.decode(self.c.vae, schedule.to_decode(history, section), tiling=tiling)
                assembler.add(decoded)
                done += 1
                if state_dir is not None:
                    jobstate.save(state_dir, request=request.to_json_dict(), model=self.spec.name, sections_done=done,
                                  video=video_path, writer=writer.state(), history=history, rng=rng)  # fmt: skip
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
        video = self._close_video(status, done, assembler, writer, state_dir)
        if video is None and status == "finished":
            status, error = "failed", "the video could not be written"
        release_host_memory()
        timings["total_s"] = round(time.perf_counter() - t0, 3)
        peak_vram, peak_rss = peaks(self.device)
        frames = writer.num_frames if video else 0
        result = GenerationResult(status, video, meta_path, frames, frames / FPS, width, height, done, len(sections),
                                  request.seed, timings, peak_vram, peak_rss)  # fmt: skip
        write_metadata(
            result, request, self.spec, writer, cache, error, self.device, self.c.transformer.dtype, self._plan_text
        )
        if status == "finished":
            emit(Finished(result))
        elif status == "cancelled":
            emit(Cancelled(result))
        else:
            emit(Failed(error))
            raise RuntimeError(f"generation failed: {error} (partial results: {meta_path})")
        return result

    def _condition(self, request, pixels, phase, manager, need_text, emit):
        """Prompt embeddings (cached by prompt), the start latent (seeded) and the SigLIP states."""
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
        return pos, neg, start, siglip

    @staticmethod
    def _close_video(status, done, assembler, writer, state_dir) -> Path | None:
        """Finished: the final MP4 (state removed). Stopped early: a playable MP4 of the finished sections;
        a resumable job keeps its last snapshot and segments for a resume instead."""
        try:
            if status == "finished":
                video = assembler.finish() if done else None
                if state_dir is not None:
                    shutil.rmtree(state_dir, ignore_errors=True)
                return video
            if not done:
                writer.abort()
                return None
            if state_dir is not None:
                writer.keep_segments()  # the snapshot written after the last section stays playable
                return writer.path
            return assembler.finish()
        except Exception:
            writer.abort()
            return None

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
