"""Section controls: what conditions each section beyond the start image, resolved to sections.

A video of N sections at latent window `w` is cut at section boundaries every 4w/30 s (1.2 s at the
default window): boundary j (0..N) is at j * 4w/30 s, and video section k spans boundaries k..k+1.
User times are snapped to the nearest boundary and the snapped times are reported back.

  * Timestamped prompts `[0s: a man waves] [2.5s: he jumps]`: video section k uses the prompt whose
    snapped time is the latest <= its start; optionally the section where a prompt changes blends the
    old and the new embedding half and half.
  * Keyframes (images pinned at times) and the end frame are *anchors*: a clean latent placed in the
    1x context slot of one section. Which section is the schedule's to say (`framepack.sections`).
    Inverted (original): the anchor at boundary j is the clean "future" frame of video section j-1
    (the section that ends there); the end frame is the anchor at boundary N. Forward (F1): the anchor
    at boundary j replaces the newest-past frame of video section j (the section that starts there);
    F1 has no end frame.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from framepack.config import RequestError
from framepack.sections import FPS, VAE_TIME_FACTOR, Schedule, ScheduleError


class ControlError(RequestError):
    """A malformed or impossible section control; the message says what is wrong and what is accepted."""


def section_seconds(window: int) -> float:
    return VAE_TIME_FACTOR * window / FPS


def snap(seconds: float, sections: int, window: int) -> int:
    """Nearest section boundary (0..sections) of a time in seconds (halves go up)."""
    return min(sections, max(0, int(seconds / section_seconds(window) + 0.5)))


_TIME = re.compile(r"^(\d+(?:\.\d+)?)\s*s?$")
_TIMELIKE = re.compile(r"^\s*[-+.\d]")  # a bracket group that starts like a number means a time
_TIMED = re.compile(r"(?<!\\)\[\s*[-+.\d]")  # anywhere in a text: a group that starts with a time
_ESCAPES = "a bracket that is part of a prompt is written \\[ or \\]"


def _unescape(text: str) -> str:
    return text.replace("\\[", "[").replace("\\]", "]")


def _groups(text: str) -> list[tuple[int, int, str]]:
    """(start, end, inside) of every unescaped [...] group; ControlError for one left open."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 2] in ("[", "]"):
            i += 2
        elif text[i] == "[":
            j = i + 1
            while j < len(text) and text[j] not in "[]":
                j += 2 if text[j] == "\\" and text[j + 1 : j + 2] in ("[", "]") else 1
            if j >= len(text) or text[j] == "[":
                what = "a [ is not closed" if j >= len(text) else "a [ inside a [TIME: prompt] block"
                raise ControlError(f"malformed timestamped prompt near {text[i : i + 40]!r}: {what}; expected "
                                   f"[TIME: prompt] blocks such as '[0s: a man waves] [2.5s: he jumps]' "
                                   f"({_ESCAPES})")  # fmt: skip
            out.append((i, j + 1, text[i + 1 : j]))
            i = j + 1
        else:
            i += 1
    return out


def parse_prompts(text: str) -> list[tuple[float, str]]:
    """'[0s: a man waves] [2.5s: he jumps]' -> [(0.0, 'a man waves'), (2.5, 'he jumps')].

    A prompt is timestamped when a bracket group in it starts with a time ('[2.5s: ...'); then all of
    it must be [TIME: prompt] blocks. Times are seconds ('2.5s' or '2.5'), start at 0 and increase;
    every prompt must be non-empty. Any other text is one prompt for the whole video, brackets and
    all ('a man [wearing a hat] walks'). A bracket inside a timestamped prompt is written \\[ or \\].
    """
    text = text.strip()
    if not text:
        raise ControlError("the prompt is empty")
    if not _TIMED.search(text):
        return [(0.0, _unescape(text))]
    groups = _groups(text)
    items, pos = [], 0
    for start, end, inside in groups:
        between = text[pos:start].strip()
        if between:
            raise ControlError(f"text outside brackets: {between!r}; write each prompt as [TIME: prompt] ({_ESCAPES})")
        time, sep, prompt = inside.partition(":")
        if not sep or not _TIMELIKE.match(inside):
            raise ControlError(
                f"malformed timestamped prompt near {text[start:end][:40]!r}: expected [TIME: prompt] blocks such "
                f"as '[0s: a man waves] [2.5s: he jumps]' ({_ESCAPES})"
            )
        items.append((_parse_time(time), _unescape(prompt)))
        pos = end
    rest = text[pos:].strip()
    if rest:
        raise ControlError(f"text outside brackets: {rest!r}; write each prompt as [TIME: prompt] ({_ESCAPES})")
    return check_prompts(items)


def _parse_time(token: str) -> float:
    m = _TIME.match(token.strip())
    if not m:
        raise ControlError(f"bad time {token!r} in a timestamped prompt: use seconds such as 0s, 2.5s or 4")
    return float(m.group(1))


def check_prompts(prompts: list[tuple[float, str]]) -> list[tuple[float, str]]:
    if not prompts:
        raise ControlError("no prompts given")
    for t, p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ControlError(f"the prompt at {t:g}s is empty")
        if not isinstance(t, (int, float)) or t < 0:
            raise ControlError(f"prompt times must be seconds >= 0, got {t!r}")
    if prompts[0][0] != 0:
        raise ControlError(f"the first prompt must start at 0s (it starts at {prompts[0][0]:g}s)")
    for (t0, _), (t1, _) in itertools.pairwise(prompts):
        if t1 <= t0:
            raise ControlError(f"prompt times must increase: {t1:g}s comes after {t0:g}s")
    return [(float(t), p.strip()) for t, p in prompts]


@dataclass(frozen=True)
class SectionPrompt:
    prompt: str
    blend_from: str | None = None  # blend half and half with this (the previous) prompt


def prompts_per_section(
    prompts: list[tuple[float, str]], sections: int, window: int, *, blend: bool = False
) -> tuple[list[SectionPrompt], list[float]]:
    """The prompt of every video section (video order) and the snapped start time of every prompt."""
    length = sections * section_seconds(window)
    starts = []
    for t, _ in prompts:
        if t > 0 and t >= length:
            raise ControlError(f"a prompt starts at {t:g}s, at or after the end of the {length:.2f}s video")
        starts.append(snap(t, sections, window))
    for (t0, _), (t1, _), j0, j1 in zip(prompts, prompts[1:], starts, starts[1:]):
        if j1 == j0:
            raise ControlError(
                f"prompts at {t0:g}s and {t1:g}s both start section {j0 + 1} (sections are "
                f"{section_seconds(window):.2f}s long); put them at least one section apart"
            )
    out = []
    for k in range(sections):
        i = max(i for i, j in enumerate(starts) if j <= k)
        prev = prompts[i - 1][1] if blend and i > 0 and starts[i] == k else None
        out.append(SectionPrompt(prompts[i][1], prev))
    return out, [j * section_seconds(window) for j in starts]


@dataclass(frozen=True)
class Anchor:
    source: str  # "end" or "keyframe N"
    boundary: int  # section boundary index (0..N) the image is pinned to
    video_section: int  # the video-order section whose 1x context slot it fills
    seconds: float  # snapped time


def place_anchors(keyframes: list[float], schedule: Schedule, sections: int, *, end_frame: bool) -> list[Anchor]:
    """Which section each keyframe (times in seconds) and the end frame condition: the schedule says
    (`Schedule.anchor_section`, `Schedule.end_frame_section`); see the module docstring."""
    window = schedule.window
    length = sections * section_seconds(window)
    anchors = []
    if end_frame:
        try:
            anchors.append(Anchor("end", sections, schedule.end_frame_section(sections), length))
        except ScheduleError as err:
            raise ControlError(str(err)) from None
    for i, t in enumerate(keyframes):
        if t < 0 or t > length:
            raise ControlError(f"keyframe {i + 1} at {t:g}s is outside the {length:.2f}s video")
        j = snap(t, sections, window)
        where = f"keyframe {i + 1} at {t:g}s (snapped to {j * section_seconds(window):.2f}s)"
        if j == 0:
            raise ControlError(f"{where} is the start of the video: use it as the start image instead")
        try:
            video_section = schedule.anchor_section(j, sections)
        except ScheduleError as err:
            raise ControlError(f"{where} {err}") from None
        if end_frame and video_section == anchors[0].video_section:
            raise ControlError(f"{where} falls on the end frame; drop one of them")
        if any(a.video_section == video_section for a in anchors):
            raise ControlError(f"{where} conditions the same section as another keyframe; space them a section apart")
        anchors.append(Anchor(f"keyframe {i + 1}", j, video_section, j * section_seconds(window)))
    return anchors
