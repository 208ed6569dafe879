"""Section schedules: the order sections are generated in, what context each one sees, where it goes.

`Schedule` is the protocol (an abstract base class): everything the models differ in lives behind it,
so no other module asks which schedule it has. Two implementations, chosen by the registry:

  InvertedSchedule  the original FramePack ("anti-drifting"): the video is built back to front. Every
                    section sees the start frame at index 0, a gap of `padding * window` unused RoPE
                    positions, its own window, then the nearest *future* frame (1x) and more future
                    frames at 2x / 4x compression. The last generated section is the video's beginning.
  ForwardSchedule   F1: sections are generated in time order; context is the start frame plus the most
                    recent past frames at 4x / 2x / 1x.
  OneFrameSchedule  one-frame inference (image editing, "1f" / kisekaeichi): one section of one target
                    latent frame at a chosen RoPE index, with control images as clean context
                    (`FrameLayout`); the original model only.

Both keep only a bounded window of latent history (enough for context and for decoding the newest
frames), so the cost and memory of a section do not depend on how long the video already is.

Frame arithmetic at latent window `lws` (spec §3): a section denoises `lws` latent frames; N sections
give lws*N + 1 latent frames (the start frame included) = 4*(lws*N + 1) - 3 pixel frames (36N+1 at 9).
Adjacent decoded sections cross-fade over `4*lws - 3` frames.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

CONTEXT_1X, CONTEXT_2X, CONTEXT_4X = 1, 2, 16  # history frames packed at each compression
FPS = 30
VAE_TIME_FACTOR = 4
T = TypeVar("T")  # frames of an input video: a numpy array or a tensor, time first


def section_count(seconds: float, window: int) -> int:
    """The official count: max(round(seconds * 30 / (window * 4)), 1); Python's round (halves to even)."""
    return int(max(round(seconds * FPS / (window * VAE_TIME_FACTOR)), 1))


def latent_frames(sections: int, window: int) -> int:
    return window * sections + 1


def pixel_frames(sections: int, window: int) -> int:
    return VAE_TIME_FACTOR * latent_frames(sections, window) - 3


def overlap_frames(window: int) -> int:
    """Pixel frames two adjacent decoded sections share and cross-fade."""
    return VAE_TIME_FACTOR * window - 3


@dataclass(frozen=True)
class Section:
    index: int  # generation order, 0-based
    count: int  # sections in the video
    padding: int  # inverted schedule: blank RoPE gap in windows; forward: 0
    latent_range: tuple[int, int]  # latent frames of the final video this section produces: [start, stop)

    @property
    def video_index(self) -> int:
        """Position in the finished video (0 = the part right after the start frame)."""
        return (self.latent_range[0] - 1) // (self.latent_range[1] - self.latent_range[0])

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1


@dataclass(frozen=True)
class Context:
    """The transformer's context kwargs for one section (official names). A part left None is not
    passed at all (the official model accepts any subset of the 1x / 2x / 4x parts)."""

    latent_indices: torch.Tensor  # (1, window)
    clean_latents: torch.Tensor | None = None  # (B, C, 2, h, w)
    clean_latent_indices: torch.Tensor | None = None  # (1, 2)
    clean_latents_2x: torch.Tensor | None = None  # (B, C, 2, h, w)
    clean_latent_2x_indices: torch.Tensor | None = None  # (1, 2)
    clean_latents_4x: torch.Tensor | None = None  # (B, C, 16, h, w)
    clean_latent_4x_indices: torch.Tensor | None = None  # (1, 16)

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return {k: v for k in self.__dataclass_fields__ if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class History:
    """What later sections need of the earlier ones: a bounded latent window (fp32, on the CPU)."""

    start: torch.Tensor  # (B, C, 1, h, w) the start image's latent
    latents: torch.Tensor  # (B, C, K, h, w) retained window: inverted newest first, forward newest last
    total: int  # latent frames of the video generated so far (the start frame counted when it is in)
    extended: bool = False  # continues an input video: its frames are already decoded, so the first
    # generated section decodes like a later one (the newest two windows) and cross-fades with them


def _split(indices: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    return list(indices.split(widths, dim=1))


class ScheduleError(ValueError):
    """A request a schedule cannot carry out (an end frame for F1, say); the message says why."""


class Schedule(ABC):
    """What a section schedule owns: everything the original and F1 models differ in.

    The pipeline, the section controls, the inputs, the video assembler and the trainer only call
    these; none of them asks which schedule it has. A new schedule (one-frame inference, say) is a new
    subclass registered in `SCHEDULES`, not new branches elsewhere.

      sections / sections_for   the generation order and where each section lands in the video
      start / append            the bounded latent history: its start, and each section's latents into it
      context                   the transformer's packed 1x / 2x / 4x context and frame indices (+ an anchor)
      to_decode / overlap       which latents a finished section decodes, how many frames neighbours share
      grows_at                  which end of the video a new section lands on ("end" or "start")
      anchor_section / end_frame_section   which section an image pinned at a boundary conditions
      extend                    what of an input video it continues from (start frame, context frames)
    """

    name: str  # registry name (`ModelSpec.schedule`)
    grows_at: str  # "end": sections are appended to the video; "start": prepended (built back to front)
    start_optional: bool = False  # still meaningful with the start frame zeroed (the no-anti-drifting baseline)
    title_suffix: str = ""  # how front ends name the family ("FramePack" + suffix)
    order_note: str | None = None  # what a user should know about the order sections appear in

    def __init__(self, window: int = 9) -> None:
        if not 1 <= window <= 33:
            raise ValueError(f"latent window size must be 1..33 (official slider range), got {window}")
        self.window = window

    @property
    def section_latents(self) -> int:
        """Latent frames one section denoises (the noise it starts from)."""
        return self.window

    @property
    def keep(self) -> int:
        # enough history for the packed context (1 + 2 + 16) and for decoding 2 windows (+1 at the start)
        return max(CONTEXT_1X + CONTEXT_2X + CONTEXT_4X, 2 * self.window + 1)

    def sections_for(self, seconds: float) -> list[Section]:
        """The sections of a video of about `seconds` (the official count), in generation order."""
        return self.sections(section_count(seconds, self.window))

    def frames(self, sections: int) -> int:
        """Pixel frames of a video of `sections` sections."""
        return pixel_frames(sections, self.window)

    def overlap(self) -> int:
        """Pixel frames two adjacent decoded sections share and cross-fade."""
        return overlap_frames(self.window)

    @abstractmethod
    def sections(self, count: int) -> list[Section]:
        """`count` sections in generation order."""

    def conditioning_key(self, section: Section) -> tuple:
        """What a section's context, history update and decode depend on besides the history itself:
        a branch may keep a section made in another video only where the keys are equal."""
        return section.padding, section.is_first, section.is_last

    @abstractmethod
    def start(self, start_latent: torch.Tensor, prefix: torch.Tensor | None = None) -> History:
        """The history before the first section: the start latent (B, C, 1, h, w) and, when an input
        video is continued, the latents of its last frames (`prefix`, (B, C, K, h, w); see `extend`)."""

    @abstractmethod
    def context(self, history: History, section: Section, anchor: torch.Tensor | None = None) -> Context:
        """The section's packed context; `anchor` (B, C, 1, h, w) replaces its 1x history frame."""

    @abstractmethod
    def append(self, history: History, section: Section, generated: torch.Tensor) -> History:
        """The history after `section` generated `generated` (B, C, window, h, w)."""

    @abstractmethod
    def to_decode(self, history: History, section: Section) -> torch.Tensor:
        """The latents whose pixels `section` adds to the video (decoded together, then cross-faded)."""

    @abstractmethod
    def anchor_section(self, boundary: int, sections: int) -> int:
        """The video-order section whose 1x context slot an image pinned at `boundary` (1..sections)
        fills; ScheduleError (the reason, to follow "keyframe k at ...") where none can."""

    @abstractmethod
    def end_frame_section(self, sections: int) -> int:
        """The video-order section an end frame conditions; ScheduleError where the schedule has none."""

    @abstractmethod
    def extend(self, first: T, tail: T, context_frames: int) -> tuple[T, T | None]:
        """Continuing an input video (frames on the first axis): (the frame that becomes the start image,
        the last frames to encode into the context or None) from its `first` frame and its `tail`."""


class InvertedSchedule(Schedule):
    """Original FramePack: back to front, with the padding schedule [3] + [2]*(N-3) + [1, 0] for N > 4.

    Video extension: the input's last frame is the start image, so the generated video begins with it
    (re-encoded) and follows the input; no more of the input is needed. Anchors: the image pinned at boundary j
    is the clean "future" frame of video section j-1 (the section that ends there); the end frame is
    the one at the last boundary.
    """

    name = "inverted"
    grows_at = "start"
    order_note = (
        "Note that the ending actions will be generated before the starting actions due to the inverted "
        "sampling. If the starting action is not in the video, you just need to wait, and more sections will "
        "be generated."
    )

    @staticmethod
    def paddings(count: int) -> list[int]:
        if count > 4:
            return [3] + [2] * (count - 3) + [1, 0]
        return list(reversed(range(count)))

    def sections(self, count: int) -> list[Section]:
        lws = self.window
        return [
            Section(i, count, p, (1 + lws * (count - 1 - i), 1 + lws * (count - i)))
            for i, p in enumerate(self.paddings(count))
        ]

    def start(self, start_latent: torch.Tensor, prefix: torch.Tensor | None = None) -> History:
        b, c, _, h, w = start_latent.shape
        zeros = torch.zeros(b, c, self.keep, h, w, dtype=torch.float32)  # the "future" beyond the video's end
        return History(start_latent.float().cpu(), zeros, total=0)

    def context(self, history: History, section: Section, anchor: torch.Tensor | None = None) -> Context:
        """`anchor` (B, C, 1, h, w): a clean latent to use as the nearest future frame instead of the
        history's (end frame or keyframe)."""
        lws, p = self.window, section.padding * self.window
        idx = torch.arange(1 + p + lws + CONTEXT_1X + CONTEXT_2X + CONTEXT_4X)[None]
        pre, _blank, latent, post, x2, x4 = _split(idx, [1, p, lws, CONTEXT_1X, CONTEXT_2X, CONTEXT_4X])
        h = history.latents
        return Context(
            latent_indices=latent,
            clean_latents=torch.cat(
                [history.start, h[:, :, :1] if anchor is None else anchor], dim=2
            ),  # (start, future)
            clean_latent_indices=torch.cat([pre, post], dim=1),
            clean_latents_2x=h[:, :, 1:3],
            clean_latent_2x_indices=x2,
            clean_latents_4x=h[:, :, 3:19],
            clean_latent_4x_indices=x4,
        )

    def append(self, history: History, section: Section, generated: torch.Tensor) -> History:
        new = generated.float().cpu()
        if section.is_last:  # the video's first frame is the start image itself
            new = torch.cat([history.start, new], dim=2)
        latents = torch.cat([new, history.latents], dim=2)[:, :, : self.keep]  # prepend: newest first
        return replace(history, latents=latents, total=history.total + new.shape[2])

    def to_decode(self, history: History, section: Section) -> torch.Tensor:
        """Latents whose pixels this section adds: all of them at first, then the newest 2 windows (+1)."""
        real = history.latents[:, :, : history.total]
        if section.is_first:
            return real
        return real[:, :, : 2 * self.window + (1 if section.is_last else 0)]

    def anchor_section(self, boundary: int, sections: int) -> int:
        return boundary - 1  # the section that ends at the boundary sees it as its nearest future frame

    def end_frame_section(self, sections: int) -> int:
        return sections - 1

    def extend(self, first: T, tail: T, context_frames: int) -> tuple[T, T | None]:
        return tail[-1], None


class ForwardSchedule(Schedule):
    """F1: front to back; context = start frame + the most recent 16 / 2 / 1 frames at 4x / 2x / 1x.

    Video extension: the input's first frame stays the start image (the anchor against drift) and its
    last `context_frames` frames are the recent past the first section continues from. Anchors: the
    image pinned at boundary j replaces the newest past frame of video section j (the section that
    starts there); there is no end frame.
    """

    name = "forward"
    grows_at = "end"
    start_optional = True
    title_suffix = "-F1"

    def sections(self, count: int) -> list[Section]:
        lws = self.window
        return [Section(i, count, 0, (1 + lws * i, 1 + lws * (i + 1))) for i in range(count)]

    def conditioning_key(self, section: Section) -> tuple:
        return (section.is_first,)  # no padding, and the last section is like any other: a video can grow

    def start(self, start_latent: torch.Tensor, prefix: torch.Tensor | None = None) -> History:
        """`prefix` (B, C, K, h, w): latents of an input video's last frames to continue from."""
        b, c, _, h, w = start_latent.shape
        start = start_latent.float().cpu()
        past = start if prefix is None else prefix.float().cpu()[:, :, -self.keep :]
        zeros = torch.zeros(b, c, self.keep - past.shape[2], h, w, dtype=torch.float32)  # before the start
        return History(start, torch.cat([zeros, past], dim=2), total=past.shape[2], extended=prefix is not None)

    def context(self, history: History, section: Section, anchor: torch.Tensor | None = None) -> Context:
        """`anchor` (B, C, 1, h, w): a clean latent to use as the newest past frame (a keyframe)."""
        lws = self.window
        idx = torch.arange(1 + CONTEXT_4X + CONTEXT_2X + CONTEXT_1X + lws)[None]
        start, x4, x2, x1, latent = _split(idx, [1, CONTEXT_4X, CONTEXT_2X, CONTEXT_1X, lws])
        recent = history.latents[:, :, -(CONTEXT_4X + CONTEXT_2X + CONTEXT_1X) :]  # oldest to newest
        c4, c2, c1 = recent.split([CONTEXT_4X, CONTEXT_2X, CONTEXT_1X], dim=2)
        return Context(
            latent_indices=latent,
            clean_latents=torch.cat([history.start, c1 if anchor is None else anchor], dim=2),  # (start, newest past)
            clean_latent_indices=torch.cat([start, x1], dim=1),
            clean_latents_2x=c2,
            clean_latent_2x_indices=x2,
            clean_latents_4x=c4,
            clean_latent_4x_indices=x4,
        )

    def append(self, history: History, section: Section, generated: torch.Tensor) -> History:
        latents = torch.cat([history.latents, generated.float().cpu()], dim=2)[:, :, -self.keep :]
        return replace(history, latents=latents, total=history.total + generated.shape[2])

    def to_decode(self, history: History, section: Section) -> torch.Tensor:
        real = history.latents[:, :, -min(history.total, history.latents.shape[2]) :]
        if section.is_first and not history.extended:
            return real
        return real[:, :, -2 * self.window :]

    def anchor_section(self, boundary: int, sections: int) -> int:
        if boundary >= sections:
            raise ScheduleError("is the end of the video: F1 has no section after it (the original can)")
        return boundary  # the section that starts at the boundary sees it as its newest past frame

    def end_frame_section(self, sections: int) -> int:
        raise ScheduleError("an end frame needs the original (inverted) model: F1 only generates forward")

    def extend(self, first: T, tail: T, context_frames: int) -> tuple[T, T | None]:
        return first, tail[-context_frames:]


EDIT_INDEX_WARN = 40  # target / control indices above this are beyond what the official model was seen to hold
EDIT_INDEX_MAX = 100


@dataclass(frozen=True)
class FrameLayout:
    """Where a one-frame edit puts things on the RoPE time axis, at latent window W:

        target        latent_indices = [target]                                (default W)
        controls      clean_latents = the control latents at `controls`         (default: the start image at 0)
        post          a zero latent at W + 1 appended to clean_latents          (unless post=False)
        2x            2 zero latents at W + 2, W + 3                            (unless x2=False: no 2x part)
        4x            16 zero latents at W + 4 .. W + 19                        (unless x4=False: no 4x part)

    These are the positions of a 1-section inverted video (padding 0), with one noisy frame left."""

    target: int
    controls: tuple[int, ...] = (0,)
    post: bool = True
    x2: bool = True
    x4: bool = True

    def positions(self, window: int) -> dict[str, list[int]]:
        """Every part's indices, by the name a user knows it under."""
        out = {"target": [self.target]}
        out.update({f"control {i + 1}": [c] for i, c in enumerate(self.controls)})
        if self.post:
            out["zero post latent"] = [window + 1]
        if self.x2:
            out["2x context"] = [window + 2, window + 3]
        if self.x4:
            out["4x context"] = list(range(window + 4, window + 4 + CONTEXT_4X))
        return out

    def problems(self, window: int) -> tuple[list[str], list[str]]:
        """(errors, warnings): indices out of range, two parts on one index, indices beyond ~40."""
        errors, warnings = [], []
        if not self.controls:
            errors.append("a frame edit needs at least one control image (the start image)")
        for what, idx in self.positions(window).items():
            for i in idx:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= EDIT_INDEX_MAX:
                    errors.append(f"{what} index must be a whole number in 0..{EDIT_INDEX_MAX}, got {i!r}")
        if errors:
            return errors, warnings
        seen: dict[int, str] = {}
        for what, idx in self.positions(window).items():
            for i in idx:
                if i in seen:
                    fix = {"zero post latent": "--no-post", "2x context": "--no-2x", "4x context": "--no-4x"}
                    hint = next((f" (or pass {fix[w]})" for w in (what, seen[i]) if w in fix), "")
                    errors.append(f"{what} and {seen[i]} are both at index {i}; move one of them{hint}")
                else:
                    seen[i] = what
        for what in ("target", *(f"control {i + 1}" for i in range(len(self.controls)))):
            i = self.positions(window)[what][0]
            if i > EDIT_INDEX_WARN:
                warnings.append(f"{what} at index {i}: beyond ~{EDIT_INDEX_WARN} the original model was not seen "
                                "to hold up (expect a washed-out or unrelated frame)")  # fmt: skip
        return errors, warnings


class OneFrameSchedule(Schedule):
    """One-frame inference: a single section that denoises one latent frame, the image "some time
    later", packed with the control latents (masked, in `start`'s `prefix`) as `FrameLayout` says.
    No keyframes, end frame or video extension: those are video controls."""

    name = "one-frame"
    grows_at = "end"

    def __init__(self, window: int = 9, layout: FrameLayout | None = None) -> None:
        super().__init__(window)
        self.layout = layout or FrameLayout(target=window)

    @property
    def section_latents(self) -> int:
        return 1

    def sections(self, count: int = 1) -> list[Section]:
        if count != 1:
            raise ScheduleError(f"a frame edit is one section, not {count}")
        return [Section(0, 1, 0, (1, 2))]

    def sections_for(self, seconds: float) -> list[Section]:
        return self.sections(1)

    def frames(self, sections: int) -> int:
        return 1

    def overlap(self) -> int:
        return 0

    def start(self, start_latent: torch.Tensor, prefix: torch.Tensor | None = None) -> History:
        """`prefix` (B, C, K, h, w): the control latents in layout order (default: the start latent alone)."""
        controls = (start_latent if prefix is None else prefix).float().cpu()
        if controls.shape[2] != len(self.layout.controls):
            raise ScheduleError(f"{controls.shape[2]} control latents for {len(self.layout.controls)} control indices")
        return History(start_latent.float().cpu(), controls, total=0)

    def context(self, history: History, section: Section, anchor: torch.Tensor | None = None) -> Context:
        lay, w = self.layout, self.window
        controls = history.latents[:, :, : len(lay.controls)]  # (B, C, K, h, w)
        b, c, _, h, wd = controls.shape

        def zeros(n: int) -> torch.Tensor:
            return torch.zeros(b, c, n, h, wd, dtype=controls.dtype)

        def at(indices) -> torch.Tensor:
            return torch.tensor([list(indices)], dtype=torch.long)  # (1, n)

        pos = lay.positions(w)
        clean = torch.cat([controls, zeros(1)], dim=2) if lay.post else controls  # (B, C, K [+1], h, w)
        return Context(
            latent_indices=at(pos["target"]),
            clean_latents=clean,
            clean_latent_indices=at([*lay.controls, *pos.get("zero post latent", [])]),
            clean_latents_2x=zeros(CONTEXT_2X) if lay.x2 else None,
            clean_latent_2x_indices=at(pos["2x context"]) if lay.x2 else None,
            clean_latents_4x=zeros(CONTEXT_4X) if lay.x4 else None,
            clean_latent_4x_indices=at(pos["4x context"]) if lay.x4 else None,
        )

    def append(self, history: History, section: Section, generated: torch.Tensor) -> History:
        latents = torch.cat([history.latents[:, :, : len(self.layout.controls)], generated.float().cpu()], dim=2)
        return replace(history, latents=latents, total=1)

    def to_decode(self, history: History, section: Section) -> torch.Tensor:
        return history.latents[:, :, -1:]  # (B, C, 1, h, w): the edited frame

    def anchor_section(self, boundary: int, sections: int) -> int:
        raise ScheduleError("is a video control: a frame edit has no keyframes (use a control image)")

    def end_frame_section(self, sections: int) -> int:
        raise ScheduleError("an end frame is a video control: a frame edit makes one frame")

    def extend(self, first: T, tail: T, context_frames: int) -> tuple[T, T | None]:
        raise ScheduleError("a frame edit starts from an image, not a video")


SCHEDULES: dict[str, type[Schedule]] = {cls.name: cls for cls in (InvertedSchedule, ForwardSchedule,
                                                                  OneFrameSchedule)}  # fmt: skip


def make_schedule(kind: str, window: int = 9) -> Schedule:
    try:
        return SCHEDULES[kind](window)
    except KeyError:
        raise ValueError(f"unknown section schedule {kind!r}; expected one of {sorted(SCHEDULES)}") from None
