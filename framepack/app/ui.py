"""Desktop UI (Gradio): the official FramePack page (spec §7) over the job queue, plus a queue panel,
a history and model / resolution choice.

Thin: every action is one `framepack.jobs.JobQueue` call in-process, and the page follows jobs with
two timers (the watched job every 0.5 s, queue and history every 2 s) that send only what changed.
So a job keeps running when its tab closes, "Start Generation" while a job runs queues another one
(the official page refuses), and several tabs see the same queue.

Parity with the official page: image upload, prompt, quick prompts, Start/End, every control with
the official default and range (the hidden ones are under "Advanced"), "Next Latents" preview,
the growing "Finished Frames" video, the progress text and bar. Deviations: MP4 Compression is
0..51 (x264's range; the official slider allows 0..100, which fails above 51), and GPU preserved
memory has an "automatic" switch, on by default (the engine's own planner; off = the official 6 GB).
"Use TeaCache" is a step cache selector (TeaCache / MagCache / none, `CACHE_LABELS`) with the selected
cache's threshold beside it; MagCache's K and retention are under "Advanced" (`cache_settings`).

`CONTROLS` is the one list of generation controls: a new GenerationRequest field gets a widget by
adding one `Control` there; settings load into it and are submitted from it by field name. The LoRA
picker (`LORA_ROWS` rows of file + weight over the queue's LoRA folder, include/exclude, rescan) sets
`loras`, `lora_include` and `lora_exclude` (`collect_loras`, `lora_settings`). A finished job's
progress text and History entry say what its step cache computed and skipped (`cache_summary`).
`mount(app, queue)` puts the page at / of a FastAPI app (the HTTP API's, so one server has both).

Branching (`JobQueue.branch`, `framepack.branching`): under the History tab's picked video job, a strip
of its finished sections (generation order; each thumbnail its first and last frame, "section k · frames
a–b"), refreshed by the slow tick as sections finish (`_strip`), with the schedule's line under it
(`SCHEDULE_NOTES`: the original model makes the video back to front, so its section 1 is the end). A
click selects a section (`section_summary`); "Re-roll from here" branches before it with a new seed,
"Change prompt from here" with the typed prompt, "Continue" at "last" with more seconds; the Video tab
follows the branch (`branch_status`). "Pause" beside "End Generation" (and in the queue panel) stops
the running video after its section. The History's "from" column and a job's details say where a job
comes from (`lineage`: "branch of <parent> @K (changed fields)", "re-run of <parent>").

The "Frame edit" tab (beside "Video") submits frame edits (`config.EditRequest`, one image with the
original model) to the same queue: a start image and up to `EDIT_REFERENCES` reference images, each
with an optional mask, a preset (`EDIT_PRESETS`: choosing one sets the target index, the no-2x / 4x /
post switches and the reference indices, `preset_values`), prompt, seed and steps; its gallery shows the
finished edits, newest first (`edit_gallery`). A mask is either painted on the image (gr.ImageEditor:
the brush marks what to keep; `editor_picture`) or uploaded as a file (white = keep), not both. The
editor flattens a picture's transparency onto white, so here (unlike `framepack edit` and the API) an
alpha channel is not a mask: paint or upload one. `edit_submission` turns the tab's values into the
queue's (image, params, uploads).
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from framepack.app.progress import describe_progress, stage_label
from framepack.config import EDIT_FIELDS, EDIT_PRESETS, REQUEST_FIELDS, EditRequest, GenerationRequest, LoraRef
from framepack.jobs import INPUT, SERVER_FIELDS, TERMINAL, Job, JobError, JobQueue, upload_fields
from framepack.models.caches import MagCache
from framepack.sections import FPS, SCHEDULES

QUICK_PROMPTS = (
    "The girl dances gracefully, with clear movements, full of charm.",
    "A character doing some simple body movements.",
)
_DEFAULT = object()  # "the GenerationRequest default"
_AUTO_RES = "auto"
LORA_ROWS = 4  # LoRA picker rows (file + weight)
LORA_NONE = "none"
LORA_WEIGHT = (-2.0, 2.0, 0.05)  # the picker's weight slider (min, max, step); the engine accepts LORA_WEIGHT_RANGE
LORA_FIELDS = ("loras", "lora_include", "lora_exclude")  # set by the LoRA picker, not by CONTROLS
CACHE_LABELS = {"teacache": "TeaCache", "magcache": "MagCache", "none": "none"}  # config.CACHE_NAMES, as shown
# The threshold slider's value when a cache is chosen (what `cache_threshold: None` means to the engine).
CACHE_THRESHOLDS = {"teacache": GenerationRequest.teacache_threshold, "magcache": MagCache.threshold}
CACHE_FIELDS = ("teacache", "teacache_threshold")  # represented by the cache selector and threshold slider
EDIT_REFERENCES = 2  # reference image rows on the Frame edit tab (the queue takes up to jobs.EDIT_REFERENCES)
EDIT_GALLERY = 60  # finished edits shown in the tab's gallery

CSS = """
.no-generating-animation > .generating { display: none !important; }
.no-generating-animation [data-testid="status-tracker"] { display: none !important; }
.fp-progress { display: flex; align-items: center; gap: 12px; }
.fp-progress progress { flex: 1; height: 16px; }
.fp-progress span { white-space: nowrap; }
#fp-sections .thumbnail-item.selected:not(:hover) {
    --ring-color: transparent; border-color: var(--border-color-primary);
}
"""
SELECTED_MARK = "▶ "  # the section strip's selected caption (the gallery's own highlight, kept across jobs, is hidden)


@dataclasses.dataclass(frozen=True)
class Control:
    """One widget bound to a GenerationRequest field (or, with `option`, a per-job runtime option).

    A request field's slider range and step and a dropdown's choices come from its entry in
    `framepack.config.REQUEST_FIELDS` (the one source the CLI and the API schema use too); only the
    wording (label, info) and the placement are the page's own. `slider` is for option widgets."""

    field: str
    label: str
    kind: str  # "slider" | "number" | "checkbox" | "text" | "dropdown" | "radio"
    info: str | None = None
    advanced: bool = False  # hidden on the official page: under "Advanced"
    default: Any = _DEFAULT
    option: bool = False  # a job option (JobQueue.submit options), not a request field
    slider: tuple[float, float, float] | None = None  # (min, max, step) of an option's slider
    labels: tuple[tuple[str, str], ...] = ()  # (choice, shown label) where a choice is shown otherwise

    @property
    def _range(self) -> tuple[float | None, float | None, float | None]:
        if self.slider is not None:
            return self.slider
        info = REQUEST_FIELDS.get(self.field)
        return info.slider if info is not None and info.slider and self.kind == "slider" else (None, None, None)

    @property
    def minimum(self) -> float | None:
        return self._range[0]

    @property
    def maximum(self) -> float | None:
        return self._range[1]

    @property
    def step(self) -> float | None:
        return self._range[2]

    @property
    def choices(self) -> tuple | None:
        info = REQUEST_FIELDS.get(self.field)
        return info.choices if info is not None else None

    def shown_choices(self) -> list[tuple[str, str]]:
        """(label, value) per choice, as Gradio takes them."""
        names = dict(self.labels)
        return [(names.get(c, c), c) for c in self.choices or ()]

    def initial(self) -> Any:
        if self.default is not _DEFAULT:
            return self.default
        return {f.name: f.default for f in dataclasses.fields(GenerationRequest)}[self.field]

    def build(self) -> gr.components.Component:
        kw: dict[str, Any] = {"label": self.label, "value": self.initial(), "elem_id": f"fp-{self.field}"}
        if self.info:
            kw["info"] = self.info
        if self.kind == "slider":
            return gr.Slider(self.minimum, self.maximum, step=self.step, **kw)
        if self.kind == "number":
            return gr.Number(precision=0, **kw)
        if self.kind == "checkbox":
            return gr.Checkbox(**kw)
        if self.kind == "text":
            return gr.Textbox(**kw)
        if self.kind == "dropdown":
            return gr.Dropdown(choices=self.shown_choices(), **kw)
        if self.kind == "radio":
            return gr.Radio(choices=self.shown_choices(), **kw)
        raise ValueError(f"unknown control kind {self.kind!r}")


# The official controls (spec §7 table, same order), then ours. Add new request fields here; their
# ranges and choices are in framepack.config.REQUEST_FIELDS.
CONTROLS: tuple[Control, ...] = (
    Control("cache", "Step cache", "radio", labels=tuple(CACHE_LABELS.items()),
            info="Faster speed, but often makes hands and fingers slightly worse. (The official 'Use TeaCache'.)"),
    Control("cache_threshold", "Step cache threshold", "slider", default=CACHE_THRESHOLDS["teacache"],
            info="Higher skips more steps (faster, further from the uncached result). Default: TeaCache 0.15 "
                 "(about 2.1x faster; 0.1: about 1.6x), MagCache 0.10."),
    Control("negative_prompt", "Negative Prompt", "text", advanced=True),
    Control("seed", "Seed", "number"),
    Control("seconds", "Total Video Length (Seconds)", "slider"),
    Control("window", "Latent Window Size", "slider", advanced=True),
    Control("steps", "Steps", "slider", info="Changing this value is not recommended."),
    Control("cfg", "CFG Scale", "slider", advanced=True),
    Control("distilled_guidance", "Distilled CFG Scale", "slider"),
    Control("cfg_rescale", "CFG Re-Scale", "slider", advanced=True),
    Control("preserved_memory_auto", "Automatic GPU preserved memory (recommended)", "checkbox", default=True,
            option=True, info="Off: keep the amount below free, as the official page does."),
    Control("preserved_memory_gb", "GPU Inference Preserved Memory (GB) (larger means slower)", "slider",
            default=6.0, option=True, slider=(6, 128, 0.1)),
    Control("crf", "MP4 Compression", "slider",
            info="Lower means better quality. 0 is uncompressed. Change to 16 if you get black outputs."),
    Control("sampler", "Sampler", "dropdown", advanced=True),
    Control("magcache_k", "MagCache K: most consecutive steps skipped", "slider", advanced=True),
    Control("magcache_retention", "MagCache retention: the first share of the steps always computes", "slider",
            advanced=True),
    Control("prompt_blend", "Blend timestamped prompts ('[0s: ...] [2.5s: ...]') over a section", "checkbox",
            advanced=True),
    Control("end_strength", "End frame strength", "slider", advanced=True),
    Control("end_embedding_weight", "End frame share of the image embedding", "slider", advanced=True),
)  # fmt: skip


def _present(controls: tuple[Control, ...]) -> tuple[Control, ...]:
    """The controls whose request field exists in this version (the list may run ahead of the engine)."""
    names = {f.name for f in dataclasses.fields(GenerationRequest)}
    return tuple(c for c in controls if c.option or c.field in names)


# ------------------------------------------------------------------------------------- pure helpers
def collect(controls: tuple[Control, ...], values: list[Any], base: dict | None = None) -> tuple[dict, dict]:
    """Widget values -> (request params, job options). `base`: params of a loaded job, kept for the
    fields without a widget."""
    params = {k: v for k, v in (base or {}).items() if k not in SERVER_FIELDS}
    raw = {c.field: v for c, v in zip(controls, values)}
    for c in controls:
        if c.option:
            continue
        value = raw[c.field]
        if c.kind == "number" or (c.kind == "slider" and float(c.step or 1).is_integer()):
            value = round(float(value))  # sliders send floats; integer fields must stay integers
        elif c.kind == "slider":
            value = float(value)
        params[c.field] = value
    if "cache" in raw:  # the selector replaces the official "Use TeaCache" switch: keep the two in agreement
        params["teacache"] = raw["cache"] != "none"
    options = {}
    if "preserved_memory_auto" in raw and not raw["preserved_memory_auto"]:
        options["preserved_memory_gb"] = float(raw["preserved_memory_gb"])
    return params, options


def settings_of(job: Job, controls: tuple[Control, ...]) -> tuple[list[Any], dict]:
    """A job's stored settings -> (widget values in `controls` order, the params without a widget)."""
    params = job.params()
    choice, threshold = cache_settings(params)
    values = []
    for c in controls:
        if c.field == "cache":
            values.append(choice)
        elif c.field == "cache_threshold":
            values.append(threshold)
        elif c.field == "preserved_memory_auto":
            values.append("preserved_memory_gb" not in job.options)
        elif c.field == "preserved_memory_gb":
            values.append(job.options.get("preserved_memory_gb", c.initial()))
        else:
            values.append(params.get(c.field, c.initial()))
    picked = {c.field for c in controls} | {"prompt", "resolution", *LORA_FIELDS}
    if "cache" in picked:
        picked |= set(CACHE_FIELDS)
    rest = {k: v for k, v in params.items() if k not in picked}
    return values, rest


def cache_settings(params: dict) -> tuple[str, float]:
    """A job's request -> (the cache selector's value, the threshold slider's). `teacache: false` is no
    step cache whatever `cache` says (the official switch; records from before `cache` have only it);
    a record without `cache` is TeaCache; no `cache_threshold`: the chosen cache's default, which for
    TeaCache is the request's `teacache_threshold`."""
    choice = "none" if params.get("teacache") is False else params.get("cache") or "teacache"
    if choice not in CACHE_LABELS:  # a damaged record or a cache this version does not know
        choice = "teacache"
    threshold = params.get("cache_threshold")
    if threshold is None:
        magcache = choice == "magcache"
        threshold = CACHE_THRESHOLDS["magcache"] if magcache else params.get("teacache_threshold")
        threshold = CACHE_THRESHOLDS["teacache"] if threshold is None else threshold
    return choice, threshold


def switched_threshold(choice: str, value: float | None) -> float | None:
    """The threshold slider after the user picks `choice`: the new cache's default while the slider
    still shows a cache's default (the user has not moved it), else the user's value."""
    untouched = value is None or any(abs(float(value) - d) < 1e-9 for d in CACHE_THRESHOLDS.values())
    return CACHE_THRESHOLDS[choice] if choice in CACHE_THRESHOLDS and untouched else value


def cache_summary(sidecar: dict | None) -> str | None:
    """A job's step cache result (its sidecar's `step_cache`) in a line, or None (no cache ran)."""
    cache = (sidecar or {}).get("step_cache")
    if not isinstance(cache, dict) or not cache.get("name"):
        return None
    name = CACHE_LABELS.get(cache["name"], cache["name"])
    settings = [f"threshold {cache.get('threshold')}"]
    if cache["name"] == "magcache":
        settings += [f"K {cache.get('k')}", f"retention {cache.get('retention')}"]
    calls, computed = cache.get("calls") or 0, cache.get("computed") or 0
    line = (f"Step cache {name} ({', '.join(settings)}): {computed}/{calls} forward calls computed, "
            f"{calls - computed} skipped")  # fmt: skip
    sections = [s for s in cache.get("sections") or () if isinstance(s, dict)]
    if sections:
        line += "; per section computed+skipped: " + ", ".join(f"{s.get('computed')}+{s.get('skipped')}"
                                                                for s in sections)  # fmt: skip
    return line


def lora_choices(library: Any) -> list[str]:
    """The picker's dropdown choices: "none", then the LoRA folder's files by their name relative to it
    (the name a job's `loras` path takes; `framepack.lora.LoraLibrary.files`, read afresh)."""
    return [LORA_NONE, *(p.relative_to(library.folder).as_posix() for p in library.files())]


def collect_loras(rows: list[Any], include: str | None, exclude: str | None) -> dict:
    """The picker's values (file, weight, file, weight, ... one pair per row) and the include / exclude
    boxes -> the request's `loras` (rows left at "none" are skipped), `lora_include` and `lora_exclude`
    (blank boxes are None; with no LoRA chosen the filters have nothing to filter and are left out)."""
    loras = tuple(LoraRef(str(name), round(float(1.0 if weight is None else weight), 6))
                  for name, weight in zip(rows[0::2], rows[1::2]) if name and name != LORA_NONE)  # fmt: skip

    def pattern(text: str | None) -> str | None:
        return text if loras and isinstance(text, str) and text.strip() else None

    return {"loras": loras, "lora_include": pattern(include), "lora_exclude": pattern(exclude)}


def lora_settings(params: dict) -> tuple[list[Any], str, str, list[str]]:
    """A job's LoRA parameters -> (the picker's row values: file, weight per row, "none" rows after;
    include; exclude; the files beyond the picker's rows, which it cannot show)."""
    refs = []
    for r in params.get("loras") or ():
        try:
            refs.append(LoraRef.from_json(r))
        except ValueError:
            continue  # a damaged record: nothing to show for it
    rows: list[Any] = []
    for ref in refs[:LORA_ROWS]:
        rows += [ref.path, ref.weight]
    rows += [LORA_NONE, 1.0] * (LORA_ROWS - len(refs[:LORA_ROWS]))
    left = [ref.path for ref in refs[LORA_ROWS:]]
    return rows, params.get("lora_include") or "", params.get("lora_exclude") or "", left


def progress_texts(job: Job, loras: list[str] | None = None, cache: str | None = None) -> tuple[str, str]:
    """(description markdown, progress bar HTML) in the official wording, plus section and state.
    `loras`: the lines of the job's `loras_applied` event (what each LoRA file matched), shown under it.
    `cache`: an ended job's step cache result (`cache_summary`), shown last. A branch or re-run says
    where it comes from (`lineage`) after the first line."""
    desc, bar = _progress_texts(job)
    origin = lineage(job)
    if origin:
        desc += f"  \n{_md_escape(origin[0].upper() + origin[1:])}."
    if loras and job.state != "queued":
        desc += "".join(f"  \n{_md_escape(line)}" for line in loras)
    if cache and job.terminal:
        desc += f"  \n{_md_escape(cache)}"
    return desc, bar


def _md_escape(text: str) -> str:
    """Plain text in Markdown (file names have underscores)."""
    return "".join(f"\\{ch}" if ch in "\\`*_[]<>#|~" else ch for ch in text)


def _progress_texts(job: Job) -> tuple[str, str]:
    p = job.progress
    if job.state == "queued":
        return f"Queued: {job.position} job(s) before this one ...", _bar(0, "Waiting in the queue ...")
    if job.kind == EditRequest.kind:
        return _edit_texts(job)
    if job.state == "running":
        frames = p.get("frames") or 0
        desc = (f"Total generated frames: {frames}, Video length: {frames / FPS:.2f} seconds (FPS-30). "
                "The video is being extended now ...")  # fmt: skip
        if p.get("sections") and p.get("section") is not None:
            section = f"Section {p['section'] + 1}/{p['sections']}"
            if p.get("stage") == "sampling" and p.get("steps"):
                hint = f"{section} · Sampling {p['step']}/{p['steps']}"
                pct = int(100 * p["step"] / p["steps"])
            else:
                hint, pct = f"{section} · {stage_label(p.get('stage'))} ...", 100
            return f"{desc}  \n{hint}", _bar(pct, hint)
        hint = f"{stage_label(p.get('stage'))} ..."
        return hint, _bar(0, hint)
    r = job.result
    if job.state == "done":
        mem = _memory(r)
        return f"Finished: {r.get('frames', 0)} frames, {r.get('seconds', 0):.2f} s{mem}.", ""
    done = p.get("sections_done") or r.get("sections_done") or 0
    tail = f" {done} section(s) finished." if done else ""
    message = f"{job.state.capitalize()}.{tail}"
    if job.state == "paused":
        message += " Resume it from the History tab (or branch from its sections there)."
    if job.error and job.state != "cancelled":
        message += f" {job.error}"
    return message, ""


def _edit_texts(job: Job) -> tuple[str, str]:
    """A frame edit's progress (one frame: a step count, no sections or video length) or outcome."""
    p, r = job.progress, job.result
    if job.state == "running":
        hint = describe_progress(p) or f"{stage_label(p.get('stage'))} ..."
        pct = int(100 * p["step"] / p["steps"]) if p.get("stage") == "sampling" and p.get("steps") else 0
        return hint, _bar(pct, hint)
    if job.state == "done":
        took = f" in {r['total_s']:.1f} s" if isinstance(r.get("total_s"), (int, float)) else ""
        notes = "".join(f"  \nNote: {_md_escape(str(n))}" for n in r.get("notes") or ())
        return f"Finished: edited image {r.get('width')}x{r.get('height')}{took}{_memory(r)}.{notes}", ""
    message = f"{job.state.capitalize()}."
    if job.error and job.state != "cancelled":
        message += f" {job.error}"
    return message, ""


def _memory(r: dict) -> str:
    parts = []
    if r.get("peak_vram_bytes"):
        parts.append(f"peak VRAM {r['peak_vram_bytes'] / 2**30:.2f} GiB")
    if r.get("peak_rss_bytes"):
        parts.append(f"peak RAM {r['peak_rss_bytes'] / 2**30:.2f} GiB")
    return f" ({', '.join(parts)})" if parts else ""


def _bar(percent: int, hint: str) -> str:
    return (f'<div class="fp-progress"><progress value="{percent}" max="100"></progress>'
            f"<span>{html.escape(hint)}</span></div>")  # fmt: skip


QUEUE_HEADERS = ["job", "kind", "state", "model", "prompt", "progress"]
HISTORY_HEADERS = ["job", "kind", "state", "model", "prompt", "seconds", "seed", "steps", "frames", "size",
                   "peak VRAM GiB", "peak RAM GiB", "when", "from", "error"]  # fmt: skip


def queue_rows(jobs: list[Job]) -> list[list[Any]]:
    return [[j.id, j.kind, j.state if j.state != "queued" else f"queued #{j.position + 1}", j.model,
             _short(j.request.get("prompt", "")), describe_progress(j.progress)] for j in jobs]  # fmt: skip


def history_rows(jobs: list[Job]) -> list[list[Any]]:
    rows = []
    for j in jobs:
        r = j.result
        size = f"{r['width']}x{r['height']}" if r.get("width") else ""
        vram = f"{r['peak_vram_bytes'] / 2**30:.2f}" if r.get("peak_vram_bytes") else ""
        ram = f"{r['peak_rss_bytes'] / 2**30:.2f}" if r.get("peak_rss_bytes") else ""
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(j.finished or j.created))
        rows.append([j.id, j.kind, j.state, j.model, _short(j.request.get("prompt", "")), j.request.get("seconds"),
                     j.request.get("seed"), j.request.get("steps"), r.get("frames"), size, vram, ram, when,
                     lineage(j), (j.error or "")[:120]])  # fmt: skip
    return rows


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ------------------------------------------------------------------------------------- branching
# The line under the section strip, by the model's schedule (framepack.registry: "inverted" / "forward").
SCHEDULE_NOTES = {
    "inverted": "This model generates the video from its end back to its start: section 1 is the end. A branch keeps "
                "the sections before the one you pick (the end of the video) and makes the rest again. Continue (a "
                "longer video) moves every section's RoPE padding, so it keeps only the sections it can (often none: "
                "then it makes the whole video again).",
    "forward": "This model generates the video from its start to its end: section 1 is the start. A branch keeps the "
               "sections before the one you pick (the start of the video) and makes the rest again; Continue keeps "
               "them all and adds to the end.",
}  # fmt: skip
KEPT_PART = {"inverted": "the end of the video", "forward": "the start of the video"}  # what sections 1..K are
CONTINUE_SECONDS = 5.0  # "Continue" proposes the job's length plus this


def schedule_of(model: str) -> str | None:
    """The model's section schedule ("inverted": back to front, "forward": F1), None for an unknown model."""
    from framepack.registry import get_spec

    try:
        return get_spec(model).schedule
    except ValueError:
        return None


def lineage(job: Job) -> str:
    """Where a job comes from, in words: "branch of <parent> @<K> (<changed fields>)", "re-run of <parent>",
    or "" (neither)."""
    info = job.branch
    if isinstance(info, dict) and info.get("parent"):
        changed = ", ".join(info.get("changed") or {}) or "no changes"
        return f"branch of {info['parent']} @{info.get('at')} ({changed})"
    return f"re-run of {job.parent}" if job.parent else ""


def section_caption(row: dict) -> str:
    """A strip thumbnail's caption (`JobQueue.sections` row)."""
    first, last = row["frames"]
    return f"section {row['section']} · frames {first}–{last}"


def _span(rows: list[dict]) -> tuple[int, int]:
    return min(r["frames"][0] for r in rows), max(r["frames"][1] for r in rows)


def video_part(row: dict, rows: list[dict]) -> str:
    """Which part of the job's video (as it is now) a section is: its start, its end, or part i of n."""
    order = sorted(rows, key=lambda r: r["video_index"])
    n, i = len(order), order.index(row)
    if n == 1:
        return "the whole video so far"
    return "the start of the video" if i == 0 else "the end of the video" if i == n - 1 else f"part {i + 1} of {n}"


def section_summary(row: dict, rows: list[dict]) -> str:
    """The selected section in words: where it is in the video and what a branch from it keeps."""
    k, (first, last) = row["section"], row["frames"]
    text = (f"Section {k} selected: frames {first}–{last} ({first / FPS:.2f}–{(last + 1) / FPS:.2f} s), "
            f"{video_part(row, rows)}.")  # fmt: skip
    if not row["reroll"]:
        return (f"{text} It cannot be re-rolled: the checkpoint before it was pruned (this job keeps only its "
                "latest section checkpoints). Pick a later section, or Continue.")  # fmt: skip
    kept = [r for r in rows if r["section"] < k]
    if not kept:
        return f"{text} A branch from here keeps nothing: it makes the whole video again."
    a, b = _span(kept)
    return f"{text} A branch from here keeps sections 1..{k - 1} (frames {a}–{b}) and makes section {k} on again."


def changes_text(changed: dict) -> str:
    """A branch's `changed` ({field: [old, new]}) in a line."""
    parts = [f"{field} {_short(str(old), 30)} → {_short(str(new), 30)}" for field, (old, new) in changed.items()]
    return "; ".join(parts) or "nothing"


def branch_status(job: Job) -> str:
    """The status line for a branch just queued: its id, what it keeps of its parent, what it changes."""
    info = job.branch or {}
    at, parent = info.get("at") or 0, info.get("parent")
    if at:
        part = KEPT_PART.get(schedule_of(job.model) or "")
        kept = f"keeps sections 1..{at} of `{parent}`" + (f" ({part})" if part else "")
    else:
        kept = f"keeps none of `{parent}`'s sections (makes the whole video again)"
    where = f" (#{job.position + 1} in the queue)" if job.position is not None else ""
    changes = _md_escape(changes_text(info.get("changed") or {}))
    return f"Branch `{job.id}` queued: {kept}; changes {changes}{where}. The Video tab follows it."


def new_seed(old: Any = None) -> int:
    """A random seed for "Re-roll from here", not the job's own."""
    while True:
        seed = secrets.randbelow(2**31)
        if seed != old:
            return seed


def prompt_change(job: Job, text: str | None) -> dict:
    """The params of "Change prompt from here"; ValueError when the prompt is the job's own."""
    text = text or ""
    if text == job.request.get("prompt", ""):
        raise ValueError("That is the job's own prompt: type another one first (Re-roll from here makes the "
                         "sections again with a new seed).")  # fmt: skip
    return {"prompt": text}


def continue_seconds(job: Job) -> float:
    """What "Continue" proposes: the job's length plus CONTINUE_SECONDS, within the request's range."""
    lo, hi = REQUEST_FIELDS["seconds"].range or (0.1, 3600)
    seconds = job.request.get("seconds")
    seconds = float(seconds if isinstance(seconds, (int, float)) else GenerationRequest.seconds)
    return round(min(float(hi), max(float(lo), seconds + CONTINUE_SECONDS)), 1)


# ------------------------------------------------------------------------------------- frame edits
def preset_values(name: str) -> list[Any]:
    """What choosing a preset sets on the Frame edit tab: [target index, no 2x, no 4x, no post, then the
    RoPE index of each reference row (None where the preset places no reference: the next index)]."""
    preset = EDIT_PRESETS.get(name, EDIT_PRESETS["edit"])
    target = GenerationRequest.window if preset.target is None else preset.target  # None: the window W
    refs = [preset.controls[i] if i < len(preset.controls) else None for i in range(1, 1 + EDIT_REFERENCES)]
    return [target, preset.no_2x, preset.no_4x, preset.no_post, *refs]


def editor_picture(value: Any) -> tuple[Any, np.ndarray | None]:
    """A gr.ImageEditor value -> (the uploaded picture, the mask painted on it: 255 wherever a brush
    stroke is, 0 elsewhere; None when nothing is painted). A plain picture passes through, unmasked."""
    if not isinstance(value, dict):
        return value, None
    background = value.get("background")
    if background is None:
        return None, None
    picture = np.asarray(background)
    if picture.ndim == 3 and picture.shape[2] == 4:
        picture = picture[..., :3]  # Gradio flattens it onto white: the alpha channel says nothing
    painted = None
    for layer in value.get("layers") or ():
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[2] == 4:
            stroke = layer[..., 3] > 0
            painted = stroke if painted is None or painted.shape != stroke.shape else painted | stroke
    if painted is None or not painted.any():
        return picture, None
    return picture, painted.astype(np.uint8) * 255


def edit_submission(start: Any, start_mask: Any, references: list[tuple[Any, Any, Any]], prompt: str | None,
                    preset: str, target: float, no_2x: bool, no_4x: bool, no_post: bool, seed: float,
                    steps: float) -> tuple[Any, dict, dict]:  # fmt: skip
    """The Frame edit tab's values -> (start image, params, uploads) for `JobQueue.submit`.

    `start` and each reference's picture: an ImageEditor value (the picture and the mask painted on it)
    or a picture; `start_mask` and each reference's mask: an uploaded mask file or None. `references`:
    (picture, RoPE index or None for the preset's, mask) per row; rows without a picture are skipped.
    ValueError (the user's to fix) for a missing start image, two masks for one image, or a mask alone."""
    image, painted = editor_picture(start)
    if image is None:
        raise ValueError("Upload a start image first.")
    uploads: dict[str, Any] = {}
    mask = _one_mask("the start image", painted, start_mask)
    if mask is not None:
        uploads["image_mask"] = mask
    controls = []
    for row, (value, index, mask_file) in enumerate(references, 1):
        picture, painted = editor_picture(value)
        if picture is None:
            if mask_file is not None:
                raise ValueError(f"Reference {row} has a mask but no image: upload its image or clear the mask.")
            continue
        name = f"control_{2 + len(controls)}"  # the start image is control 1
        uploads[name] = picture
        mask = _one_mask(f"reference {row}", painted, mask_file)
        if mask is not None:
            uploads[f"{name}_mask"] = mask
        controls.append({"index": None if index is None or index == "" else round(float(index))})
    params = {"kind": EditRequest.kind, "prompt": prompt or "", "preset": preset, "target_index": round(float(target)),
              "no_2x": bool(no_2x), "no_4x": bool(no_4x), "no_post": bool(no_post), "seed": round(float(seed)),
              "steps": round(float(steps)), "controls": controls}  # fmt: skip
    return image, params, uploads


def _one_mask(what: str, painted: np.ndarray | None, uploaded: Any) -> Any:
    if painted is not None and uploaded is not None:
        raise ValueError(f"{what.capitalize()} has a painted mask and an uploaded one: keep one of them.")
    return painted if painted is not None else uploaded


def edit_gallery(queue: JobQueue, limit: int = EDIT_GALLERY) -> list[tuple[str, str]]:
    """(image path, caption) of the finished frame edits, newest first."""
    done = [j for j in queue.list(["done"]) if j.kind == EditRequest.kind and j.output]
    done.sort(key=lambda j: -(j.finished or j.created))
    out = []
    for job in done[:limit]:
        try:
            out.append((str(queue.file(job.output)), f"{job.id} · {_short(job.request.get('prompt', ''), 40)}"))
        except JobError:
            continue  # deleted or damaged meanwhile
    return out


def edit_status(queue: JobQueue, session: dict) -> str:
    """A line on the session's latest frame edit job: queued, its progress, or how it ended."""
    jobs = session.get("jobs") or []
    if not jobs:
        return ""
    try:
        job = queue.get(jobs[-1])
    except JobError:
        return ""
    where = f" (#{job.position + 1} in the queue)" if job.state == "queued" else ""
    return f"Edit job `{job.id}`{where}: {_progress_texts(job)[0]}"


# ------------------------------------------------------------------------------------- the page
def build(queue: JobQueue, *, title: str = "FramePack") -> gr.Blocks:
    """The Blocks page for `queue` (not launched: see `mount`)."""
    controls = _present(CONTROLS)
    from framepack.registry import REGISTRY

    spec = REGISTRY.get(queue.default_model)
    schedule = SCHEDULES[spec.schedule] if spec is not None else None  # its title suffix and order note
    uploads = upload_fields()
    resolutions = [("model default", _AUTO_RES)] + [(str(b), str(b)) for b in range(64, 1281, 32)]

    with gr.Blocks(title=title, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"# {title}" + (schedule.title_suffix if schedule else ""))
        watch = gr.State({"jobs": []})
        base_params = gr.State({})
        with gr.Tabs(elem_id="fp-kinds"):
            with gr.Tab("Video", elem_id="fp-tab-video"):
                with gr.Row():
                    with gr.Column():
                        image = gr.Image(sources=["upload"], type="numpy", label="Image", height=320,
                                         elem_id="fp-image")  # fmt: skip
                        prompt = gr.Textbox(label="Prompt", value="", elem_id="fp-prompt")
                        quick = gr.Dataset(samples=[[p] for p in QUICK_PROMPTS], label="Quick List",
                                           samples_per_page=1000, components=[prompt])  # fmt: skip
                        quick.click(lambda x: x[0], inputs=[quick], outputs=prompt, show_progress="hidden", queue=False)
                        with gr.Row():
                            start = gr.Button("Start Generation", variant="primary", elem_id="fp-start")
                            end = gr.Button("End Generation", interactive=False, elem_id="fp-end")
                            pause = gr.Button("Pause", interactive=False, elem_id="fp-pause")
                        with gr.Group():
                            with gr.Row():
                                model = gr.Dropdown(list(queue.models), value=queue.default_model, label="Model",
                                                    elem_id="fp-model")  # fmt: skip
                                resolution = gr.Dropdown(resolutions, value=_AUTO_RES, elem_id="fp-resolution",
                                                         label="Resolution (bucket base, px)")  # fmt: skip
                            widgets = [c.build() for c in controls if not c.advanced]
                        with gr.Accordion("Advanced", open=False):
                            advanced = [c.build() for c in controls if c.advanced]
                            end_image = None
                            if "end_image" in uploads:
                                end_image = gr.Image(sources=["upload"], type="numpy", height=200,
                                                     label="End frame (original model)",
                                                     elem_id="fp-end-image")  # fmt: skip
                            carried = gr.Markdown("")
                        ordered = [c for c in controls if not c.advanced] + [c for c in controls if c.advanced]
                        control_widgets = widgets + advanced
                        by_field = {c.field: w for c, w in zip(ordered, control_widgets)}
                        if "cache" in by_field and "cache_threshold" in by_field:  # .input: the user's picks
                            by_field["cache"].input(switched_threshold,
                                                    inputs=[by_field["cache"], by_field["cache_threshold"]],
                                                    outputs=[by_field["cache_threshold"]], show_progress="hidden",
                                                    queue=False)  # fmt: skip
                        lora_files = lora_choices(queue.lora_library())
                        with gr.Accordion("LoRA", open=False, elem_id="fp-lora"):
                            lora_note = gr.Markdown(_lora_note(queue, lora_files), elem_id="fp-lora-folder")
                            lora_rows: list[gr.components.Component] = []  # file, weight, file, weight, ...
                            for i in range(LORA_ROWS):
                                with gr.Row():
                                    lora_rows.append(gr.Dropdown(lora_files, value=LORA_NONE,
                                                                 label=f"LoRA {i + 1}", allow_custom_value=True,
                                                                 scale=3, elem_id=f"fp-lora-{i}"))  # fmt: skip
                                    lo, hi, step = LORA_WEIGHT
                                    lora_rows.append(gr.Slider(lo, hi, step=step, value=1.0, label="Weight",
                                                               scale=2, elem_id=f"fp-lora-weight-{i}"))  # fmt: skip
                            with gr.Row():
                                lora_include = gr.Textbox(label="Only modules matching (regex)",
                                                          elem_id="fp-lora-include",
                                                          info=REQUEST_FIELDS["lora_include"].help)  # fmt: skip
                                lora_exclude = gr.Textbox(label="Leave out modules matching (regex)",
                                                          elem_id="fp-lora-exclude",
                                                          info=REQUEST_FIELDS["lora_exclude"].help)  # fmt: skip
                            rescan = gr.Button("Rescan the LoRA folder", size="sm", elem_id="fp-lora-rescan")
                        lora_inputs = [*lora_rows, lora_include, lora_exclude]
                    with gr.Column():
                        preview = gr.Image(label="Next Latents", height=200, visible=False, interactive=False)
                        video = gr.Video(label="Finished Frames", autoplay=True, loop=True, height=512,
                                         interactive=False, buttons=["download"], elem_id="fp-video")  # fmt: skip
                        if schedule is not None and schedule.order_note:
                            gr.Markdown(schedule.order_note)
                        desc = gr.Markdown("", elem_classes="no-generating-animation", elem_id="fp-progress-desc")
                        bar = gr.HTML("", elem_classes="no-generating-animation", elem_id="fp-progress-bar")
                        status = gr.Markdown("", elem_id="fp-status")
            with gr.Tab("Frame edit", elem_id="fp-tab-edit"):
                _edit_tab(queue)
        with gr.Tabs():
            with gr.Tab("Queue"):
                queue_table = gr.Dataframe(headers=QUEUE_HEADERS, value=[], interactive=False,
                                           elem_id="fp-queue-table")  # fmt: skip
                workers_md = gr.Markdown("", elem_id="fp-workers")
                with gr.Row():
                    queue_pick = gr.Dropdown([], label="Queued or running job", elem_id="fp-queue-pick", scale=3)
                    cancel_btn = gr.Button("Cancel job", variant="stop", elem_id="fp-queue-cancel")
                    pause_btn = gr.Button("Pause", elem_id="fp-queue-pause")
                    up_btn = gr.Button("Move up", elem_id="fp-queue-up")
                    down_btn = gr.Button("Move down", elem_id="fp-queue-down")
                    next_btn = gr.Button("Run next", elem_id="fp-queue-next")
            with gr.Tab("History"):
                history_table = gr.Dataframe(headers=HISTORY_HEADERS, value=[], interactive=False,
                                             elem_id="fp-history-table")  # fmt: skip
                with gr.Row():
                    hist_pick = gr.Dropdown([], label="Past job", elem_id="fp-history-pick", scale=3)
                    load_btn = gr.Button("Load settings", elem_id="fp-load")
                    resume_btn = gr.Button("Resume", elem_id="fp-resume")
                    delete_btn = gr.Button("Delete", variant="stop", elem_id="fp-delete")
                with gr.Row():
                    hist_video = gr.Video(label="Video", height=320, interactive=False)
                    with gr.Column():
                        hist_params = gr.JSON(label="Parameters", elem_id="fp-history-params")
                        hist_files = gr.File(label="Downloads (MP4 and sidecar)", file_count="multiple",
                                             interactive=False)  # fmt: skip
                with gr.Group(elem_id="fp-branching"):  # the picked job's sections: branch from one
                    strip_title = gr.Markdown("Pick a past video job to see its sections.", elem_id="fp-sections-title")
                    strip = gr.Gallery(label="Sections (generation order): first and last frame", columns=6,
                                       height=250, allow_preview=False, interactive=False, object_fit="contain",
                                       fit_columns=False, format="jpeg", elem_id="fp-sections")  # fmt: skip
                    strip_note = gr.Markdown("", elem_id="fp-sections-note")
                    strip_selected = gr.Markdown("", elem_id="fp-section-selected")
                    with gr.Row():
                        reroll_btn = gr.Button("Re-roll from here", interactive=False, elem_id="fp-reroll")
                        continue_to = gr.Number(CONTINUE_SECONDS + GenerationRequest.seconds, precision=1,
                                                label="Continue to (seconds)", elem_id="fp-continue-seconds",
                                                minimum=REQUEST_FIELDS["seconds"].range[0],
                                                maximum=REQUEST_FIELDS["seconds"].range[1])  # fmt: skip
                        continue_btn = gr.Button("Continue", interactive=False, elem_id="fp-continue")
                    with gr.Row():
                        branch_text = gr.Textbox(label="Prompt from the selected section on", scale=4,
                                                 elem_id="fp-branch-prompt-text")  # fmt: skip
                        branch_prompt_btn = gr.Button("Change prompt from here", interactive=False,
                                                      elem_id="fp-branch-prompt")  # fmt: skip
                    branch_note = gr.Markdown("", elem_id="fp-branch-status")
        gr.HTML('<div style="text-align:center;margin-top:20px">Share your results and find ideas at the '
                '<a href="https://x.com/search?q=framepack&f=live" target="_blank">FramePack Twitter (X) '
                "thread</a></div>")  # fmt: skip
        fast, slow = gr.Timer(0.5), gr.Timer(2.0)
        panel = gr.State({})
        strip_job = gr.State(None)  # the job the strip shows (set by the History picker only)
        chosen = gr.State(None)  # {"job", "section"}: the selected thumbnail (set by a pick and a click only)
        strip_sent = gr.State({})  # what the strip shows now (`_strip`), so a tick sends only what changed

        # ---------------------------------------------------------------- handlers (thin)
        def on_start(img, text, model_name, res, *rest):
            values, picks = list(rest[: len(control_widgets)]), list(rest[len(control_widgets) : -3])
            end_img, session, base = rest[-3:]
            if img is None:
                raise gr.Error("Upload a start image first.")
            params, options = collect(tuple(ordered), values, base)
            params.update(collect_loras(picks[:-2], picks[-2], picks[-1]))
            params["prompt"] = text or ""
            params["resolution"] = None if res in (None, _AUTO_RES) else int(res)
            try:
                job = queue.submit(img, params, model=model_name, options=options,
                                   uploads={"end_image": end_img} if end_img is not None else None)  # fmt: skip
            except (ValueError, JobError) as err:  # RequestError / ImageError: the user's to fix
                raise gr.Error(str(err)) from None
            jobs = [*session.get("jobs", []), job.id]
            where = "starts now" if job.position == 0 and not _busy(queue) else f"is queued (#{job.position + 1})"
            return {**session, "jobs": jobs}, gr.update(interactive=True), f"Job `{job.id}` {where}."

        start.click(on_start, inputs=[image, prompt, model, resolution, *control_widgets, *lora_inputs,
                                      end_image if end_image is not None else gr.State(None), watch, base_params],
                    outputs=[watch, end, status], concurrency_limit=None)  # fmt: skip

        def on_end(session):
            job_id = _watched(queue, session)
            if job_id:
                try:
                    queue.cancel(job_id)
                except JobError as err:
                    return f"{err}"
                return f"Ending job `{job_id}` after the current step ..."
            return "No job to end."

        end.click(on_end, inputs=[watch], outputs=[status], concurrency_limit=None)

        def on_rescan():
            files = lora_choices(queue.lora_library())
            return [*(gr.update(choices=files) for _ in range(LORA_ROWS)), _lora_note(queue, files)]

        lora_files_out = [*lora_rows[0::2], lora_note]
        rescan.click(on_rescan, outputs=lora_files_out, show_progress="hidden", concurrency_limit=None)
        demo.load(on_rescan, outputs=lora_files_out, show_progress="hidden", concurrency_limit=None)  # new tabs

        def on_pause(session):
            job_id = _watched(queue, session)
            if not job_id:
                return "No job to pause."
            try:
                queue.pause(job_id)
            except JobError as err:
                return str(err)
            return f"Pausing job `{job_id}` after its current section (then Resume it from the History tab) ..."

        pause.click(on_pause, inputs=[watch], outputs=[status], concurrency_limit=None)

        def on_fast(session):
            *out, session = _follow(queue, session)
            return [*out, *_pause_button(queue, session)]

        fast.tick(on_fast, inputs=[watch], outputs=[preview, video, desc, bar, end, pause, watch],
                  show_progress="hidden", concurrency_limit=None)  # fmt: skip

        def on_slow(state, q_value, h_value):
            return _panels(queue, state, q_value, h_value)

        slow.tick(on_slow, inputs=[panel, queue_pick, hist_pick], outputs=[queue_table, queue_pick, history_table,
                  hist_pick, workers_md, panel], show_progress="hidden", concurrency_limit=None)  # fmt: skip

        def queue_action(action: Callable[[str], Any], verb: str) -> Callable:
            def run(job_id):
                if not job_id:
                    return "Pick a job in the queue first."
                try:
                    action(job_id)
                except JobError as err:
                    return str(err)
                return f"Job `{job_id}` {verb}."

            return run

        def moved(delta: int) -> Callable[[str], Any]:
            return lambda job_id: queue.move(job_id, max(0, (queue.get(job_id).position or 0) + delta))

        for btn, action, verb in ((cancel_btn, queue.cancel, "cancelled"),
                                  (pause_btn, queue.pause, "pauses after its current section"),
                                  (up_btn, moved(-1), "moved up"),
                                  (down_btn, moved(1), "moved down"),
                                  (next_btn, lambda j: queue.move(j, 0), "runs next")):  # fmt: skip
            btn.click(queue_action(action, verb), inputs=[queue_pick], outputs=[status], concurrency_limit=None)

        def on_pick(job_id):
            if not job_id:
                return None, None, None
            try:
                job = queue.get(job_id)
            except JobError as err:
                return None, {"error": str(err)}, None
            files = [str(p) for p in _files(queue, job)]
            video_path = next((f for f in files if f.endswith(".mp4")), None)  # an edit's PNG is in the files
            info = {"state": job.state, "model": job.model, "params": job.params(), "options": job.options,
                    "result": job.result, "error": job.error, "resumable": job.resumable}  # fmt: skip
            if job.parent or job.branch:
                info = {"from": lineage(job), **info, "parent": job.parent, "branch": job.branch}
            cache = (_sidecar(queue, job) or {}).get("step_cache")
            if cache:
                info["step_cache"] = cache
            return video_path, info, files or None

        hist_pick.change(on_pick, inputs=[hist_pick], outputs=[hist_video, hist_params, hist_files])

        # The section strip: picking a job shows it; the slow tick refreshes it as sections finish; a click
        # selects a section; the buttons branch.
        strip_outputs = [strip, strip_title, strip_note, strip_selected, reroll_btn, branch_prompt_btn, continue_btn]

        def on_strip_pick(job_id):
            if not job_id:
                return [gr.skip()] * (len(strip_outputs) + 6)
            view = _strip(queue, job_id, None, {})
            try:
                job = queue.get(job_id)
                text, seconds = job.request.get("prompt", ""), continue_seconds(job)
            except JobError:
                text, seconds = gr.skip(), gr.skip()
            return [*view, job_id, None, text, seconds, ""]

        # The user's picks only (the dropdown or a History row), not the slow tick's (its value None when the
        # picked job leaves the History, as a resumed one does: the strip keeps following it).
        pick_outputs = [*strip_outputs, strip_sent, strip_job, chosen, branch_text, continue_to, branch_note]
        hist_pick.input(on_strip_pick, inputs=[hist_pick], outputs=pick_outputs, show_progress="hidden")

        def on_strip_tick(job_id, picked, sent):
            return _strip(queue, job_id, picked, sent) if job_id else [gr.skip()] * (len(strip_outputs) + 1)

        slow.tick(on_strip_tick, inputs=[strip_job, chosen, strip_sent], outputs=[*strip_outputs, strip_sent],
                  show_progress="hidden", concurrency_limit=None)  # fmt: skip

        def on_section_select(job_id, evt: gr.SelectData):
            rows = queue.sections(job_id) if job_id else []
            index = evt.index if isinstance(evt.index, int) else None
            if index is None or not 0 <= index < len(rows):
                off = gr.update(interactive=False)
                return None, "Pick a section of the strip.", off, off, _section_items(queue, job_id, rows)
            row, k = rows[index], rows[index]["section"]
            ok = gr.update(interactive=bool(row["reroll"]))
            marked = _section_items(queue, job_id, rows, k)  # the selected one's caption marked
            return {"job": job_id, "section": k}, section_summary(row, rows), ok, ok, marked

        strip.select(on_section_select, inputs=[strip_job], outputs=[chosen, strip_selected, reroll_btn,
                     branch_prompt_btn, strip], show_progress="hidden", concurrency_limit=None)  # fmt: skip

        def branched(job_id: str, at: int | str, params: Callable[[Job], dict], session: dict) -> list:
            """Branch `job_id` (the status line, the session following the branch, the End button)."""
            try:
                job = queue.branch(job_id, at, params(queue.get(job_id)))
            except (ValueError, JobError) as err:  # RequestError, JobConflict: the user's to fix
                return [f"Cannot branch job `{job_id}`: {_md_escape(str(err))}", gr.skip(), gr.skip()]
            jobs = [*session.get("jobs", []), job.id]
            return [branch_status(job), {**session, "jobs": jobs}, gr.update(interactive=True)]

        def section_action(at: Callable[[int], int], params: Callable[[Job, Any], dict]) -> Callable:
            def run(picked, value, session):
                if not picked:
                    return ["Pick a section of the strip first.", gr.skip(), gr.skip()]
                return branched(picked["job"], at(picked["section"]), lambda job: params(job, value), session)

            return run

        branch_outputs = [branch_note, watch, end]
        reroll_btn.click(section_action(lambda k: k - 1, lambda job, _: {"seed": new_seed(job.request.get("seed"))}),
                         inputs=[chosen, branch_text, watch], outputs=branch_outputs,
                         concurrency_limit=None)  # fmt: skip
        branch_prompt_btn.click(section_action(lambda k: k - 1, prompt_change), inputs=[chosen, branch_text, watch],
                                outputs=branch_outputs, concurrency_limit=None)  # fmt: skip

        def on_continue(job_id, seconds, session):
            if not job_id:
                return ["Pick a past video job first.", gr.skip(), gr.skip()]
            if seconds is None:
                return ["Give the length to continue to (seconds).", gr.skip(), gr.skip()]
            return branched(job_id, "last", lambda job: {"seconds": float(seconds)}, session)

        continue_btn.click(on_continue, inputs=[strip_job, continue_to, watch], outputs=branch_outputs,
                           concurrency_limit=None)  # fmt: skip

        def on_table_select(evt: gr.SelectData):
            row = evt.row_value or []
            return row[0] if row else gr.skip()

        picked_row = history_table.select(on_table_select, outputs=[hist_pick])
        picked_row.then(on_strip_pick, inputs=[hist_pick], outputs=pick_outputs, show_progress="hidden")
        queue_table.select(on_table_select, outputs=[queue_pick])

        def on_load(job_id):
            if not job_id:
                raise gr.Error("Pick a past job first.")
            job = queue.get(job_id)
            if job.kind != "video":
                raise gr.Error(f"Job {job.id} is a frame edit: its settings are not a video's (re-run it through "
                               "the API, or set the Frame edit tab to match).")  # fmt: skip
            values, rest = settings_of(job, tuple(ordered))
            res = job.request.get("resolution")
            img = queue.jobs_dir / job.id / INPUT
            end = queue.jobs_dir / job.id / "end_image.png"
            note = f"Carried over from job `{job.id}` (no widget): `{rest}`" if rest else ""
            rows, include, exclude, left = lora_settings(job.params())
            if left:
                note += f"  \nNot loaded (the LoRA picker has {LORA_ROWS} rows): `{left}`"
            out = [str(img) if img.is_file() else None, job.request.get("prompt", ""), job.model,
                   str(res) if res else _AUTO_RES, *values]  # fmt: skip
            if end_image is not None:
                out.append(str(end) if end.is_file() else None)
            return [*out, *rows, include, exclude, rest, note]

        load_outputs = [image, prompt, model, resolution, *control_widgets]
        if end_image is not None:
            load_outputs.append(end_image)
        load_outputs += lora_inputs
        load_btn.click(on_load, inputs=[hist_pick], outputs=[*load_outputs, base_params, carried])

        def on_resume(job_id, session):
            if not job_id:
                raise gr.Error("Pick a past job first.")
            try:
                queue.resume(job_id)
            except JobError as err:
                raise gr.Error(str(err)) from None
            jobs = [*session.get("jobs", []), job_id]
            return {**session, "jobs": jobs}, f"Job `{job_id}` resumes from its last section."

        resume_btn.click(on_resume, inputs=[hist_pick, watch], outputs=[watch, status])

        def on_delete(job_id):
            if not job_id:
                raise gr.Error("Pick a past job first.")
            try:
                queue.delete(job_id)
            except JobError as err:
                raise gr.Error(str(err)) from None
            return f"Job `{job_id}` deleted.", None, None, None, None

        delete_btn.click(on_delete, inputs=[hist_pick],
                         outputs=[status, hist_pick, hist_video, hist_params, hist_files])  # fmt: skip
    return demo


def _lora_note(queue: JobQueue, files: list[str]) -> str:
    folder = queue.lora_library().folder
    found = f"{len(files) - 1} file(s)" if folder.is_dir() else "it does not exist yet"
    return (f"LoRA files from `{folder}` ({found}): put `.safetensors` files there (subfolders too) and press "
            "Rescan. The weights add up where several LoRAs touch a module.")  # fmt: skip


def _lora_lines(queue: JobQueue, job_id: str, shown: dict) -> list[str]:
    """The lines of the job's latest `loras_applied` event (what each LoRA matched), kept in `shown`
    (each tick reads only the events after the last one it saw)."""
    try:
        events = queue.events(job_id, shown.get("lora_seq", 0))
    except JobError:
        events = []
    for e in events:
        if e.get("type") == "loras_applied" and isinstance(e.get("lines"), list):
            shown["loras"] = [str(line) for line in e["lines"]]
        shown["lora_seq"] = max(shown.get("lora_seq", 0), e.get("seq", 0))
    return shown.get("loras") or []


def _sidecar(queue: JobQueue, job: Job) -> dict | None:
    """The job's sidecar (video.json), or None (none yet, or unreadable)."""
    try:
        data = json.loads(queue.job_file(job.id, "metadata").read_text())
    except (JobError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _busy(queue: JobQueue) -> bool:
    """Every worker has a job (a new one waits)."""
    return len(queue.list(["running"])) >= queue.dispatcher.slots


def _watched(queue: JobQueue, session: dict) -> str | None:
    """The session's job to show: the one shown, until it ends and another of the session's jobs is
    still to run (so a finished video stays up when a later job is cancelled)."""
    current = session.get("shown", {}).get("job")
    try:
        if current and not queue.get(current).terminal:
            return current
    except JobError:
        current = None
    for job_id in session.get("jobs", []):
        try:
            if job_id != current and not queue.get(job_id).terminal:
                return job_id
        except JobError:
            continue
    if current:
        return current
    return session["jobs"][-1] if session.get("jobs") else None


def _follow(queue: JobQueue, session: dict) -> list:
    """One fast tick: the watched job's preview, video, progress and End button, only where changed."""
    skip = gr.skip()
    job_id = _watched(queue, session)
    if job_id is None:
        return [skip] * 5 + [session]
    try:
        job = queue.get(job_id)
    except JobError:  # deleted meanwhile
        return [skip] * 5 + [{**session, "jobs": [j for j in session["jobs"] if j != job_id], "shown": {}}]
    shown = dict(session.get("shown") or {})
    out: list[Any] = [skip] * 5
    if shown.get("job") != job_id:
        shown = {"job": job_id}
        out[0] = gr.update(visible=False)  # the previous job's latents
    found = queue.preview(job_id) if job.state == "running" else None
    if found is not None and found[0] != shown.get("preview"):
        out[0] = gr.update(value=found[1], visible=True)
        shown["preview"] = found[0]
    elif found is None and shown.get("preview") is not None and job.terminal:
        out[0] = gr.update(visible=False)  # hidden at the end, as the official page does
        shown["preview"] = None
    rel = job.video or job.progress.get("video")
    if rel:
        try:
            path = queue.file(rel)
            key = f"{rel}:{path.stat().st_mtime_ns}:{job.state in TERMINAL}"
        except (JobError, OSError):
            path, key = None, None
        if path is not None and key != shown.get("video"):
            out[1] = str(path)
            shown["video"] = key
    if job.terminal and shown.get("cache_of") != job.finished:  # read once per end (a resumed job ends again)
        shown["cache"], shown["cache_of"] = cache_summary(_sidecar(queue, job)), job.finished
    text, bar = progress_texts(job, _lora_lines(queue, job_id, shown), shown.get("cache"))
    if (text, bar) != (shown.get("desc"), shown.get("bar")):
        out[2], out[3] = text, bar
        shown["desc"], shown["bar"] = text, bar
    running = not job.terminal
    if running != shown.get("running"):
        out[4] = gr.update(interactive=running)
        shown["running"] = running
    return [*out, {**session, "shown": shown}]


def _pause_button(queue: JobQueue, session: dict) -> list:
    """The Pause button's update (only where changed: enabled while the watched job is a running video)
    and the session."""
    job_id = _watched(queue, session)
    try:
        job = queue.get(job_id) if job_id else None
    except JobError:
        job = None
    pausable = job is not None and job.state == "running" and job.kind == "video"
    shown = dict(session.get("shown") or {})
    if shown.get("pausable") == pausable:
        return [gr.skip(), session]
    shown["pausable"] = pausable
    return [gr.update(interactive=pausable), {**session, "shown": shown}]


def _strip(queue: JobQueue, job_id: str, picked: dict | None, sent: dict) -> list:
    """The section strip of job `job_id`, only where changed since `sent`: [thumbnails, title, the
    schedule's note, the selected section's text, Re-roll, Change prompt, Continue, what is sent now].
    `picked`: the selected section ({"job", "section"}), or None."""
    skip = gr.skip()
    try:
        job = queue.get(job_id)
    except JobError:
        job = None
    rows = queue.sections(job_id) if job is not None else []
    before = sent.get("rows") or [None, None, []]
    if not rows and job is not None and job.state == "running" and before[0] == job_id and before[2]:
        return [skip] * 7 + [sent]  # its video is being replaced (a section just finished): the next tick sees it
    rows_key = [job_id, job.state if job is not None else None, rows]
    k = picked.get("section") if picked and picked.get("job") == job_id else None
    row = next((r for r in rows if r["section"] == k), None)
    selected_key = [rows_key, k]
    out: list[Any] = [skip] * 7
    if rows_key != sent.get("rows"):
        out[0] = _section_items(queue, job_id, rows, row["section"] if row else None)
        out[1] = _strip_title(job_id, job, rows)
        out[2] = SCHEDULE_NOTES.get(schedule_of(job.model) or "", "") if job is not None and rows else ""
        out[6] = gr.update(interactive=bool(rows))
    if selected_key != sent.get("selected"):
        out[3] = section_summary(row, rows) if row else "Click a section to branch from it." if rows else ""
        out[4] = out[5] = gr.update(interactive=bool(row and row["reroll"]))
    return [*out, {"rows": rows_key, "selected": selected_key}]


def _strip_title(job_id: str, job: Job | None, rows: list[dict]) -> str:
    if job is None:
        return f"Job `{job_id}` is gone."
    if job.kind != "video":
        return f"Job `{job_id}` is a frame edit: it has no sections to branch from."
    title = f"Sections of job `{job_id}` ({job.state}, {len(rows)} finished)"
    origin = lineage(job)
    if origin:
        title += f" · {_md_escape(origin)}"
    if not rows:
        title += ": none to branch from (no section finished yet, or the job kept no section checkpoints)."
    return title


def _section_items(queue: JobQueue, job_id: str, rows: list[dict], selected: int | None = None) -> list[tuple]:
    """(picture, caption) per finished section (generation order): its first and last frame side by side;
    the `selected` section's caption starts with SELECTED_MARK."""
    from PIL import Image

    items = []
    for row in rows:
        pictures = []
        for which in ("first", "last"):
            try:
                pictures.append(Image.open(io.BytesIO(queue.section_frame(job_id, row["section"], which))))
            except (JobError, OSError):  # gone meanwhile: a grey square keeps the strip's order
                pictures.append(Image.new("RGB", (64, 64), (128, 128, 128)))
        gap = 4
        width, height = sum(p.width for p in pictures) + gap, max(p.height for p in pictures)
        both = Image.new("RGB", (width, height), (255, 255, 255))
        both.paste(pictures[0].convert("RGB"), (0, 0))
        both.paste(pictures[1].convert("RGB"), (pictures[0].width + gap, 0))
        items.append((both, (SELECTED_MARK if row["section"] == selected else "") + section_caption(row)))
    return items


def _panels(queue: JobQueue, state: dict, q_value: str | None, h_value: str | None) -> list:
    """One slow tick: the queue and history tables and their pickers, the workers line, only where changed."""
    skip = gr.skip()
    jobs = queue.list()
    pending = [j for j in jobs if not j.terminal]
    past = [j for j in jobs if j.terminal][:100]
    q_rows, h_rows, w_line = queue_rows(pending), history_rows(past), workers_line(queue)
    out: list[Any] = [skip] * 5
    if q_rows != state.get("q"):
        ids = [j.id for j in pending]
        out[0] = q_rows
        out[1] = gr.update(choices=ids, value=q_value if q_value in ids else None)
    if h_rows != state.get("h"):
        ids = [j.id for j in past]
        out[2] = h_rows
        out[3] = gr.update(choices=ids, value=h_value if h_value in ids else None)
    if w_line != state.get("w"):
        out[4] = w_line
    return [*out, {"q": q_rows, "h": h_rows, "w": w_line}]


def workers_line(queue: JobQueue) -> str:
    """What runs the jobs, in one line: each worker (the server itself, or each Ray worker with its host
    and GPUs), the job it runs or "free", and the model it has loaded."""
    parts = []
    for w in queue.workers():
        where = "this server" if w["name"] == "in-process" else w["name"]
        if w.get("host"):
            where += f" on {w['host']}"
        if w.get("gpus"):
            where += f" (GPU {', '.join(w['gpus'])})"
        what = f"running `{w['job']}`" if w.get("job") else "free"
        if w.get("model"):
            what += f", {w['model']} loaded"
        parts.append(f"{where}: {what}")
    if not parts:
        return "**Workers**: none has started yet"
    return f"**Workers ({len(parts)})**: " + " · ".join(parts)


def _files(queue: JobQueue, job: Job) -> list[Path]:
    found = []
    for kind in ("video", "edit", "metadata"):
        try:
            found.append(queue.job_file(job.id, kind))
        except JobError:
            continue
    return found


def _edit_tab(queue: JobQueue) -> None:
    """The Frame edit tab's widgets and handlers (inside the page's Blocks); see the module docstring."""
    from framepack.registry import REGISTRY

    inverted = [m for m in queue.models if m not in REGISTRY or REGISTRY[m].schedule == "inverted"]
    models = inverted or list(queue.models)  # an F1-only server: the engine's check says why edits fail
    first = preset_values("edit")

    def picture(label: str, elem_id: str) -> tuple[gr.components.Component, gr.components.Component]:
        editor = gr.ImageEditor(type="numpy", sources=["upload"], label=label, height=320, layers=False,
                                transforms=(), format="png", brush=gr.Brush(colors=["#ff3366"], color_mode="fixed"),
                                elem_id=elem_id)  # fmt: skip
        mask = gr.Image(type="filepath", sources=["upload"], label="Mask file (optional; white = keep)", height=140,
                        elem_id=f"{elem_id}-mask")  # fmt: skip
        return editor, mask

    session = gr.State({"jobs": []})
    shown = gr.State({})
    with gr.Row():
        with gr.Column():
            gr.Markdown("One frame: the start image some time later, following the prompt, optionally with "
                        "reference images (kisekaeichi: outfit transfer). Paint over what the model should use "
                        "(nothing painted: the whole image), or upload a mask file. Original model only.")  # fmt: skip
            start_image, start_mask = picture("Start image", "fp-edit-image")
            prompt = gr.Textbox(label="Prompt", value="", elem_id="fp-edit-prompt",
                                info="What the edited frame shows (one prompt).")  # fmt: skip
            refs: list[gr.components.Component] = []  # picture, index, mask per row
            ref_indices = []
            for row in range(1, 1 + EDIT_REFERENCES):
                with gr.Accordion(f"Reference image {row}", open=False, elem_id=f"fp-edit-ref-{row}-box"):
                    editor, mask = picture(f"Reference image {row}", f"fp-edit-ref-{row}")
                    index = gr.Number(first[3 + row], precision=0, label="RoPE index (empty: after the previous image)",
                                      minimum=0, maximum=100, elem_id=f"fp-edit-ref-{row}-index")  # fmt: skip
                refs += [editor, index, mask]
                ref_indices.append(index)
            with gr.Row():
                start = gr.Button("Start Edit", variant="primary", elem_id="fp-edit-start")
                model = gr.Dropdown(models, value=queue.default_model if queue.default_model in models else models[0],
                                    label="Model", elem_id="fp-edit-model")  # fmt: skip
            preset = gr.Dropdown(list(EDIT_PRESETS), value="edit", label="Preset", elem_id="fp-edit-preset",
                                 info="; ".join(f"{k}: {v.help}" for k, v in EDIT_PRESETS.items()))  # fmt: skip
            lo, hi, step = EDIT_FIELDS["target_index"].slider
            target = gr.Slider(lo, hi, step=step, value=first[0], label="Target index",
                               info=EDIT_FIELDS["target_index"].help, elem_id="fp-edit-target")  # fmt: skip
            with gr.Row():
                switches = [gr.Checkbox(value=v, label=label, info=EDIT_FIELDS[f].help, elem_id=f"fp-edit-{f}")
                            for f, label, v in (("no_2x", "No 2x context", first[1]),
                                                ("no_4x", "No 4x context", first[2]),
                                                ("no_post", "No zero post latent", first[3]))]  # fmt: skip
            with gr.Row():
                seed = gr.Number(GenerationRequest.seed, precision=0, label="Seed", elem_id="fp-edit-seed")
                lo, hi, step = REQUEST_FIELDS["steps"].slider
                steps = gr.Slider(lo, hi, step=step, value=GenerationRequest.steps, label="Steps",
                                  elem_id="fp-edit-steps")  # fmt: skip
        with gr.Column():
            status = gr.Markdown("", elem_id="fp-edit-status")
            gallery = gr.Gallery(label="Finished edits (newest first)", columns=3, height=560, interactive=False,
                                 elem_id="fp-edit-gallery")  # fmt: skip
    preset.input(preset_values, inputs=[preset], outputs=[target, *switches, *ref_indices], show_progress="hidden",
                 queue=False)  # fmt: skip

    def on_start(start_value, start_mask_file, *rest):
        rows = [tuple(rest[i : i + 3]) for i in range(0, 3 * EDIT_REFERENCES, 3)]
        text, preset_name, target_index, no_2x, no_4x, no_post, seed_value, steps_value, model_name, state = rest[
            3 * EDIT_REFERENCES :]  # fmt: skip
        try:
            image, params, uploads = edit_submission(start_value, start_mask_file, rows, text, preset_name,
                                                     target_index, no_2x, no_4x, no_post, seed_value,
                                                     steps_value)  # fmt: skip
            job = queue.submit(image, params, model=model_name, uploads=uploads)
        except (ValueError, JobError) as err:  # RequestError / ImageError: the user's to fix
            raise gr.Error(str(err)) from None
        where = "starts now" if job.position == 0 and not _busy(queue) else f"is queued (#{job.position + 1})"
        return {**state, "jobs": [*state.get("jobs", []), job.id]}, f"Edit job `{job.id}` {where}."

    start.click(on_start, inputs=[start_image, start_mask, *refs, prompt, preset, target, *switches, seed, steps,
                                  model, session], outputs=[session, status], concurrency_limit=None)  # fmt: skip

    def on_tick(state, seen):
        text, items = edit_status(queue, state), edit_gallery(queue)
        out = [gr.skip(), gr.skip()]
        if text != seen.get("status"):
            out[0] = text
        if items != seen.get("gallery"):
            out[1] = items
        return [*out, {"status": text, "gallery": items}]

    gr.Timer(1.0).tick(on_tick, inputs=[session, shown], outputs=[status, gallery, shown], show_progress="hidden",
                       concurrency_limit=None)  # fmt: skip


# ------------------------------------------------------------------------------------- serving
def mount(app: Any, queue: JobQueue, *, token: str | None = None, path: str = "/") -> Any:
    """Put the page at `path` of a FastAPI app (API routes registered before keep precedence).
    With a token the page asks for it as the password (any user name)."""
    demo = build(queue)
    demo.queue(default_concurrency_limit=16)
    auth = None
    if token:

        def auth(user: str, password: str) -> bool:
            return secrets.compare_digest(password.encode(), token.encode())

    return gr.mount_gradio_app(app, demo, path=path, auth=auth, allowed_paths=[str(queue.outputs)], css=CSS,
                               auth_message="FramePack: the password is the server's token")  # fmt: skip


def share(host: str, port: int) -> str:
    """Open a public Gradio share link to the local server (needs the internet); returns its URL."""
    from gradio import networking

    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return networking.setup_tunnel(local, port, secrets.token_urlsafe(32), None, None)
