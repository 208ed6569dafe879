"""Section schedules against tables written by hand from spec §3 (not derived from the code)."""

from __future__ import annotations

import pytest
import torch

from framepack.sections import (
    ForwardSchedule,
    InvertedSchedule,
    make_schedule,
    pixel_frames,
    section_count,
)

# Inverted (original) index layout at window 9 for each padding value: (latent, clean [pre, post], 2x, 4x).
INVERTED_INDICES = {
    0: (list(range(1, 10)), [0, 10], [11, 12], list(range(13, 29))),
    1: (list(range(10, 19)), [0, 19], [20, 21], list(range(22, 38))),
    2: (list(range(19, 28)), [0, 28], [29, 30], list(range(31, 47))),
    3: (list(range(28, 37)), [0, 37], [38, 39], list(range(40, 56))),
}
# F1 at window 9: [start 0 | 4x 1..16 | 2x 17,18 | 1x 19 | window 20..28]
FORWARD_INDICES = (list(range(20, 29)), [0, 19], [17, 18], list(range(1, 17)))

PADDINGS = {
    1: [0],
    2: [1, 0],
    4: [3, 2, 1, 0],
    5: [3, 2, 2, 1, 0],
    6: [3, 2, 2, 2, 1, 0],
    50: [3] + [2] * 47 + [1, 0],
}


@pytest.mark.parametrize("n", sorted(PADDINGS))
def test_inverted_paddings_and_indices(n):
    sched = InvertedSchedule(9)
    sections = sched.sections(n)
    assert [s.padding for s in sections] == PADDINGS[n]
    history = sched.start(torch.zeros(1, 4, 1, 2, 2))
    for s in sections:
        ctx = sched.context(history, s)
        latent, clean, x2, x4 = INVERTED_INDICES[s.padding]
        assert ctx.latent_indices.tolist() == [latent]
        assert ctx.clean_latent_indices.tolist() == [clean]
        assert ctx.clean_latent_2x_indices.tolist() == [x2]
        assert ctx.clean_latent_4x_indices.tolist() == [x4]


@pytest.mark.parametrize("n", sorted(PADDINGS))
def test_forward_indices_never_change(n):
    sched = ForwardSchedule(9)
    history = sched.start(torch.zeros(1, 4, 1, 2, 2))
    for s in sched.sections(n):
        ctx = sched.context(history, s)
        assert s.padding == 0
        names = ("latent_indices", "clean_latent_indices", "clean_latent_2x_indices", "clean_latent_4x_indices")
        assert [getattr(ctx, n).tolist()[0] for n in names] == list(FORWARD_INDICES)


def _run(sched, n, window=9):
    """Generate fake sections whose latent frame j of section i holds the value 100*(i+1) + j (start = -1).

    Returns, per section, the per-frame values seen in each context slot, what was decoded and the total.
    """
    start = torch.full((1, 1, 1, 1, 1), -1.0)
    history = sched.start(start)
    seen = []
    for s in sched.sections(n):
        ctx = sched.context(history, s)
        slots = ("clean_latents", "clean_latents_2x", "clean_latents_4x")
        vals = {k: getattr(ctx, k)[0, 0, :, 0, 0].tolist() for k in slots}
        gen = (100 * (s.index + 1) + torch.arange(window, dtype=torch.float32)).view(1, 1, window, 1, 1)
        history = sched.append(history, s, gen)
        vals["decoded"] = sched.to_decode(history, s)[0, 0, :, 0, 0].tolist()
        vals["total"] = history.total
        seen.append(vals)
    return seen


def g(i, a, b):
    """Frames a..b-1 of generated section i (0-based), as the fake values."""
    return [100.0 * (i + 1) + j for j in range(a, b)]


def test_inverted_history_provenance_four_sections():
    s = _run(InvertedSchedule(9), 4)
    z = [0.0]
    # section 0 (p=3): nothing generated yet: (start, zero) and zeros at 2x / 4x
    assert s[0]["clean_latents"] == [-1, 0]
    assert s[0]["clean_latents_2x"] == z * 2 and s[0]["clean_latents_4x"] == z * 16
    # section 1 (p=2): the future is section 0: 1x its first frame, 2x the next two, 4x the rest then zeros
    assert s[1]["clean_latents"] == [-1, 100] and s[1]["clean_latents_2x"] == g(0, 1, 3)
    assert s[1]["clean_latents_4x"] == g(0, 3, 9) + z * 10
    # section 2 (p=1): nearest future is section 1, then section 0
    assert s[2]["clean_latents"] == [-1, 200] and s[2]["clean_latents_2x"] == g(1, 1, 3)
    assert s[2]["clean_latents_4x"] == g(1, 3, 9) + g(0, 0, 9) + z
    # section 3 (p=0, last): section 2, then 1, then the first frame of section 0
    assert s[3]["clean_latents"] == [-1, 300]
    assert s[3]["clean_latents_4x"] == g(2, 3, 9) + g(1, 0, 9) + g(0, 0, 1)
    # decoded latents: all of section 0 first, then the newest 2 windows; the last adds the start frame
    assert s[0]["decoded"] == g(0, 0, 9)
    assert s[1]["decoded"] == g(1, 0, 9) + g(0, 0, 9)
    assert s[2]["decoded"] == g(2, 0, 9) + g(1, 0, 9)
    assert s[3]["decoded"] == [-1] + g(3, 0, 9) + g(2, 0, 9)
    assert [x["total"] for x in s] == [9, 18, 27, 37]


def test_inverted_single_section_includes_start():
    s = _run(InvertedSchedule(9), 1)
    assert s[0]["clean_latents"] == [-1, 0]
    assert s[0]["decoded"] == [-1] + g(0, 0, 9) and s[0]["total"] == 10


def test_forward_history_provenance_three_sections():
    s = _run(ForwardSchedule(9), 3)
    z = [0.0]
    assert s[0]["clean_latents"] == [-1, -1]
    assert s[0]["clean_latents_2x"] == z * 2 and s[0]["clean_latents_4x"] == z * 16
    # section 1: last 19 frames of [zeros, start, section 0] = 9 zeros, start, 100..108
    assert s[1]["clean_latents"] == [-1, 108] and s[1]["clean_latents_2x"] == g(0, 6, 8)
    assert s[1]["clean_latents_4x"] == z * 9 + [-1] + g(0, 0, 6)
    # section 2: last 19 = start, section 0, section 1
    assert s[2]["clean_latents"] == [-1, 208] and s[2]["clean_latents_2x"] == g(1, 6, 8)
    assert s[2]["clean_latents_4x"] == [-1] + g(0, 0, 9) + g(1, 0, 6)
    assert s[0]["decoded"] == [-1] + g(0, 0, 9)
    assert s[1]["decoded"] == g(0, 0, 9) + g(1, 0, 9)
    assert s[2]["decoded"] == g(1, 0, 9) + g(2, 0, 9)
    assert [x["total"] for x in s] == [10, 19, 28]


@pytest.mark.parametrize("n", sorted(PADDINGS))
@pytest.mark.parametrize("kind", ["inverted", "forward"])
def test_latent_totals_and_pixel_frames(kind, n):
    s = _run(make_schedule(kind, 9), n)
    assert s[-1]["total"] == 9 * n + 1
    assert pixel_frames(n, 9) == 36 * n + 1
    # pixels added per section: first decode 4T-3 frames, later 4*len(decoded)-3 minus the 33-frame overlap
    added = [4 * len(x["decoded"]) - 3 - (33 if i else 0) for i, x in enumerate(s)]
    assert sum(added) == 36 * n + 1


def test_history_is_bounded():
    """The retained latent window never grows: constant memory whatever the video length."""
    for sched in (InvertedSchedule(9), ForwardSchedule(9)):
        h = sched.start(torch.zeros(1, 2, 1, 4, 4))
        for s in sched.sections(50):
            h = sched.append(h, s, torch.ones(1, 2, 9, 4, 4))
            assert h.latents.shape[2] == 19
        assert h.total == 451


@pytest.mark.parametrize(
    "seconds,window,expected",
    [(1, 9, 1), (3, 9, 2), (5, 9, 4), (10, 9, 8), (60, 9, 50), (120, 9, 100), (0.1, 9, 1), (5, 18, 2), (6, 9, 5)],
)
def test_section_count(seconds, window, expected):
    assert section_count(seconds, window) == expected  # 3 s: 2.5 rounds half to even -> 2


def test_other_windows_frame_arithmetic():
    for window in (1, 5, 18, 33):
        for kind in ("inverted", "forward"):
            s = _run(make_schedule(kind, window), 3, window)
            overlap = 4 * window - 3
            added = [4 * len(x["decoded"]) - 3 - (overlap if i else 0) for i, x in enumerate(s)]
            assert sum(added) == 4 * (window * 3 + 1) - 3


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match=r"latent window size must be 1\.\.33"):
        InvertedSchedule(0)
    with pytest.raises(ValueError, match="unknown section schedule 'sideways'"):
        make_schedule("sideways")
