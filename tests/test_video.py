"""framepack.video: the official cross-fade and saver mapping, the section assembler, and the MP4 writer.

References are independent of the module: hand-computed numbers, the official full-history loop
written out here with a per-frame weight formula, and the files decoded back with PyAV.
"""

from __future__ import annotations

import itertools
import os

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from framepack.video import (
    OverlapAssembler,
    SectionVideoWriter,
    probe,
    read_frames,
    soft_append,
    to_uint8_frames,
)

H, W = 48, 64
# The spec's section sizes (§3.1/§3.2) at latent window lws = 2 instead of 9: overlap lws*4-3 = 5,
# F1 first section (lws+1)*4-3 = 9, later sections 2*lws*4-3 = 13 (+8 frames each), the original's
# first section lws*4-3 = 5 and its last (2*lws+1)*4-3 = 17.
OVERLAP = 5
FORWARD_SIZES = [9, 13, 13, 13]
BACKWARD_SIZES = [5, 13, 13, 17]


def t1(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values along time as a (1, 1, T, 1, 1) tensor."""
    return torch.tensor(values, dtype=dtype).view(1, 1, -1, 1, 1)


def smooth_section(t: int, seed: int, h: int = H, w: int = W) -> torch.Tensor:
    """(1, 3, t, h, w) in [-1, 1], low-frequency so that H.264 at crf 16 keeps it close."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, t, 3, 4, generator=g) * 1.8 - 0.9
    return F.interpolate(coarse, size=(t, h, w), mode="trilinear", align_corners=True)


def reference_blend(a: torch.Tensor, b: torch.Tensor, overlap: int) -> torch.Tensor:
    """The spec's soft_append, frame by frame in float64: weight of a at blend frame i is 1 - i/(overlap-1)."""
    frames = [a[:, :, i] for i in range(a.shape[2] - overlap)]
    for i in range(overlap):
        wa = 1.0 if overlap == 1 else 1 - i / (overlap - 1)
        frames.append(wa * a[:, :, a.shape[2] - overlap + i] + (1 - wa) * b[:, :, i])
    frames += [b[:, :, i] for i in range(overlap, b.shape[2])]
    return torch.stack(frames, dim=2)


def official_history(sections: list[torch.Tensor], grows_at: str, overlap: int) -> torch.Tensor:
    """The official demos' loop: keep every pixel and blend each new section into all of it."""
    history = sections[0]
    for new in sections[1:]:
        history = soft_append(history, new, overlap) if grows_at == "end" else soft_append(new, history, overlap)
    return history


class SpyWriter:
    """Records what the assembler hands over, as a list of frames in display order."""

    def __init__(self) -> None:
        self.final: list[np.ndarray] = []
        self.pending: np.ndarray | None = None
        self.pending_at = "end"
        self.snapshots: list[np.ndarray] = []
        self.finished = False

    def add_final(self, frames: np.ndarray, at: str = "end") -> None:
        assert frames.dtype == np.uint8 and frames.ndim == 4
        self.final = [*self.final, *frames] if at == "end" else [*frames, *self.final]

    def set_pending(self, frames: np.ndarray | None, at: str = "end") -> None:
        self.pending, self.pending_at = frames, at

    def video(self) -> np.ndarray:
        pend = [] if self.pending is None else list(self.pending)
        return np.stack(pend + self.final if self.pending_at == "start" else self.final + pend)

    def write_snapshot(self) -> None:
        self.snapshots.append(self.video())

    def prepend(self, chunks) -> None:
        self.final = [f for chunk in chunks for f in chunk] + self.final

    def finish(self) -> str:
        self.final = list(self.video())
        self.pending, self.finished = None, True
        return "done"


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------------------------------ soft_append
def test_soft_append_hand_computed_both_orders():
    a, b = t1(1, 2, 3, 4), t1(10, 20, 30, 40, 50)
    # w = [1, 0.5, 0]: blend = [1*2 + 0*10, 0.5*3 + 0.5*20, 0*4 + 1*30]
    assert soft_append(a, b, 3).flatten().tolist() == [1, 2, 11.5, 30, 40, 50]
    # (new, old) order of the original model: b's tail fades into a's head
    assert soft_append(b, a, 3).flatten().tolist() == [10, 20, 30, 21, 3, 4]
    assert soft_append(a, b, 1).flatten().tolist() == [1, 2, 3, 4, 20, 30, 40, 50]  # linspace(1, 0, 1) = [1]
    assert soft_append(a, b, 0).flatten().tolist() == [1, 2, 3, 4, 10, 20, 30, 40, 50]
    assert soft_append(a, b, -2).flatten().tolist() == [1, 2, 3, 4, 10, 20, 30, 40, 50]
    assert soft_append(a, b, 4).shape[2] == 5


def test_soft_append_matches_per_frame_formula_and_casts_to_a():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 7, 2, 3, generator=g), torch.randn(2, 3, 6, 2, 3, generator=g)
    out = soft_append(a, b, 4)
    torch.testing.assert_close(out, reference_blend(a.double(), b.double(), 4).float(), rtol=0, atol=1e-6)
    assert soft_append(a.half(), b, 4).dtype == torch.float16
    assert soft_append(a, b.half(), 4).dtype == torch.float32


def test_soft_append_weights_in_dtype_of_a():
    # fp16 a: the weights are fp16 too. torch's fp16 linspace(1, 0, 4) = [1, 0.6669921875, 0.333251953125, 0];
    # 1 - w rounds to [0, 0.3330078125, 0.6669921875, 1], so blending 1 into -1 gives w - (1 - w) =
    # 0.333984375 and -0.333740234375. fp32 weights would give +-0.333251953125 after the cast.
    out = soft_append(t1(1, 1, 1, 1, dtype=torch.float16), t1(-1, -1, -1, -1, dtype=torch.float16), 4)
    assert out.flatten().tolist() == [1.0, 0.333984375, -0.333740234375, -1.0]


@pytest.mark.parametrize("overlap", [6, 7, 2.0, True])
def test_soft_append_rejects_bad_overlap(overlap):
    short, long = t1(1, 2, 3, 4, 5), t1(1, 2, 3, 4, 5, 6)
    with pytest.raises(ValueError, match="overlap"):
        soft_append(short, long, overlap)
    with pytest.raises(ValueError, match="overlap"):
        soft_append(long, short, overlap)


def test_soft_append_rejects_bad_shapes():
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        soft_append(torch.zeros(1, 3, 4, 2), torch.zeros(1, 3, 4, 2), 1)
    with pytest.raises(ValueError, match="equal batch"):
        soft_append(torch.zeros(1, 3, 4, 2, 2), torch.zeros(1, 3, 4, 2, 4), 1)


# ------------------------------------------------------------------------------------------ to_uint8
def test_to_uint8_frames_hand_computed():
    values = [-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 5.0]
    x = torch.tensor(values).view(1, 1, 1, 1, -1).expand(1, 3, 1, 1, 7).clone()
    x[:, 1] = 0.0  # green channel: 127.5 -> 127
    out = to_uint8_frames(x)
    assert out.shape == (1, 1, 7, 3) and out.dtype == np.uint8
    # x*127.5+127.5 truncated: 0, 0, 63.75, 127.5, 254.87, 255, 255
    assert out[0, 0, :, 0].tolist() == [0, 0, 63, 127, 254, 255, 255]
    assert out[0, 0, :, 1].tolist() == [127] * 7
    assert to_uint8_frames(x.half())[0, 0, :, 0].tolist() == [0, 0, 63, 127, 254, 255, 255]


def test_to_uint8_frames_layout_and_batch_tiling():
    x = torch.full((2, 3, 2, 2, 3), -1.0)
    x[0, 0, 1] = 1.0  # batch 0, red, second frame
    x[1, 2, 0, 1, 2] = 1.0  # batch 1, blue, first frame, row 1, column 2
    out = to_uint8_frames(x)
    assert out.shape == (2, 2, 6, 3)  # (T, H, 2*W, 3), batch side by side
    assert (out[1, :, :3, 0] == 255).all() and out[1, :, 3:].max() == 0 and out[0, :, :, 0].max() == 0
    assert out[0, 1, 3 + 2, 2] == 255 and out[0].sum() == 255


@pytest.mark.parametrize(
    "bad", [torch.zeros(1, 3, 2, 4, 4, dtype=torch.uint8), torch.zeros(3, 2, 4, 4), torch.zeros(1, 4, 2, 4, 4), "x"]
)
def test_to_uint8_frames_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="pixels must"):
        to_uint8_frames(bad)


# ------------------------------------------------------------------------------------------ assembler
@pytest.mark.parametrize("grows_at,sizes", [("end", FORWARD_SIZES), ("start", BACKWARD_SIZES)])
def test_assembler_equals_official_full_history(grows_at, sizes):
    sections = [
        torch.rand(1, 3, t, 4, 6, generator=torch.Generator().manual_seed(i)) * 2.2 - 1.1 for i, t in enumerate(sizes)
    ]
    spy = SpyWriter()
    asm = OverlapAssembler(spy, OVERLAP, grows_at)
    for k, section in enumerate(sections):
        asm.add(section)
        expected = to_uint8_frames(official_history(sections[: k + 1], grows_at, OVERLAP))
        assert len(spy.snapshots) == k + 1
        np.testing.assert_array_equal(spy.snapshots[-1], expected)
        # memory: only the edge stays, on the side the next section blends into
        assert spy.pending is not None and len(spy.pending) == min(OVERLAP, expected.shape[0])
        assert spy.pending_at == grows_at
        edge = asm._edge  # the assembler holds the edge alone, not a view into the whole blended section
        assert edge.shape[2] == len(spy.pending) and edge.untyped_storage().nbytes() == edge.numel() * 4
    assert asm.finish() == "done" and spy.finished
    np.testing.assert_array_equal(np.stack(spy.final), to_uint8_frames(official_history(sections, grows_at, OVERLAP)))
    # frame counts of the spec: F1 9 + 8k, original 5 then +8 per section and +12 in the last
    assert len(spy.final) == (9 + 8 * 3 if grows_at == "end" else 5 + 8 + 8 + 12)


@pytest.mark.parametrize("grows_at", ["end", "start"])
def test_assembler_fp16_and_overlap_zero(grows_at):
    sections = [smooth_section(t, seed=i).half() for i, t in enumerate([7, 9, 6])]
    for overlap in (0, 3):
        spy = SpyWriter()
        asm = OverlapAssembler(spy, overlap, grows_at)
        for s in sections:
            asm.add(s)
        asm.finish()
        expected = to_uint8_frames(official_history(sections, grows_at, overlap))
        np.testing.assert_array_equal(np.stack(spy.final), expected)


def test_assembler_rejects_bad_input_without_changing_state():
    with pytest.raises(ValueError, match="grows_at must be"):
        OverlapAssembler(SpyWriter(), 5, "sideways")
    for overlap in (-1, 2.5, True):
        with pytest.raises(ValueError, match="overlap"):
            OverlapAssembler(SpyWriter(), overlap, "end")
    spy = SpyWriter()
    asm = OverlapAssembler(spy, 3, "end")
    with pytest.raises(ValueError, match="no sections"):
        asm.finish()
    for bad in (torch.zeros(1, 3, 4, 4, 6, dtype=torch.uint8), torch.zeros(3, 4, 4, 6), torch.zeros(1, 1, 4, 4, 6)):
        with pytest.raises(ValueError, match="section must be"):
            asm.add(bad)
    asm.add(torch.zeros(1, 3, 4, 4, 6))
    before = spy.video()
    with pytest.raises(ValueError, match="does not match"):
        asm.add(torch.zeros(1, 3, 4, 4, 8))
    with pytest.raises(ValueError, match="dtype"):
        asm.add(torch.zeros(1, 3, 4, 4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="overlap 3 is longer"):
        asm.add(torch.zeros(1, 3, 2, 4, 6))  # shorter than the overlap: the official asserts too
    np.testing.assert_array_equal(spy.video(), before)
    assert len(spy.snapshots) == 1


def _levels(n: int, start: int = 0) -> np.ndarray:
    """n frames (T, H, W, 3) uint8, frame i a flat grey of level 10 * (start + i)."""
    return np.stack([np.full((4, 6, 3), 10 * (start + i), np.uint8) for i in range(n)])


def _grey(frames: np.ndarray) -> list[int]:
    return [int(f[0, 0, 0]) for f in frames]


def test_input_video_comes_first_on_both_sides():
    """A continued input video: growing at the end, its frames are written first and the first section
    cross-fades with its last `overlap` frames (float64 reference blend); growing at the start, the
    finished video is the input followed by the generated frames after their first (the input's last
    frame, re-encoded); a job stopped early gets no input in front."""
    video = _levels(8)
    chunks = lambda: iter([video[:5], video[5:]])  # noqa: E731
    new = torch.linspace(-0.5, 0.5, 6, dtype=torch.float64).view(1, 1, 6, 1, 1).expand(1, 3, 6, 4, 6).float()
    spy = SpyWriter()
    asm = OverlapAssembler(spy, 3, "end")
    asm.put_input_first(chunks, video[-3:])
    assert _grey(spy.snapshots[-1]) == _grey(video) and len(spy.final) == 5  # the last 3 stay changeable
    asm.add(new)
    asm.finish()
    edge = torch.from_numpy(video[-3:].astype(np.float64) / 127.5 - 1).permute(3, 0, 1, 2)[None]
    expected = to_uint8_frames(reference_blend(edge, new.double(), 3).float())
    np.testing.assert_array_equal(np.stack(spy.final[:5]), video[:5])
    np.testing.assert_array_equal(np.stack(spy.final[5:]), expected)
    # resumed: the input is in the writer's segments already; nothing is written again
    spy = SpyWriter()
    asm = OverlapAssembler(spy, 3, "end")
    asm.put_input_first(chunks, video[-3:], written=True)
    assert spy.final == [] and spy.snapshots == []

    section = to_uint8_frames(new[:, :, :5])  # the original's first (here: only) section, 5 frames
    for complete, want in ((True, _grey(video) + _grey(section[1:])), (False, _grey(section))):
        spy = SpyWriter()
        asm = OverlapAssembler(spy, 3, "start")
        asm.put_input_first(chunks, video[-3:])
        assert spy.final == [] and spy.snapshots == []  # nothing of the input before the end
        asm.add(new[:, :, :5])
        asm.finish(complete=complete)
        assert _grey(spy.final) == want


# ------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("grows_at,sizes", [("end", FORWARD_SIZES), ("start", BACKWARD_SIZES)])
def test_writer_snapshots_and_final_file(tmp_path, grows_at, sizes):
    path = tmp_path / "video.mp4"
    sections = [smooth_section(t, seed=10 + i) for i, t in enumerate(sizes)]
    writer = SectionVideoWriter(path, fps=30, crf=16)
    asm = OverlapAssembler(writer, OVERLAP, grows_at)
    for k, section in enumerate(sections):
        asm.add(section)
        expected = to_uint8_frames(official_history(sections[: k + 1], grows_at, OVERLAP))
        assert writer.num_frames == expected.shape[0]
        assert probe(path)["frames"] == expected.shape[0]
        got = read_frames(path)
        assert got.shape == expected.shape
        assert np.abs(got.astype(int) - expected).mean() < 3
        assert files_in(tmp_path)[0].startswith(".video.mp4.") and len(files_in(tmp_path)) == 2  # segments, video
    assert asm.finish() == path
    expected = to_uint8_frames(official_history(sections, grows_at, OVERLAP))
    got = read_frames(path)
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected).mean() < 3
    info = probe(path)
    assert info == {
        "frames": expected.shape[0],
        "width": W,
        "height": H,
        "fps": 30.0,
        "codec": "h264",
        "profile": "High",
        "pix_fmt": "yuv420p",
    }
    assert files_in(tmp_path) == ["video.mp4"]  # segments and temporaries are gone


def moving_frames(t: int, start: int) -> np.ndarray:
    """Smoothly moving stripes: x264 uses B-frames on these (random noise gets none)."""
    yy, xx = np.mgrid[0:H, 0:W]
    k = np.arange(start, start + t)[:, None, None]
    rgb = [128 + 100 * np.sin((xx + 2 * k) / 7), 128 + 100 * np.cos((yy - k) / 5), 128 + 60 * np.sin((xx + yy + k) / 9)]
    return np.stack(rgb, axis=-1).astype(np.uint8)


def test_stream_copy_join_is_exact(tmp_path):
    """Joined file == its segments decoded one by one: same bitstream, valid timestamps, one set of headers."""
    path = tmp_path / "join.mp4"
    writer = SectionVideoWriter(path)
    writer.add_final(moving_frames(30, 10))
    writer.add_final(moving_frames(1, 40))  # a one-frame segment: x264 starts its decode times differently
    writer.add_final(np.random.default_rng(0).integers(0, 256, (6, H, W, 3), dtype=np.uint8), at="start")
    writer.add_final(moving_frames(12, 41))
    writer.set_pending(moving_frames(9, 0), at="start")
    writer.write_snapshot()
    segments = [writer._pending_segment, *writer._segments]  # display order
    assert max(s.reorder for s in segments) > 0  # B-frames present, so decode order != display order
    headers = set()
    parts = []
    for seg in segments:
        with av.open(str(seg.path)) as c:
            headers.add(bytes(c.streams.video[0].codec_context.extradata))
        parts.append(read_frames(seg.path))
    assert len(headers) == 1  # identical SPS/PPS across content and lengths
    np.testing.assert_array_equal(read_frames(path), np.concatenate(parts))
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert bytes(stream.codec_context.extradata) in headers
        tb = stream.time_base
        packets = [(p.pts, p.dts, p.is_keyframe) for p in c.demux(stream) if p.pts is not None]
    pts = [round(p * tb * 30) for p, _, _ in packets]
    dts = [round(d * tb * 30) for _, d, _ in packets]
    assert sorted(pts) == list(range(58))
    assert all(d1 < d2 for d1, d2 in itertools.pairwise(dts)) and all(d <= p for p, d in zip(pts, dts))
    assert sum(k for _, _, k in packets) == len(segments)  # one IDR per segment
    # a repeated snapshot with unchanged pending frames encodes nothing new
    encoded = writer.frames_encoded
    writer.write_snapshot()
    assert writer.frames_encoded == encoded
    writer.finish()
    assert writer.frames_encoded == encoded  # the pending segment of the snapshot became final as is
    np.testing.assert_array_equal(read_frames(path), np.concatenate(parts))
    with open(path, "rb") as f:
        assert f.read(64).find(b"moov") > 0  # faststart: the index precedes the media data


def test_crf0_still_plays_in_common_players(tmp_path):
    writer = SectionVideoWriter(tmp_path / "q.mp4", crf=0)
    assert writer.effective_crf == 1
    writer.add_final(moving_frames(4, 0))
    info = probe(writer.finish())
    assert info["profile"] == "High" and info["pix_fmt"] == "yuv420p"  # not "High 4:4:4 Predictive"
    assert SectionVideoWriter(tmp_path / "r.mp4", crf=51).effective_crf == 51


def test_encoding_work_is_linear(tmp_path):
    """Each section encodes its new frames plus the pending edge, however long the video already is."""
    writer = SectionVideoWriter(tmp_path / "long.mp4")
    asm = OverlapAssembler(writer, OVERLAP, "end")
    steps = []
    n = 10
    for i in range(n):
        before = writer.frames_encoded
        asm.add(smooth_section(FORWARD_SIZES[min(i, 1)], seed=i, h=16, w=16))
        steps.append(writer.frames_encoded - before)
    asm.finish()
    total = FORWARD_SIZES[0] + 8 * (n - 1)
    assert writer.num_frames == total == probe(tmp_path / "long.mp4")["frames"]
    assert steps[1:] == [8 + OVERLAP] * (n - 1)  # constant per section: 8 new final frames + 5 pending
    assert writer.frames_encoded <= total + n * OVERLAP


def test_read_frames_slices_and_errors(tmp_path):
    writer = SectionVideoWriter(tmp_path / "r.mp4", crf=1)
    writer.add_final(moving_frames(10, 0))
    path = writer.finish()
    everything = read_frames(path)
    assert everything.shape == (10, H, W, 3) and everything.dtype == np.uint8
    np.testing.assert_array_equal(read_frames(path, 3, 4), everything[3:7])
    np.testing.assert_array_equal(read_frames(path, 8, 5), everything[8:])
    assert read_frames(path, 2, 0).shape == (0, H, W, 3) and read_frames(path, 20).shape == (0, H, W, 3)
    with pytest.raises(ValueError, match="start"):
        read_frames(path, -1)
    with pytest.raises(ValueError, match="count"):
        read_frames(path, 0, -3)
    with pytest.raises(ValueError, match="no video file"):
        read_frames(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(ValueError, match="cannot read"):
        read_frames(text)
    with pytest.raises(ValueError, match="cannot read"):
        probe(text)


# ------------------------------------------------------------------------------------------ bad input
def test_writer_rejects_bad_arguments_and_paths(tmp_path):
    for kw in ({"crf": -1}, {"crf": 52}, {"crf": 1.5}, {"crf": True}, {"fps": 0}, {"fps": 29.97}):
        with pytest.raises(ValueError, match=r"crf|fps"):
            SectionVideoWriter(tmp_path / "a.mp4", **kw)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="does not exist"):
        SectionVideoWriter(tmp_path / "missing" / "a.mp4")
    with pytest.raises(ValueError, match="does not exist"):  # parent is a file
        SectionVideoWriter(blocker / "a.mp4")
    with pytest.raises(ValueError, match="is a folder"):
        SectionVideoWriter(tmp_path)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable"):
            SectionVideoWriter(locked / "a.mp4")
    assert files_in(tmp_path) == ["file"] + (["locked"] if os.geteuid() != 0 else [])


def test_writer_rejects_bad_frames_and_leaves_nothing_half_written(tmp_path):
    path = tmp_path / "v.mp4"
    writer = SectionVideoWriter(path)
    with pytest.raises(ValueError, match="nothing to write"):
        writer.write_snapshot()
    good = moving_frames(3, 0)
    bad = {
        "uint8": good.astype(np.float32),
        "shape": good[..., 0],
        "RGB": good[..., :2],
        "numpy": torch.from_numpy(good),
        "even": np.zeros((2, 47, 64, 3), np.uint8),
    }
    for message, frames in bad.items():
        with pytest.raises(ValueError, match=message):
            writer.add_final(frames)
        with pytest.raises(ValueError, match=message):
            writer.set_pending(frames)
    with pytest.raises(ValueError, match="'end' or 'start'"):
        writer.add_final(good, at="middle")
    with pytest.raises(ValueError, match="'end' or 'start'"):
        writer.set_pending(good, at=None)
    writer.add_final(good)
    with pytest.raises(ValueError, match="one size"):
        writer.set_pending(np.zeros((2, 32, 64, 3), np.uint8))
    writer.set_pending(moving_frames(2, 3))
    writer.write_snapshot()
    snapshot = path.read_bytes()
    assert writer.num_frames == 5 and writer.frames_encoded == 5

    # A snapshot that fails half way (a damaged segment) keeps the previous file and leaves no temporaries.
    writer.add_final(moving_frames(4, 5))
    damaged = writer._segments[-1].path
    damaged.write_bytes(damaged.read_bytes()[:100])
    listing = files_in(tmp_path)
    with pytest.raises(av.FFmpegError):
        writer.write_snapshot()
    assert path.read_bytes() == snapshot and files_in(tmp_path) == listing

    writer.abort()  # the last good snapshot stays, the segments go
    assert files_in(tmp_path) == ["v.mp4"] and read_frames(path).shape[0] == 5
    with pytest.raises(RuntimeError, match="finished or aborted"):
        writer.add_final(good)
    writer.abort()


def test_writer_without_frames_and_context_manager(tmp_path):
    writer = SectionVideoWriter(tmp_path / "empty.mp4")
    with pytest.raises(ValueError, match="no frames"):
        writer.finish()
    assert files_in(tmp_path) == []
    with pytest.raises(KeyError), SectionVideoWriter(tmp_path / "cm.mp4") as w:
        w.add_final(moving_frames(2, 0))
        raise KeyError("pipeline failed")
    assert files_in(tmp_path) == []


# ------------------------------------------------------------------------------------------ resampling
# (presentation times in seconds) -> indices of the frames shown at 30 fps, worked out by hand: tick k
# at k/30 s (from the first frame) shows the nearest frame, the later one on a tie; ticks run to the last
# frame's time, and the last frame appears at least once.
RESAMPLE_TABLES = [
    ([k / 30 for k in range(5)], [0, 1, 2, 3, 4]),  # 30 fps: frame for frame
    ([7.0 + k / 30 for k in range(4)], [0, 1, 2, 3]),  # a stream that starts at 7 s: times count from its first frame
    ([k / 60 for k in range(6)], [0, 2, 4, 5]),  # 60 fps: every other; 5/60 s is nearer frame 5 than frame 4
    # 24 fps (frames at 0, .042, .083, .125, .167, .208): ticks 0, .033, .067, .1, .133, .167, .2 are
    # nearest to frames 0, 1, 2, 2, 3, 4, 5
    ([k / 24 for k in range(6)], [0, 1, 2, 2, 3, 4, 5]),
    ([0.0, 1 / 15], [0, 1, 1]),  # a tie at 1/30 goes to the later frame; tick 2 at 1/15 shows frame 1
    ([0.0], [0]),  # a single frame
    ([0.0, 0.01], [0, 1]),  # the last frame appears even when no tick falls at or before it
]


@pytest.mark.parametrize("times,expected", RESAMPLE_TABLES)
def test_resample_to_30_fps_by_hand(times, expected):
    from framepack.video import resample

    frames = [np.full((2, 2, 3), i, np.uint8) for i in range(len(times))]
    got = [int(f[0, 0, 0]) for f in resample(zip(frames, times), 30)]
    assert got == expected


def _write_indexed_video(path, fps: int, count: int, start_pts: int = 0) -> None:
    """An MP4 at `fps` whose frame i is a flat grey of level 10 * i (readable back through the codec)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"crf": "0"}
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * i, np.uint8), format="rgb24")
            frame.pts = start_pts + i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


@pytest.mark.parametrize("fps,count,expected", [
    (24, 6, [0, 1, 2, 2, 3, 4, 5]),  # the 24 fps row of the table above, through a real file
    (60, 6, [0, 2, 4, 5]),
    (30, 4, [0, 1, 2, 3]),
])  # fmt: skip
def test_inference_and_training_read_videos_alike(tmp_path, fps, count, expected):
    """One reader and one rule: the engine's input frames and a training dataset's frames are the same."""
    from framepack.inputs import read_video_frames
    from framepack.train.data import read_video

    path = tmp_path / f"v{fps}.mp4"
    _write_indexed_video(path, fps, count, start_pts=3)  # not starting at 0: times count from the first frame
    engine = [round(f.astype(float).mean() / 10) for f in read_video_frames(path)]
    assert engine == expected
    train = read_video(path, 64)  # cropped to a bucket of base 64 (64x64 for a square input)
    assert [round(f.astype(float).mean() / 10) for f in train] == expected


# ------------------------------------------------------------------------------------------ reproducibility
_REPEAT_ENCODES = """
import hashlib, sys, tempfile
from pathlib import Path
import numpy as np
from framepack.memory import configure_host_allocator
from framepack.video import SectionVideoWriter

configure_host_allocator()  # as the engine runs: the heap is reused from encode to encode
out = []
for h, w in ((64, 96), (80, 112), (72, 136)):
    g = np.random.default_rng(h * w)  # 8x8 blocks of colour noise fading into others, as a tiny model makes
    a, b = g.random((h // 8, w // 8, 3)), g.random((h // 8, w // 8, 3))
    t = np.linspace(0, 1, 37)[:, None, None, None]
    x = (1 - t) * a + t * b + 0.15 * g.standard_normal((37, h // 8, w // 8, 3))
    frames = (np.clip(np.repeat(np.repeat(x, 8, 1), 8, 2), 0, 1) * 255).astype(np.uint8)
    hashes = set()
    for _ in range(10):  # encode + join exactly as one section of the original schedule does
        with tempfile.TemporaryDirectory() as d:
            writer = SectionVideoWriter(Path(d) / "v.mp4")
            writer.add_final(frames[:4], at="start")
            writer.set_pending(frames[4:], at="start")
            writer.write_snapshot()
            hashes.add(hashlib.sha256(writer.finish().read_bytes()).hexdigest())
    out.append(",".join(sorted(hashes)))
print(" ".join(out))
"""


def test_the_same_frames_give_the_same_file_every_time():
    """10 encodes + joins of the same frames at 3 odd sizes, in each of 6 processes: one file per size.

    Before x264 was kept off its AVX-512 code (framepack.video._x264_params), this found 2-3 different
    files for the same frames in about 5 of 8 processes on an AVX-512 CPU (the 96x64 clip most often);
    it passes by chance then with a probability of about (3/8)^6 = 0.3%.
    """
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _REPEAT_ENCODES], stdout=subprocess.PIPE, text=True)
             for _ in range(6)]  # fmt: skip
    results = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    for size in range(3):
        files = {r[size] for r in results}
        assert len(files) == 1 and "," not in files.pop(), f"size {size}: {[r[size][:20] for r in results]}"


def test_segment_folders_of_killed_processes_are_cleaned_up(tmp_path):
    """A writer killed with SIGKILL leaves its hidden segment folder; the next writer in that folder
    removes it, and leaves the folders of writers that are still alive (this process's, here)."""
    import subprocess
    import sys

    script = (
        "import os, signal, sys, numpy as np\n"
        "from framepack.video import SectionVideoWriter\n"
        "w = SectionVideoWriter(sys.argv[1])\n"
        "w.add_final(np.zeros((2, 16, 16, 3), np.uint8))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "killed.mp4")], check=False)
    (stale,) = tmp_path.glob(".killed.mp4.*.parts")
    assert list(stale.glob("*.mp4"))  # the dead writer's segment is there
    alive = SectionVideoWriter(tmp_path / "alive.mp4")
    alive.add_final(moving_frames(2, 0))
    later = SectionVideoWriter(tmp_path / "later.mp4")
    assert not stale.exists() and alive._parts.is_dir() and later._parts.is_dir()
    later.abort()
    alive.finish()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".parts")] == []
