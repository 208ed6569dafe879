"""One-frame inference: image editing with the original FramePack model ("1f", kisekaeichi, multi-control).

The model is asked for one latent frame "some time later" than its clean context: the start image
(and optional reference images) at chosen RoPE time indices, the target frame at another
(`sections.FrameLayout`, `config.EDIT_PRESETS`). No new weights: only a different packing.

    check_edit(request, spec)    the start image, reference images and masks (cropped to the start image's
                                 bucket, masks at latent size), the layout -> a JobPlan whose schedule is a
                                 OneFrameSchedule; every problem is a RequestError before any model runs
    EditRun(pipeline, plan)      a JobRun (same prompts, SigLIP, LoRAs, memory plan, step cache, sampler)
                                 that encodes the controls, multiplies each by its mask, denoises the one
                                 target frame and writes OUT.png (the request in a PNG text chunk) + OUT.json

`framepack edit --from OUT.png` (or OUT.json) re-runs an edit exactly: same seed, same image.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from framepack import vae
from framepack.config import EditRequest, RequestError, request_from_json
from framepack.controls import SectionPrompt, parse_prompts
from framepack.events import Cancelled, Finished, StageStarted
from framepack.images import image_alpha, load_image, load_mask, prepare_image, resize_and_center_crop
from framepack.inputs import JobInputs
from framepack.memory import peaks, release_host_memory
from framepack.outputs import OutputPaths, RunInfo, check_output, run_metadata, write_atomically, write_json
from framepack.pipeline import JobPlan, JobRun, _seeded
from framepack.sections import OneFrameSchedule, Section
from framepack.video import to_uint8_frames

PNG_KEY = "framepack"  # the PNG text chunk holding {"framepack_version", "model", "request"}
LATENT_SCALE = 8  # VAE: pixels per latent on each side


@dataclass
class EditInputs(JobInputs):
    """A frame edit's pixels: the start image (control 1), the reference images (controls 2..) cropped
    to its bucket, and one mask per control at latent size (float32 in [0, 1]; None: keep everything)."""

    controls: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray | None] = field(default_factory=list)


@dataclass(frozen=True)
class EditResult:
    status: str  # "finished" | "cancelled"
    image: Path | None  # the edited frame (PNG)
    metadata: Path | None  # its sidecar
    width: int
    height: int
    seed: int
    timings: dict
    controls: tuple[Path, ...] = ()  # the control images as the model saw them (save_controls)
    notes: tuple[str, ...] = ()
    peak_vram_bytes: int | None = None
    peak_rss_bytes: int | None = None

    def summary(self) -> dict:
        """What a job record keeps of the result."""
        return {"kind": "edit", "image": self.image.name if self.image else None, "width": self.width,
                "height": self.height, "seed": self.seed, "controls": [p.name for p in self.controls],
                "notes": list(self.notes), "peak_vram_bytes": self.peak_vram_bytes,
                "peak_rss_bytes": self.peak_rss_bytes, "total_s": self.timings.get("total_s")}  # fmt: skip


# ------------------------------------------------------------------------------------------ checks
def check_edit(request: EditRequest, spec, image: np.ndarray | None = None) -> JobPlan:
    """Validate an edit against a model and load its pixels (see the module docstring)."""
    if not isinstance(request, EditRequest):
        raise RequestError("a frame edit needs an EditRequest")
    request.validate()
    if spec.schedule != "inverted":
        raise RequestError(f"frame edits need the original (inverted) model; {spec.name!r} is trained forward (F1) "
                           "and gives nothing useful here: use --model original (or toy / tiny)")  # fmt: skip
    prompts = parse_prompts(request.prompt)
    if len(prompts) > 1:
        raise RequestError("a frame edit takes one prompt; timestamped prompts are a video control")
    layout = request.layout()
    notes = list(layout.problems(request.window)[1])
    source = image if image is not None else request.image
    picture = load_image(source)  # decoded once: its size is the mask's reference
    start, size = prepare_image(picture, request.resolution or spec.default_resolution)
    controls, masks = [], []
    mask_sources = [(request.image_mask, source, picture.shape[:2])]
    for c in request.controls:
        picture = load_image(c.image)
        controls.append(resize_and_center_crop(picture, *size))
        mask_sources.append((c.mask, c.image, picture.shape[:2]))
    for n, (mask, picture, shape) in enumerate(mask_sources, 1):
        masks.append(_latent_mask(n, mask, picture, shape, size, notes))
    inputs = EditInputs(start, size, None, [], None, None, controls=controls, masks=masks)
    schedule = OneFrameSchedule(request.window, layout)
    return JobPlan(request, inputs, schedule.sections(1), schedule, [SectionPrompt(prompts[0][1])],
                   [(0.0, prompts[0][1])], [], tuple(notes))  # fmt: skip


def _latent_mask(n: int, mask: str | None, picture, shape: tuple[int, int], size: tuple[int, int],
                 notes: list[str]) -> np.ndarray | None:  # fmt: skip
    """Control n's mask (a file, else the picture's alpha channel, else none) cropped like its image to
    the bucket `size` and averaged down to latent size: (h, w) float32 in [0, 1]."""
    what = "the start image" if n == 1 else f"control {n}"
    if mask is not None:
        pixels = load_mask(mask)
        if pixels.shape != tuple(shape):
            notes.append(f"the mask of {what} is {pixels.shape[1]}x{pixels.shape[0]}, its image "
                         f"{shape[1]}x{shape[0]}: resized to the image")  # fmt: skip
            pixels = np.array(Image.fromarray(pixels).resize((shape[1], shape[0]), Image.Resampling.BILINEAR))
    elif (alpha := image_alpha(picture)) is not None:  # a file or an RGBA array
        pixels = alpha
        notes.append(f"{what} has transparency: its alpha channel is its mask")
    else:
        return None
    cropped = resize_and_center_crop(np.repeat(pixels[..., None], 3, axis=2), *size)[..., 0]
    h, w = size[0] // LATENT_SCALE, size[1] // LATENT_SCALE
    small = np.asarray(Image.fromarray(cropped).resize((w, h), Image.Resampling.BOX), np.float32) / 255
    if not small.any():
        raise RequestError(f"the mask of {what} ({mask or 'its alpha channel'}) is all black: it would hide the "
                           "whole image. White (255) marks what to keep, black (0) what to ignore")  # fmt: skip
    return small


# ------------------------------------------------------------------------------------------ the run
class EditRun(JobRun):
    """One frame edit on a Pipeline: conditioning and sampling as a video job's one section, with the
    control latents as context and a PNG instead of an MP4. Nothing is written before the image exists
    (an error is raised as it is; a cancel leaves no files)."""

    def _output_paths(self) -> OutputPaths:
        return check_output(self.request, ".png")

    def _context_latents(self, start: torch.Tensor) -> torch.Tensor:
        """The control latents (1, C, controls, h, w): the start latent and each reference (seeded), each
        times its mask at latent size."""
        inputs, seed = self.plan.inputs, self.request.seed
        latents = [start] + [vae.encode(self.c.vae, picture, _seeded(seed + n))
                             for n, picture in enumerate(inputs.controls, 1)]  # fmt: skip
        for i, mask in enumerate(inputs.masks):
            if mask is not None:  # (h, w) at latent size, on every channel
                latents[i] = latents[i] * torch.from_numpy(mask)[None, None, None]
        return torch.cat(latents, dim=2)

    def open_output(self) -> None:
        self.history = self.schedule.start(self.cond.start, self.cond.prefix)
        self.c.transformer.step_cache = self.cache
        self.image: np.ndarray | None = None  # the edited frame (H, W, 3), once decoded
        self.control_images: list[np.ndarray] | None = None  # save_controls: each control as the model saw it

    def section(self, section: Section) -> None:
        ts = time.perf_counter()
        self.history = self.schedule.append(self.history, section, self._denoise(section, 0))
        td = time.perf_counter()
        self.emit(StageStarted("decoding", section.index, 1))
        with self.memory.use("vae"):
            self.image = to_uint8_frames(self._decode(section))[0]  # (H, W, 3)
            if self.request.save_controls:  # what the model was given: each masked control, decoded
                controls = self.history.latents[:, :, : len(self.schedule.layout.controls)]
                self.control_images = [to_uint8_frames(vae.decode(self.c.vae, controls[:, :, i : i + 1]))[0]
                                       for i in range(controls.shape[2])]  # fmt: skip
        self.done = 1
        self.timings["sections"].append({"sample_s": round(td - ts, 3), "decode_s": round(time.perf_counter() - td, 3)})

    def close(self) -> EditResult:
        (height, width), request = self.plan.inputs.size, self.request
        image = meta_path = None
        controls: list[Path] = []
        if self.status == "finished" and self.image is not None:
            self.emit(StageStarted("writing"))
            run = self._run_info()
            _write_png(self.out.video, self.image, run)  # a partial name when it replaces an older edit
            image, meta_path = self.out.commit()
            for i, px in enumerate(self.control_images or [], 1):
                controls.append(image.with_name(f"{image.stem}.control-{i}.png"))
                Image.fromarray(px).save(controls[-1])
        else:
            self.status = "cancelled"
        release_host_memory()
        self.timings["total_s"] = round(time.perf_counter() - self.t0, 3)
        peak_vram, peak_rss = peaks(self.device)
        result = EditResult(self.status, image, meta_path, width, height, request.seed, self.timings,
                            tuple(controls), self.plan.notes, peak_vram, peak_rss)  # fmt: skip
        if image is not None:
            meta = run_metadata(result.status, run)
            meta["model"]["schedule"] = self.schedule.name
            meta.update({"image": image.name, "width": width, "height": height, "seed": request.seed,
                         "layout": self.schedule.layout.positions(self.schedule.window), "notes": list(result.notes),
                         "controls": [p.name for p in controls], "peak_vram_bytes": peak_vram,
                         "peak_rss_bytes": peak_rss, "timings": result.timings})  # fmt: skip
            write_json(meta_path, meta)
            self.emit(Finished(result))
        else:
            self.emit(Cancelled(result))
        return result

    def _run_info(self) -> RunInfo:
        request = self.request
        if self.loras:  # the sidecar's request names each file by its resolved path and sha256
            import dataclasses

            request = dataclasses.replace(request, loras=tuple(lo.ref for lo in self.loras))
        return RunInfo(request, self.pipe.spec, self.device, self.c.transformer.dtype, None,
                       self.cache.report() if self.cache else None, self.memory.describe(), None,
                       self.lora_reports, self.c.speed())  # fmt: skip


def _write_png(path: Path, pixels: np.ndarray, run: RunInfo) -> None:
    """The edited frame with its request in a text chunk, written whole or not at all."""
    import framepack

    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps({"framepack_version": framepack.__version__, "model": run.spec.name,
                                       "request": run.request.to_json_dict()}))  # fmt: skip
    write_atomically(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info))


def read_settings(path: str | os.PathLike) -> tuple[dict, str | None]:
    """(the request dict, the model name) stored in a result: a sidecar .json or an edited .png."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".png":
            with Image.open(path) as im:
                text = im.text.get(PNG_KEY) if hasattr(im, "text") else None
            if text is None:
                raise RequestError(f"{path} carries no FramePack settings (no '{PNG_KEY}' text chunk)")
            stored = json.loads(text)
            model = stored.get("model")
        else:
            stored = json.loads(path.read_text(encoding="utf-8"))
            model = (stored.get("model") or {}).get("name") if isinstance(stored, dict) else None
    except OSError as err:
        raise RequestError(f"cannot read {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(f"{path} is not a FramePack result (a .json sidecar or an edited .png): {err}") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("request"), dict):
        raise RequestError(f"{path} is not a FramePack result (no 'request' entry)")
    return stored["request"], model


def load_edit_request(d: dict) -> EditRequest:
    """A stored request that must be an edit; a video's gets a clear error."""
    request = request_from_json(d)
    if not isinstance(request, EditRequest):
        raise RequestError("these settings are a video's: re-run them with `framepack generate --from`")
    return request
