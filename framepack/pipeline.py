"""Image-to-video generation: the FramePack section loop.

    check_request(request, spec)      numbers, inputs, prompts, anchors -> a JobPlan (before any model runs)
    run = JobRun(pipeline, plan)      output paths or saved state, the job's memory plan, its step cache
    run.condition()                   prompts (LLaMA + CLIP, cached by text) and images (VAE, SigLIP)
                                      -> the transformer's inputs and the start latent
    run.open_output()                 a new MP4 writer, or the one a saved state continues
    for section in run.pending():     the schedule's order: back to front (original) or forward (F1)
        run.section(section)          context -> sampler (+ step cache) -> history -> VAE decode -> MP4
    run.close()                       the final MP4 and sidecar; Finished / Cancelled / Failed

Cost per section does not depend on video length: bounded latent history, decoding only the newest
latents, and an MP4 writer that encodes each frame once. The engine reports through events and
checks a CancelToken every step; it imports nothing from the front ends. Everything one job needs
(request, plan, memory manager, events, cancel token, RNG, video) lives on its `JobRun`; the
`Pipeline` holds only the loaded models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from framepack import jobstate, sampling, vae
from framepack.cachetables import find_table
from framepack.checkpoints import KeepPolicy, SectionStore, sections_dir
from framepack.config import GenerationRequest, RequestError, RuntimeOptions
from framepack.controls import Anchor, SectionPrompt, parse_prompts, place_anchors, prompts_per_section
from framepack.events import (
    Cancelled,
    CancelToken,
    Failed,
    Finished,
    GenerationCancelled,
    JobPlanned,
    LorasApplied,
    SectionDone,
    StageStarted,
    StepProgress,
)
from framepack.inputs import JobInputs, prepare_inputs
from framepack.memory import peaks, release_host_memory, reset_peaks
from framepack.models.caches import StepCache, make_step_cache
from framepack.outputs import GenerationResult, OutputPaths, RunInfo, check_output, write_metadata
from framepack.sections import FPS, ForwardSchedule, History, Schedule, Section, make_schedule
from framepack.video import OverlapAssembler, SectionVideoWriter, probe, to_uint8_frames

EventCallback = Callable[[object], None]


class GenerationFailed(RuntimeError):
    """A job that stopped on an error after its video was started. `__cause__` is the original error
    (its type and message are also in the Failed event and the sidecar); `result` describes what was
    left behind (a playable MP4 of the finished sections, the sidecar)."""

    def __init__(self, message: str, result: GenerationResult) -> None:
        super().__init__(message)
        self.result = result


class GenerationInterrupted(KeyboardInterrupt):
    """A KeyboardInterrupt (a second Ctrl-C) that stopped a job at once: raised again after the video of
    the finished sections and the sidecar are written; `result` describes them."""

    def __init__(self, result: GenerationResult) -> None:
        super().__init__("interrupted")
        self.result = result


@dataclass
class JobPlan:
    """Everything about a job that is known before any model runs (checked, so errors come early)."""

    request: GenerationRequest
    inputs: JobInputs
    sections: list[Section]
    schedule: Schedule
    prompts: list[SectionPrompt]  # per video-order section
    prompt_times: list[tuple[float, str]]
    anchors: list[Anchor]
    notes: tuple[str, ...] = ()  # adjustments and warnings the checks report (JobPlanned.notes)

    @property
    def frames(self) -> int:
        """Pixel frames of the finished video. Continuing an input video adds the new frames after its
        last one: joined over the schedule's overlap, minus the one frame both share."""
        new = self.schedule.frames(len(self.sections))
        return new if self.inputs.video is None else self.inputs.video.frames + new - 1


def check_request(request: GenerationRequest, spec, image: np.ndarray | None = None) -> JobPlan:
    """Validate a request against a model: numbers, image/video inputs, prompts, keyframes, end frame."""
    request.validate()
    schedule = make_schedule(spec.schedule, request.window)
    if request.video is not None and not max(request.window, 1) <= request.video_context_frames:
        raise RequestError("video_context_frames must be at least the latent window size")
    inputs = prepare_inputs(request, request.resolution or spec.default_resolution, schedule, image)
    sections = schedule.sections_for(request.seconds)
    prompts = parse_prompts(request.prompt)
    per_section, starts = prompts_per_section(prompts, len(sections), request.window, blend=request.prompt_blend)
    anchors = place_anchors([t for t, _ in request.keyframes], schedule, len(sections),
                            end_frame=request.end_image is not None)  # fmt: skip
    times = [(t, p) for t, (_, p) in zip(starts, prompts)]
    return JobPlan(request, inputs, sections, schedule, per_section, times, anchors)


class Pipeline:
    """The loaded models of one registry spec; `generate` runs a job on them."""

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
        step_cache: StepCache | None = None,
        checkpoints: KeepPolicy | str | int | None = "all",
        preserved_memory_gb: float | None = None,
    ) -> GenerationResult:
        """Run one job (the flow in the module docstring). `image` (uint8 HWC) may replace
        `request.image` for in-process callers.

        `state_dir`: make the job resumable. State is saved there after every finished section; if
        the folder already holds a saved state for the same request, the job continues from it (the
        result equals an uninterrupted run's). Removed when the job finishes.
        `step_cache`: use this step cache instead of the request's (e.g. a MagCache calibrator).
        `checkpoints`: the section checkpoints kept beside the video for branching (framepack.checkpoints):
        "all", the last N, or "none" / None.
        `preserved_memory_gb`: device memory this job leaves free, instead of the pipeline's option.

        Errors before the video exists (bad inputs, memory budget, missing weights) are raised as they
        are. Once it exists, a cancel gives a `Cancelled` result and an error a `GenerationFailed`
        (from the original error), both with a playable MP4 of the finished sections and a sidecar; a
        KeyboardInterrupt writes them too and is raised again as `GenerationInterrupted`.
        """
        if image is not None and request.image is None:
            request = dataclasses.replace(request, image="<array>")
        plan = check_request(request, self.spec, image)
        keep = checkpoints if isinstance(checkpoints, KeepPolicy) else KeepPolicy.parse(checkpoints or "none")
        run = JobRun(self, plan, on_event or _ignore, cancel or CancelToken(), state_dir, step_cache, keep,
                     preserved_memory_gb)  # fmt: skip
        return self._execute(run)

    @torch.no_grad()
    def edit(self, request, on_event: EventCallback | None = None, cancel: CancelToken | None = None, *,
             image: np.ndarray | None = None, step_cache: StepCache | None = None,
             preserved_memory_gb: float | None = None):  # fmt: skip
        """A one-frame edit (`config.EditRequest`, framepack.oneframe): one PNG and its sidecar. Errors
        are raised as they are (nothing is written before the image exists); a cancel gives a
        `Cancelled` result with no image."""
        from framepack.oneframe import EditRun, check_edit

        if image is not None and request.image is None:
            request = dataclasses.replace(request, image="<array>")
        plan = check_edit(request, self.spec, image)
        return self._execute(EditRun(self, plan, on_event or _ignore, cancel or CancelToken(), None, step_cache,
                                     preserved_memory_gb=preserved_memory_gb))  # fmt: skip

    def run(self, request, on_event: EventCallback | None = None, cancel: CancelToken | None = None, *,
            state_dir: str | os.PathLike | None = None, checkpoints: KeepPolicy | str | int | None = "all",
            preserved_memory_gb: float | None = None):  # fmt: skip
        """Any job kind (`request.kind`): a video (`generate`, resumable from `state_dir`) or a frame edit."""
        if request.kind == "edit":
            return self.edit(request, on_event, cancel, preserved_memory_gb=preserved_memory_gb)
        return self.generate(request, on_event, cancel, state_dir=state_dir, checkpoints=checkpoints,
                             preserved_memory_gb=preserved_memory_gb)  # fmt: skip

    def _execute(self, run: JobRun):
        interrupted = False
        try:
            run.condition()
            run.open_output()
            for section in run.pending():
                run.section(section)
        except (GenerationCancelled, KeyboardInterrupt) as err:
            run.stop("cancelled")
            interrupted = isinstance(err, KeyboardInterrupt)
        except Exception as err:
            if not run.started:
                raise
            run.stop("failed", err)
        finally:
            run.release()
        result = run.close()
        if interrupted:
            raise GenerationInterrupted(result)
        return result


def _ignore(event: object) -> None:
    pass


@dataclass(frozen=True)
class _Where:
    """Which section a sampler run belongs to, for its progress events."""

    section: int
    sections: int
    frames_done: int


@dataclass
class _Conditioning:
    """What every section of a job shares."""

    start: torch.Tensor  # (1, C, 1, h, w) the start latent
    conds: dict[tuple[str, str | None], dict]  # transformer text + image inputs per (prompt, blended-from)
    uncond: dict  # the negative pass's (zeros when cfg is 1: never run)
    anchors: dict[int, torch.Tensor]  # video section -> clean latent for its 1x slot (end frame, keyframes)
    prefix: torch.Tensor | None  # latents of an input video's last frames, when the schedule continues from them


class JobRun:
    """One `Pipeline.generate` call: the checked plan, its output paths or saved state, memory
    manager, step cache, event callback, cancel token, RNG and video. Its methods are the flow."""

    def __init__(self, pipe: Pipeline, plan: JobPlan, emit: EventCallback, cancel: CancelToken,
                 state_dir: str | os.PathLike | None, step_cache: StepCache | None = None,
                 keep: KeepPolicy | None = None, preserved_memory_gb: float | None = None) -> None:  # fmt: skip
        self.pipe, self.c, self.device = pipe, pipe.c, pipe.device
        self.plan, self.request, self.schedule = plan, plan.request, plan.schedule
        self.emit, self.cancel = emit, cancel
        self.state_dir = Path(state_dir) if state_dir is not None else None
        request = self.request
        self.saved = jobstate.load(state_dir) if jobstate.exists(state_dir) else None
        if self.saved is not None and (self.saved.request != request.to_json_dict()
                                       or self.saved.model != pipe.spec.name):  # fmt: skip
            raise RequestError(f"{state_dir} holds a different job's state (another request or model); cannot resume")
        saved = self.saved
        # A branch encodes its images as its parent did (a new seed changes only the noise from the branch on).
        self.encode_seed = saved.encode_seed if saved and saved.encode_seed is not None else request.seed
        self.branch = saved.branch if saved else None
        self.keep, self.store = keep, None
        self.loras = self.c.prepare_loras(request)  # found, read and checked: before any output exists
        self.out = (OutputPaths(saved.video, saved.video.with_suffix(".json"), saved.replaces) if saved
                    else self._output_paths())  # fmt: skip
        self.video_path = self.out.video
        emit(JobPlanned(len(plan.sections), plan.frames, plan.prompt_times,
                        [(a.source, a.seconds) for a in plan.anchors], plan.notes))  # fmt: skip
        self.timings: dict = {"sections": []}
        self.t0 = time.perf_counter()
        switched = self.c.apply_loras(self.loras)  # before the memory plan moves any weight
        if switched is not None:
            self.timings["lora_switch_s"] = switched["seconds"]
        self.lora_reports = [lo.describe() for lo in self.loras]  # the event's and the sidecar's
        if self.loras:
            emit(LorasApplied([lo.summary() for lo in self.loras], self.lora_reports,
                              switched["seconds"] if switched else 0.0))  # fmt: skip
        reset_peaks(self.device)
        self.rng = torch.Generator("cpu").manual_seed(request.seed)
        pending = plan.sections[saved.sections_done if saved else 0 :] or plan.sections[-1:]  # at least one
        self.needed = needed = [plan.prompts[s.video_index] for s in pending]
        self.prompts = {p.prompt for p in needed} | {p.blend_from for p in needed if p.blend_from}  # of what it makes
        self.prompts |= {request.negative_prompt} if request.cfg != 1 else set()
        self.need_text = any(self.c.cached_prompt(p) is None for p in self.prompts)
        height, width = plan.inputs.size
        self.memory = self.c.plan_job(height=height // 8, width=width // 8, window=request.window,
                                      with_text=self.need_text, preserved_memory_gb=preserved_memory_gb)  # fmt: skip
        table = find_table(pipe.spec, height, width, request.steps) if request.cache == "magcache" else None
        self.cache: StepCache | None = step_cache or make_step_cache(request, table)
        self.cond: _Conditioning | None = None
        self.history: History | None = None
        self.writer: SectionVideoWriter | None = None
        self.assembler: OverlapAssembler | None = None
        self.done = 0
        self.started = False  # the video is open: from here on a job ends with a result and a sidecar
        self.status, self.error = "finished", None  # error: the exception that stopped a failed job

    def _output_paths(self) -> OutputPaths:
        return check_output(self.request)

    # ---------------------------------------------------------------------------- conditioning
    def condition(self) -> None:
        """Prompts and images -> the transformer inputs every section shares, and the start latent."""
        embeddings, neg = self._encode_prompts()
        blended = {}
        for sp in self.needed:  # one set of transformer text inputs per distinct (prompt, blend) still to make
            if (sp.prompt, sp.blend_from) not in blended:
                emb = embeddings[sp.prompt]
                blended[(sp.prompt, sp.blend_from)] = emb if sp.blend_from is None else emb.blend(
                    embeddings[sp.blend_from])  # fmt: skip
        start, siglip, anchors, prefix = self._encode_images()
        if start is None and self.saved is not None:  # its generated start frame is in the saved history
            start = self.saved.history.start
            with self.memory.use("vae"):
                image = to_uint8_frames(vae.decode(self.c.vae, start))[0]
            with self.memory.use("image_encoder"):
                siglip = self.c.image_encoder.encode(image)
        elif start is None:  # text-to-video starting from a generated frame
            start, siglip = self._generate_start(blended, neg)
        self.timings["conditioning_s"] = round(time.perf_counter() - self.t0, 3)
        guidance = self.request.distilled_guidance
        conds = {k: self.c.transformer_inputs(e, siglip, guidance) for k, e in blended.items()}
        uncond = self.c.transformer_inputs(neg, siglip, guidance)
        self.cond = _Conditioning(start, conds, uncond, anchors, prefix)

    def _encode_prompts(self):
        """Every distinct prompt once (cached by text), and the negative prompt (zeros when cfg is 1)."""
        self.emit(StageStarted("text encoding"))
        with self.memory.use("text_encoder") if self.need_text else contextlib.nullcontext():
            embeddings = {p: self.c.encode_prompt(p) for p in sorted(self.prompts)}
        if self.need_text:
            self.memory.drop("text_encoder")
            self.c.free_text_encoders()
        request = self.request
        first = parse_prompts(request.prompt)[0][1]
        main = embeddings[first] if first in embeddings else next(iter(embeddings.values()))
        return embeddings, embeddings[request.negative_prompt] if request.cfg != 1 else main.zeros_like()

    def _encode_images(self):
        """Start latent (seeded), SigLIP states (blended with the end frame's), anchor latents, and the
        latents of the input video frames the schedule continues from."""
        inputs, request, seed = self.plan.inputs, self.request, self.encode_seed
        self.emit(StageStarted("vae encoding"))
        with self.memory.use("vae"):
            start = None if inputs.start is None else vae.encode(self.c.vae, inputs.start, _seeded(seed))
            anchors = {}
            for a in self.plan.anchors:
                image = inputs.end if a.source == "end" else inputs.keyframes[int(a.source.split()[1]) - 1]
                latent = vae.encode(self.c.vae, image, _seeded(seed + a.boundary))
                anchors[a.video_section] = latent * (request.end_strength if a.source == "end" else 1.0)
            prefix = self._context_latents(start)
        self.emit(StageStarted("image encoding"))
        with self.memory.use("image_encoder"):
            siglip = None if inputs.start is None else self.c.image_encoder.encode(inputs.start)
            if inputs.end is not None:
                w = request.end_embedding_weight
                siglip = (1 - w) * siglip + w * self.c.image_encoder.encode(inputs.end)
        return start, siglip, anchors, prefix

    def _context_latents(self, start: torch.Tensor | None) -> torch.Tensor | None:
        """The latents the schedule starts from besides the start latent (`Schedule.start`'s `prefix`),
        encoded while the VAE is on the device: an input video's last frames, if it continues one."""
        frames = self.plan.inputs.video_context
        return None if frames is None else vae.encode_frames(self.c.vae, frames, _seeded(self.encode_seed))

    def _generate_start(self, blended: dict, neg):
        """Text-to-video without a start image: sample one forward section from an empty start (zero
        latent, zero image embedding), whatever the model's schedule, and use its first frame."""
        h, w = self.plan.inputs.size
        with self.memory.use("image_encoder"):
            blank = torch.zeros_like(self.c.image_encoder.encode(np.zeros((h, w, 3), np.uint8)))
        emb = blended.get((self.plan.prompts[0].prompt, None)) or next(iter(blended.values()))
        guidance = self.request.distilled_guidance
        cond = self.c.transformer_inputs(emb, blank, guidance)
        uncond = self.c.transformer_inputs(neg, blank, guidance)
        zeros = torch.zeros(1, self.c.transformer.config.in_channels, 1, h // 8, w // 8)
        forward = ForwardSchedule(self.request.window)
        section = forward.sections(1)[0]
        velocity = self._velocity(cond, uncond, forward.context(forward.start(zeros), section))
        noise = self._noise(zeros.shape, torch.Generator("cpu").manual_seed(self.encode_seed + 1), forward.window)
        with self.memory.use("transformer"):
            latents = self._sample(velocity, noise, _Where(0, 1, 0), None)
        start = latents[:, :, :1].float().cpu()
        with self.memory.use("vae"):
            image = to_uint8_frames(vae.decode(self.c.vae, start))[0]
        with self.memory.use("image_encoder"):
            siglip = self.c.image_encoder.encode(image)
        return start, siglip

    # ---------------------------------------------------------------------------- sections
    def open_output(self) -> None:
        """A new writer and history, or the saved ones (the cross-fade edge re-decoded from the last
        finished section's latents); an input video's frames go first."""
        saved, inputs, schedule = self.saved, self.plan.inputs, self.schedule
        parts = self.state_dir / jobstate.SEGMENTS if self.state_dir is not None else None
        if saved is None:
            self.history = schedule.start(self.cond.start, self.cond.prefix)
            writer = SectionVideoWriter(self.video_path, fps=FPS, crf=self.request.crf, parts_dir=parts)
        else:
            self.history, self.done = saved.history, saved.sections_done
            self.rng.set_state(saved.rng_state)
            writer = SectionVideoWriter.restore(self.video_path, saved.writer, parts)
        self.writer = writer
        self.assembler = OverlapAssembler(writer, schedule.overlap(), schedule.grows_at)
        if inputs.video is not None:
            self.assembler.put_input_first(lambda: inputs.video.iter_frames(inputs.size), inputs.video.tail,
                                           written=saved is not None)  # fmt: skip
        if self.done:
            with self.memory.use("vae"):
                last = self._decode(self.plan.sections[self.done - 1])
            self.assembler.restore(last, self.done)
            writer.write_snapshot()  # a branch's video exists at once, holding the sections it shares
        self._open_checkpoints()
        self.c.transformer.step_cache = self.cache
        self.started = True

    def _open_checkpoints(self) -> None:
        """The video's section checkpoints (framepack.checkpoints): new, or the saved job's continued."""
        if self.keep is None:
            return
        folder, request = sections_dir(self.video_path), self.request.to_json_dict()
        if self.saved is not None:
            try:
                store = SectionStore.open(folder)
                if store.index["request"] == request and self.done in store.kept:
                    store.truncate(self.done)  # one more may have been written just before a crash
                    store.update(keep=self.keep.last)
                    self.store = store
            except ValueError:
                pass  # none or unusable: start one from here
        if self.store is None:
            header = {"request": request, "model": self.pipe.spec.name, "schedule": self.schedule.name,
                      "window": self.schedule.window, "sections": len(self.plan.sections),
                      "encode_seed": self.encode_seed, "branch": self.branch,
                      "cwd": os.getcwd()}  # where relative input paths were read from  # fmt: skip
            self.store = SectionStore.create(folder, header, self.keep, history=self.history, rng=self.rng,
                                             writer=self.writer.state(), at=self.done)  # fmt: skip
        if self.writer.path.is_file():
            self.store.set_video(self.writer.path, self.writer.layout())

    def pending(self) -> list[Section]:
        return self.plan.sections[self.done :]

    def section(self, section: Section) -> None:
        """Sample one section, add it to the history, decode its new frames into the MP4, save state."""
        ts = time.perf_counter()
        count = len(self.plan.sections)
        reseed = (self.branch or {}).get("reseed") or {}
        if str(self.done) in reseed:  # a branch with a new seed: its noise restarts at the branch point
            self.rng.manual_seed(reseed[str(self.done)])
        generated = self._denoise(section, self.writer.num_frames)
        self.history = self.schedule.append(self.history, section, generated)
        td = time.perf_counter()
        self.emit(StageStarted("decoding", section.index, count))
        with self.memory.use("vae"):
            decoded = self._decode(section)
        self.assembler.add(decoded)
        self.done += 1
        if self.store is not None:  # before the resume state: a resume truncates the checkpoints to it
            self.store.add(self.done, generated, self.rng, self.writer.state(), self.video_path, self.writer.layout())
        if self.state_dir is not None:
            jobstate.save(self.state_dir, request=self.request.to_json_dict(), model=self.pipe.spec.name,
                          sections_done=self.done, video=self.video_path, writer=self.writer.state(),
                          history=self.history, rng=self.rng, encode_seed=self.encode_seed, branch=self.branch,
                          replaces=self.out.replaces)  # fmt: skip
        release_host_memory()  # the decode's temporaries: keep RSS flat from section to section
        self.timings["sections"].append(
            {"sample_s": round(td - ts, 3), "decode_write_s": round(time.perf_counter() - td, 3)}
        )
        frames = self.writer.num_frames
        self.emit(SectionDone(section.index, count, self.video_path, frames, frames / FPS))
        if self.cancel.paused and self.done < count:  # stop at this boundary: nothing of the next is started
            raise GenerationCancelled("paused")

    def _denoise(self, section: Section, frames_done: int) -> torch.Tensor:
        """The section's latents: its packed context and prompt, fresh noise, the sampler (+ step cache)."""
        self.cancel.check()
        cond = self.cond
        context = self.schedule.context(self.history, section, cond.anchors.get(section.video_index))
        prompt = self.plan.prompts[section.video_index]
        velocity = self._velocity(cond.conds[(prompt.prompt, prompt.blend_from)], cond.uncond, context)
        noise = self._noise(cond.start.shape, self.rng, self.schedule.section_latents)
        where = _Where(section.index, len(self.plan.sections), frames_done)
        with self.memory.use("transformer"):
            return self._sample(velocity, noise, where, self.cache)

    def _decode(self, section: Section) -> torch.Tensor:
        latents = self.schedule.to_decode(self.history, section)
        return vae.decode(self.c.vae, latents, tiling=self.memory.tiled_decode)

    def _noise(self, start_shape: tuple, rng: torch.Generator, frames: int) -> torch.Tensor:
        b, c, _, h, w = start_shape
        return torch.randn((b, c, frames, h, w), generator=rng).to(self.device)

    def _velocity(self, cond: dict, uncond: dict, context) -> Callable:
        """velocity(x, timestep, pass_name): the transformer on the section's context and the pass's inputs."""
        transformer = self.c.transformer
        dev, dt = self.device, transformer.dtype
        ctx = {k: v.to(dev, dt) if v.is_floating_point() else v.to(dev) for k, v in context.as_kwargs().items()}
        passes = {"cond": cond, "uncond": uncond}
        if self.cfg_parallel:  # both passes in one batched call, one sample per half of the ranks
            return _PairedVelocity(transformer, cond, uncond, ctx)

        def velocity(x, t, pass_name):
            return transformer(hidden_states=x, timestep=t, **passes[pass_name], **ctx).sample

        return velocity

    @property
    def cfg_parallel(self) -> bool:
        """Real CFG on several ranks that can split in two (framepack.parallel) and no step cache, whose
        per-pass decisions need the passes one after the other."""
        parallel = self.c.transformer.parallel
        return parallel is not None and parallel.can_split_cfg and self.request.cfg != 1 and self.cache is None

    def _parallel_info(self) -> dict | None:
        parallel = self.c.transformer.parallel
        if parallel is None:
            return None
        note = None
        if parallel.can_split_cfg and self.request.cfg != 1 and self.cache is not None:
            note = "CFG parallel needs the step cache off (--cache none): the passes ran one after the other"
        return {"ranks": parallel.world, "cfg_parallel": self.cfg_parallel, "note": note}

    def _sample(self, velocity: Callable, noise: torch.Tensor, where: _Where, cache: StepCache | None):
        r = self.request
        _, _, t, h, w = noise.shape
        sigmas = sampling.flow_sigmas(r.steps, seq_len=t * h * w // 4, shift=r.shift)
        if cache is not None:
            cache.reset(r.steps)
        model = sampling.guided_model(velocity, cfg=r.cfg, rescale=r.cfg_rescale, model_dtype=self.c.transformer.dtype,
                                      on_pass=cache.select if cache is not None else None)  # fmt: skip

        def progress(info: sampling.StepInfo) -> None:
            self.emit(StepProgress(where.section, where.sections, info.step + 1, info.total, where.frames_done,
                                   vae.preview(info.denoised)))  # fmt: skip

        self.emit(StageStarted("sampling", where.section, where.sections))
        return sampling.SAMPLERS[r.sampler](model, noise, sigmas, callback=progress, check_cancel=self.cancel.check)

    # ---------------------------------------------------------------------------- ending
    def stop(self, status: str, error: BaseException | None = None) -> None:
        self.status, self.error = status, error

    def release(self) -> None:
        """Detach the step cache and give the job's device memory back (always, whatever happened)."""
        self.c.transformer.step_cache = None
        self.c.transformer.clear_section_cache()
        self.memory.close()

    def close(self) -> GenerationResult:
        """Write the MP4 (finished, or the finished sections) and the sidecar; report the outcome."""
        video, meta_path = self._close_video(), self.out.metadata
        frames = self.writer.num_frames if video else 0
        if video is None and self.status == "finished":
            self.status = "failed"
        if video is None and self.done and self.writer.path.is_file():  # finishing failed (a full disk, say):
            video = self.writer.path  # the last snapshot stays playable, and the sidecar describes it
            frames = probe(video)["frames"]
        elif video is not None and self.status == "finished":
            video, meta_path = self.out.commit()  # replacing an older video: only now that this one is complete
        if self.store is not None:
            self._close_checkpoints(video)
        release_host_memory()
        self.timings["total_s"] = round(time.perf_counter() - self.t0, 3)
        peak_vram, peak_rss = peaks(self.device)
        (height, width), request = self.plan.inputs.size, self.request
        result = GenerationResult(self.status, video, meta_path, frames, frames / FPS, width, height, self.done,
                                  len(self.plan.sections), request.seed, self.timings, peak_vram,
                                  peak_rss)  # fmt: skip
        error = None
        if self.status == "failed":
            error = f"{type(self.error).__name__}: {self.error}" if self.error else "the video could not be written"
        if self.loras:  # the sidecar's request names each file by its resolved path and sha256
            request = dataclasses.replace(request, loras=tuple(lo.ref for lo in self.loras))
        write_metadata(result, RunInfo(
            request, self.pipe.spec, self.device, self.c.transformer.dtype,
            self.writer.effective_crf if self.writer else None, self.cache.report() if self.cache else None,
            self.memory.describe(), error, self.lora_reports,
            {**self.c.speed(), **({"parallel": p} if (p := self._parallel_info()) else {})}, self.branch,
            self._checkpoint_info(),
        ))  # fmt: skip
        if self.status == "finished":
            self.emit(Finished(result))
        elif self.status == "cancelled":
            self.emit(Cancelled(result))
        else:
            self.emit(Failed(error))
            raise GenerationFailed(f"generation failed: {error} (partial results: {meta_path})",
                                   result) from self.error  # fmt: skip
        return result

    def _close_checkpoints(self, video: Path | None) -> None:
        """Point the checkpoints at the video as it was left (joined, committed or a snapshot); without
        a video they describe nothing and go."""
        if video is None or not video.is_file():
            shutil.rmtree(self.store.folder, ignore_errors=True)
            self.store = None
            return
        self.store.folder = sections_dir(video)  # moved with it when it replaced an older video
        self.store.set_video(video, self.writer.layout())

    def _checkpoint_info(self) -> dict | None:
        if self.store is None:
            return None
        kept = self.store.kept
        return {"folder": self.store.folder.name, "keep": self.keep.describe(), "kept": [kept.start, kept.stop - 1],
                "bytes": self.store.bytes()}  # fmt: skip

    def _close_video(self) -> Path | None:
        """Finished: the final MP4 (state removed). Stopped early: a playable MP4 of the finished sections;
        a resumable job keeps its last snapshot and segments for a resume instead."""
        writer = self.writer
        if writer is None:
            return None
        try:
            if self.status == "finished":
                video = self.assembler.finish() if self.done else None
                if self.state_dir is not None:
                    shutil.rmtree(self.state_dir, ignore_errors=True)
                return video
            if not self.done:
                writer.abort()
                return None
            if self.state_dir is not None:
                writer.keep_segments()  # the snapshot written after the last section stays playable
                return writer.path
            return self.assembler.finish(complete=False)
        except Exception as err:  # e.g. a full disk while the finished file is joined
            if self.state_dir is not None and self.done:
                writer.keep_segments()  # the saved state and the segments let a resume finish it later
            else:
                writer.abort()
            if self.error is None:
                self.error = err
            return None


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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


class _PairedVelocity:
    """velocity(x, timestep, pass_name) for CFG parallel: the "cond" call runs both passes as one batch
    of 2 (cond, uncond) split over two rank groups; the "uncond" call that follows returns the second
    sample. The batched inputs are made once per section, so the transformer's section cache holds."""

    def __init__(self, transformer, cond: dict, uncond: dict, ctx: dict) -> None:
        self.transformer, self.ctx = transformer, ctx
        self.both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        self._pending: tuple | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, pass_name: str) -> torch.Tensor:
        if pass_name == "uncond":
            key, out = self._pending
            if key != (id(x), t.data_ptr()):
                raise RuntimeError("CFG parallel: the uncond pass came without its cond pass")
            self._pending = None
            return out
        with self.transformer.parallel.cfg_split():
            out = self.transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]), **self.both,
                                   **self.ctx).sample  # fmt: skip
        self._pending = ((id(x), t.data_ptr()), out[1:])
        return out[:1]


@dataclass(frozen=True)
class PipelineLoader:
    """`load_pipeline` with its settings bound: `loader(model)` loads one model. Plain data, so it can be
    sent to other processes (the job queue's Ray workers load their pipelines with it)."""

    device: str | None = None
    models_dir: str | None = None
    download: bool = True
    options: RuntimeOptions | None = None
    announce: bool = False  # say "loading model ..." on stderr first (the servers do)

    def __call__(self, model: str) -> Pipeline:
        if self.announce:
            print(f"loading model {model!r} ...", file=sys.stderr, flush=True)
        return load_pipeline(model, device=self.device, models_dir=self.models_dir, download=self.download,
                             options=self.options)  # fmt: skip
