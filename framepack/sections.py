"""Section schedules: the order sections are generated in, what context each one sees, where it goes.

Two strategies, chosen by the registry (never by `if variant == ...` in the loop):

  InvertedSchedule  the original FramePack ("anti-drifting"): the video is built back to front. Every
                    section sees the start frame at index 0, a gap of `padding * window` unused RoPE
                    positions, its own window, then the nearest *future* frame (1x) and more future
                    frames at 2x / 4x compression. The last generated section is the video's beginning.
  ForwardSchedule   F1: sections are generated in time order; context is the start frame plus the most
                    recent past frames at 4x / 2x / 1x.

Both keep only a bounded window of latent history (enough for context and for decoding the newest
frames), so the cost and memory of a section do not depend on how long the video already is.

Frame arithmetic at latent window `lws` (spec §3): a section denoises `lws` latent frames; N sections
give lws*N + 1 latent frames (the start frame included) = 4*(lws*N + 1) - 3 pixel frames (36N+1 at 9).
Adjacent decoded sections cross-fade over `4*lws - 3` frames.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

CONTEXT_1X, CONTEXT_2X, CONTEXT_4X = 1, 2, 16  # history frames packed at each compression
FPS = 30
VAE_TIME_FACTOR = 4


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
    """The transformer's context kwargs for one section (official names)."""

    latent_indices: torch.Tensor  # (1, window)
    clean_latents: torch.Tensor  # (B, C, 2, h, w)
    clean_latent_indices: torch.Tensor  # (1, 2)
    clean_latents_2x: torch.Tensor  # (B, C, 2, h, w)
    clean_latent_2x_indices: torch.Tensor  # (1, 2)
    clean_latents_4x: torch.Tensor  # (B, C, 16, h, w)
    clean_latent_4x_indices: torch.Tensor  # (1, 16)

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


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


class _Schedule:
    direction: str
    window: int

    def __init__(self, window: int = 9) -> None:
        if not 1 <= window <= 33:
            raise ValueError(f"latent window size must be 1..33 (official slider range), got {window}")
        self.window = window

    @property
    def keep(self) -> int:
        # enough history for the packed context (1 + 2 + 16) and for decoding 2 windows (+1 at the start)
        return max(CONTEXT_1X + CONTEXT_2X + CONTEXT_4X, 2 * self.window + 1)

    def sections(self, count: int) -> list[Section]:
        raise NotImplementedError

    def overlap(self) -> int:
        return overlap_frames(self.window)


class InvertedSchedule(_Schedule):
    """Original FramePack: back to front, with the padding schedule [3] + [2]*(N-3) + [1, 0] for N > 4."""

    direction = "backward"

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

    def start(self, start_latent: torch.Tensor) -> History:
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


class ForwardSchedule(_Schedule):
    """F1: front to back; context = start frame + the most recent 16 / 2 / 1 frames at 4x / 2x / 1x."""

    direction = "forward"

    def sections(self, count: int) -> list[Section]:
        lws = self.window
        return [Section(i, count, 0, (1 + lws * i, 1 + lws * (i + 1))) for i in range(count)]

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


SCHEDULES = {"inverted": InvertedSchedule, "forward": ForwardSchedule}


def make_schedule(kind: str, window: int = 9) -> InvertedSchedule | ForwardSchedule:
    try:
        return SCHEDULES[kind](window)
    except KeyError:
        raise ValueError(f"unknown section schedule {kind!r}; expected one of {sorted(SCHEDULES)}") from None
