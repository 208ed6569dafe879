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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from framepack import jobstate, sampling, vae
from framepack.config import GenerationRequest, RequestError, RuntimeOptions
from framepack.controls import Anchor, SectionPrompt, parse_prompts, place_anchors, prompts_per_section
from framepack.events import (
    Cancelled,
    CancelToken,
    Failed,
    Finished,
    GenerationCancelled,
    JobPlanned,
    SectionDone,
    StageStarted,
    StepProgress,
)
from framepack.inputs import JobInputs, prepare_inputs
from framepack.memory import peaks, release_host_memory, reset_peaks
from framepack.models.caches import TeaCache
from framepack.outputs import GenerationResult, check_output, write_metadata
from framepack.sections import (
    FPS,
    ForwardSchedule,
    InvertedSchedule,
    Section,
    make_schedule,
    pixel_frames,
    section_count,
)
from framepack.video import OverlapAssembler, SectionVideoWriter, to_uint8_frames

EventCallback = Callable[[object], None]


@dataclass
class JobPlan:
    """Everything about a job that is known before any model runs (checked, so errors come early)."""

    request: GenerationRequest
    inputs: JobInputs
    sections: list[Section]
    schedule: InvertedSchedule | ForwardSchedule
    prompts: list[SectionPrompt]  # per video-order section
    prompt_times: list[tuple[float, str]]
    anchors: list[Anchor]

    @property
    def frames(self) -> int:
        """Pixel frames of the finished video. Extending a video adds 36N frames after its last one:
        F1 cross-fades its first section over the input's last 33 frames, the original drops its
        first frame (the input's last frame, re-encoded)."""
        new = pixel_frames(len(self.sections), self.request.window)
        return new if self.inputs.video is None else self.inputs.video.frames + new - 1


def check_request(request: GenerationRequest, spec, image: np.ndarray | None = None) -> JobPlan:
    """Validate a request against a model: numbers, image/video inputs, prompts, keyframes, end frame."""
    request.validate()
    schedule = make_schedule(spec.schedule, request.window)
    if request.video is not None and not max(request.window, 1) <= request.video_context_frames:
        raise RequestError("video_context_frames must be at least the latent window size")
    inputs = prepare_inputs(request, request.resolution or spec.default_resolution, spec.schedule, image)
    sections = schedule.sections(section_count(request.seconds, request.window))
    prompts = parse_prompts(request.prompt)
    per_section, starts = prompts_per_section(prompts, len(sections), request.window, blend=request.prompt_blend)
    anchors = place_anchors([t for t, _ in request.keyframes], len(sections), request.window, spec.schedule,
                            end_frame=request.end_image is not None)  # fmt: skip
    times = [(t, p) for t, (_, p) in zip(starts, prompts)]
    return JobPlan(request, inputs, sections, schedule, per_section, times, anchors)


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
        plan = check_request(request, self.spec, image)
        saved = jobstate.load(state_dir) if jobstate.exists(state_dir) else None
        if saved is not None and (saved.request != request.to_json_dict() or saved.model != self.spec.name):
            raise RequestError(f"{state_dir} holds a different job's state (another request or model); cannot resume")
        (height, width), inputs = plan.inputs.size, plan.inputs
        video_path, meta_path = (
            check_output(request) if saved is None else (saved.video, saved.video.with_suffix(".json"))
        )
        emit(JobPlanned(len(plan.sections), plan.frames, plan.prompt_times,
                        [(a.source, a.seconds) for a in plan.anchors]))  # fmt: skip
        timings: dict = {"sections": []}
        t0 = time.perf_counter()
        reset_peaks(self.device)

        prompts = {p.prompt for p in plan.prompts} | {p.blend_from for p in plan.prompts if p.blend_from}
        prompts |= {request.negative_prompt} if request.cfg != 1 else set()
        need_text = any(self.c.cached_prompt(p) is None for p in prompts)
        manager = self.c.plan_job(height=height // 8, width=width // 8, window=request.window, with_text=need_text)

        def phase(name: str) -> contextlib.AbstractContextManager:
            return manager.use(name) if manager is not None else contextlib.nullcontext()

        try:
            embeddings, neg = self._encode_prompts(request, sorted(prompts), phase, manager, need_text, emit)
            cond_of = {}
            for sp in plan.prompts:  # one set of transformer text inputs per distinct (prompt, blend)
                if (sp.prompt, sp.blend_from) not in cond_of:
                    emb = embeddings[sp.prompt]
                    if sp.blend_from is not None:
                        emb = emb.blend(embeddings[sp.blend_from])
                    cond_of[(sp.prompt, sp.blend_from)] = emb
            start, siglip, anchors, prefix = self._encode_images(request, plan, phase, emit)
            if start is None:  # text-to-video starting from a generated frame
                start, siglip = self._generate_start(request, plan, cond_of, neg, phase, emit, cancel)
        except BaseException:
            if manager is not None:
                manager.close()
            raise
        timings["conditioning_s"] = round(time.perf_counter() - t0, 3)
        tiling = manager is not None and not manager.plan.high_vram and self.device.type != "cpu"
        self._plan_text = manager.plan.describe() if manager is not None else None

        conds = {k: self.c.transformer_inputs(e, siglip, request.distilled_guidance) for k, e in cond_of.items()}
        uncond = self.c.transformer_inputs(neg, siglip, request.distilled_guidance)
        schedule, sections = plan.schedule, plan.sections
        rng = torch.Generator("cpu").manual_seed(request.seed)
        parts = Path(state_dir) / jobstate.SEGMENTS if state_dir is not None else None
        if saved is None:
            history, done = schedule.start(start, prefix) if prefix is not None else schedule.start(start), 0
            writer = SectionVideoWriter(video_path, fps=FPS, crf=request.crf, parts_dir=parts)
        else:
            history, done = saved.history, saved.sections_done
            rng.set_state(saved.rng_state)
            writer = SectionVideoWriter.restore(video_path, saved.writer, parts)
        assembler = OverlapAssembler(writer, schedule.overlap(), schedule.direction)
        if saved is None and prefix is not None:  # forward extension: the input video comes first
            assembler.start_with(inputs.video.iter_frames(inputs.size), inputs.video.tail)
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
                anchor = anchors.get(section.video_index)
                ctx = {k: v.to(self.device, transformer.dtype) if v.is_floating_point() else v.to(self.device)
                       for k, v in schedule.context(history, section, anchor).as_kwargs().items()}  # fmt: skip
                sp = plan.prompts[section.video_index]
                cond = conds[(sp.prompt, sp.blend_from)]

                def velocity(x, t, pass_name, ctx=ctx, cond=cond):
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
        after = inputs.video.iter_frames(inputs.size) if inputs.video and schedule.direction == "backward" else None
        video = self._close_video(status, done, assembler, writer, state_dir, after)
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

    def _encode_prompts(self, request, prompts, phase, manager, need_text, emit):
        """Every distinct prompt once (cached by text), and the negative prompt (zeros when cfg is 1)."""
        emit(StageStarted("text encoding"))
        with phase("text_encoder") if need_text else contextlib.nullcontext():
            embeddings = {p: self.c.encode_prompt(p) for p in prompts}
        if need_text:
            if manager is not None:
                manager.drop("text_encoder")
            self.c.free_text_encoders()
        main = embeddings[parse_prompts(request.prompt)[0][1]]
        neg = embeddings[request.negative_prompt] if request.cfg != 1 else main.zeros_like()
        return embeddings, neg

    def _encode_images(self, request, plan, phase, emit):
        """Start latent (seeded), SigLIP states (blended with the end frame's), anchor latents, and
        for a forward extension the input video's context latents."""
        inputs, seed = plan.inputs, request.seed
        emit(StageStarted("vae encoding"))
        with phase("vae"):
            start = (
                None
                if inputs.start is None
                else vae.encode(self.c.vae, inputs.start, torch.Generator().manual_seed(seed))
            )
            anchors = {}
            for a in plan.anchors:
                image = inputs.end if a.source == "end" else inputs.keyframes[int(a.source.split()[1]) - 1]
                latent = vae.encode(self.c.vae, image, torch.Generator().manual_seed(seed + a.boundary))
                anchors[a.video_section] = latent * (request.end_strength if a.source == "end" else 1.0)
            prefix = None
            if inputs.video is not None and plan.schedule.direction == "forward":
                tail = inputs.video.tail[-request.video_context_frames :]
                prefix = vae.encode_frames(self.c.vae, tail, torch.Generator().manual_seed(seed))
        emit(StageStarted("image encoding"))
        with phase("image_encoder"):
            siglip = None if inputs.start is None else self.c.image_encoder.encode(inputs.start)
            if inputs.end is not None:
                w = request.end_embedding_weight
                siglip = (1 - w) * siglip + w * self.c.image_encoder.encode(inputs.end)
        return start, siglip, anchors, prefix

    def _generate_start(self, request, plan, cond_of, neg, phase, emit, cancel):
        """Text-to-video without a start image: sample one section with an empty start (zero latent,
        zero image embedding) and use its first frame as the start image."""
        h, w = plan.inputs.size
        with phase("image_encoder"):
            blank = torch.zeros_like(self.c.image_encoder.encode(np.zeros((h, w, 3), np.uint8)))
        key = (plan.prompts[0].prompt, None)
        emb = cond_of.get(key) or next(iter(cond_of.values()))
        cond = self.c.transformer_inputs(emb, blank, request.distilled_guidance)
        uncond = self.c.transformer_inputs(neg, blank, request.distilled_guidance)
        zeros = torch.zeros(1, self.c.transformer.config.in_channels, 1, h // 8, w // 8)
        forward = make_schedule("forward", request.window)
        section = forward.sections(1)[0]
        ctx = {k: v.to(self.device, self.c.transformer.dtype) if v.is_floating_point() else v.to(self.device)
               for k, v in forward.context(forward.start(zeros), section).as_kwargs().items()}  # fmt: skip

        def velocity(x, t, pass_name):
            kw = cond if pass_name == "cond" else uncond
            return self.c.transformer(hidden_states=x, timestep=t, **kw, **ctx).sample

        rng = torch.Generator("cpu").manual_seed(request.seed + 1)
        with phase("transformer"):
            latents = self._sample(request, velocity, None, zeros.shape, rng, section, 1, 0, emit, cancel)
        start = latents[:, :, :1].float().cpu()
        with phase("vae"):
            image = to_uint8_frames(vae.decode(self.c.vae, start))[0]
        with phase("image_encoder"):
            siglip = self.c.image_encoder.encode(image)
        return start, siglip

    @staticmethod
    def _close_video(status, done, assembler, writer, state_dir, after=None) -> Path | None:
        """Finished: the final MP4 (state removed). Stopped early: a playable MP4 of the finished sections;
        a resumable job keeps its last snapshot and segments for a resume instead."""
        try:
            if status == "finished":
                video = (assembler.finish_after(after) if after is not None else assembler.finish()) if done else None
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
