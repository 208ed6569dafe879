"""Frames <-> tensors, the overlap cross-fade, and an MP4 writer whose work per section is constant.

Contract:
  * `soft_append(a, b, overlap)` is the official `soft_append_bcthw` (spec §3.3).
  * `to_uint8_frames(pixels)` is the official saver's pixel mapping (spec §3.4): (B, 3, T, H, W) floats
    in [-1, 1] -> (T, H, B*W, 3) uint8.
  * `OverlapAssembler` turns the sections the VAE decodes into exactly the frames the official
    full-history loop would write (spec §3.1 backward, §3.2 forward) while keeping only the `overlap`
    frames that the next section will still cross-fade. It hands frames that can no longer change to
    the writer once, and the changeable edge as "pending".
  * `SectionVideoWriter` keeps a playable H.264 MP4 of final + pending frames at `path` after every
    `write_snapshot()` and writes the finished video at `finish()`.

How the growing MP4 stays cheap (the official demo re-encodes all frames after every section):
  * Final frames are encoded once, each batch into its own small segment MP4 (one libx264 session,
    starting with an IDR frame), kept in a hidden folder next to `path` (named with the writer's
    process id: a later writer in that folder removes the folders of processes that died). Segments are ordered by
    display position (backward generation prepends them).
  * A snapshot encodes only the pending edge (<= overlap frames), then stream-copies the packets of
    all segments, in display order, into one MP4: no re-encoding, so encoding work over a whole job
    is linear in its length. Copying is I/O over the compressed bytes so far (MBs, not GBs of pixels).
  * Joining stream-copied H.264 needs identical parameter sets (SPS/PPS) in every segment. They
    depend only on size and encoder settings, which are fixed per writer; x264's `stitchable` option
    additionally keeps content-dependent header tweaks out. Each join checks this and fails loudly.
  * Timestamps: presentation times are re-based by the frame offset of each segment. Decode times
    are renumbered 0, 1, 2, ... in decode order minus one global reorder delay, the largest lead of
    decode order over display order seen in any segment (x264 B-frames; recorded when encoding), so
    decode times increase strictly and never pass presentation times. B-frames stay on, as in the
    official saver (torchvision's x264 defaults).
  * Files are replaced atomically (write to a hidden name in the same folder, then `os.replace`).

Memory: the writer holds only the pending uint8 frames, the assembler only the float edge.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from einops import rearrange


def _x264_params() -> str:
    """x264 settings shared by every segment of a writer (segments only join if their headers match).

    `stitchable` keeps content-dependent header tweaks out. On CPUs with AVX-512, x264 is limited to
    its AVX2 code (`asm=AVX2,Cache64`): its AVX-512 code is not reproducible. Measured here (AMD EPYC,
    x264 core 164 in PyAV 18): the same 33 frames (96x64, uint8, bit-identical planes, zeroed row and
    buffer padding, one x264 thread) encoded 10 times in each of 30 processes gave 3 different
    bitstreams in 12 of the 30 (frames 12-14 decoding up to 29 levels apart); limited to AVX2, the 300
    encodes gave one. The AVX2 and AVX-512 paths are each valid H.264, and their files differ (float
    rounding in the lookahead). Elsewhere x264 picks its instruction set itself.
    """
    params = "stitchable=1"
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as cpu
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as cpu
        except ImportError:
            return params
    if cpu.get("AVX512F") and cpu.get("AVX2") and cpu.get("FMA3"):
        params += ":asm=AVX2,Cache64"
    return params


_X264_PARAMS = _x264_params()
_SIDES = ("end", "start")


def _yuv420_frame(rgb: np.ndarray) -> av.VideoFrame:
    """rgb24 -> yuv420p by swscale (as torchvision's write_video), with the row padding zeroed.

    swscale leaves the bytes past each plane's width (rows are padded to the alignment) uninitialised,
    and x264 reads them: frames whose chroma width is not a multiple of the alignment (a 96-pixel or a
    608-pixel wide video) then encode differently from run to run. Zeroed padding makes the output
    bitwise reproducible.
    """
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
    for plane in frame.planes:
        if plane.line_size > plane.width:
            rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size).copy()
            rows[:, plane.width :] = 0
            plane.update(rows)
    return frame


# ------------------------------------------------------------------------------------------ pixels
def soft_append(a: torch.Tensor, b: torch.Tensor, overlap: int) -> torch.Tensor:
    """Join `a` then `b` on time (dim 2), cross-fading the last `overlap` frames of `a` into the first of `b`.

    The official `soft_append_bcthw`: overlap <= 0 is a plain concatenation; otherwise the weights
    linspace(1, 0, overlap) (in a's dtype) blend a's tail with b's head, and the result is cast to a's
    dtype. Tensors are (B, C, T, H, W). The original model calls it as (new, old), F1 as (old, new).
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ValueError(f"soft_append takes two tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.ndim != 5 or b.ndim != 5:
        raise ValueError(f"soft_append takes (B, C, T, H, W) tensors, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[:2] != b.shape[:2] or a.shape[3:] != b.shape[3:]:
        raise ValueError(
            f"soft_append needs equal batch, channels, height and width; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if isinstance(overlap, bool) or not isinstance(overlap, int):
        raise ValueError(f"overlap must be an int, got {overlap!r}")
    if overlap <= 0:
        return torch.cat([a, b], dim=2)
    if overlap > a.shape[2] or overlap > b.shape[2]:
        raise ValueError(
            f"overlap {overlap} is longer than an input: a has {a.shape[2]} frames, b has {b.shape[2]}; "
            "overlap must be at most the frame count of both"
        )
    w = torch.linspace(1, 0, overlap, dtype=a.dtype, device=a.device).view(1, 1, overlap, 1, 1)
    blend = w * a[:, :, -overlap:] + (1 - w) * b[:, :, :overlap]
    return torch.cat([a[:, :, :-overlap], blend, b[:, :, overlap:]], dim=2).to(a.dtype)


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, T, H, W) float in [-1, 1] -> (T, H, B*W, 3) uint8, as the official saver.

    Values are clamped to [-1, 1] in fp32 and mapped with x*127.5 + 127.5, then truncated (not
    rounded). A batch is tiled side by side, left to right (the official arranges a grid of up to 6
    per row; FramePack always decodes batch 1, where both agree).
    """
    if not isinstance(pixels, torch.Tensor):
        raise ValueError(f"pixels must be a torch.Tensor, got {type(pixels).__name__}")
    if not pixels.is_floating_point():
        raise ValueError(f"pixels must be a float tensor in [-1, 1], got dtype {pixels.dtype}")
    if pixels.ndim != 5 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (B, 3, T, H, W), got shape {tuple(pixels.shape)}")
    x = pixels.detach().float().clamp(-1.0, 1.0) * 127.5 + 127.5
    x = rearrange(x.to(torch.uint8), "b c t h w -> t h (b w) c")  # (T, H, B*W, 3)
    return np.ascontiguousarray(x.cpu().numpy())


def _check_frames(frames: object, what: str) -> np.ndarray:
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"{what} must be a numpy array (T, H, W, 3) of uint8, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (0..255), got dtype {frames.dtype}; see to_uint8_frames")
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"{what} must have shape (T, H, W, 3) (RGB), got {frames.shape}")
    return frames


def _check_side(at: object) -> str:
    if at not in _SIDES:
        raise ValueError(f"at must be 'end' or 'start', got {at!r}")
    return at  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ writer
@dataclass(frozen=True)
class _Segment:
    path: Path
    frames: int
    reorder: int  # largest (decode index - display index) of its packets: how far B-frames run ahead


class SectionVideoWriter:
    """A playable MP4 of a video that grows by sections; final frames are encoded once (see module doc).

    The video is `[pending if at="start"] + final frames + [pending if at="end"]`: `add_final` extends
    the final part at one end, `set_pending` replaces the one changeable edge. H.264 (libx264) yuv420p
    at `fps`; width and height must be even (yuv420p halves chroma), odd sizes are rejected. `crf` 0
    would make x264 switch to the lossless "High 4:4:4 Predictive" profile that Firefox, macOS and
    Windows players cannot open (spec §3.4, §10.11), so it is encoded at crf 1 (`effective_crf`),
    keeping the "High" profile.

    Temporary segments live in a hidden folder beside `path`; `finish()` and `abort()` remove it (and
    so does garbage collection, as a last resort). Use as a context manager to abort on errors.
    """

    def __init__(
        self, path: str | os.PathLike, *, fps: int = 30, crf: int = 16, parts_dir: str | os.PathLike | None = None
    ) -> None:
        """`parts_dir`: keep the encoded segments there, persistently (a resumable job's state folder);
        by default they go to a hidden temporary folder beside `path`."""
        if isinstance(fps, bool) or not isinstance(fps, int) or fps <= 0:
            raise ValueError(f"fps must be a positive int, got {fps!r}")
        if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
            raise ValueError(f"crf must be an int from 0 (best) to 51 (worst), got {crf!r}")
        self.path = Path(path)
        self.fps = fps
        self.crf = crf
        folder = self.path.parent
        if self.path.is_dir():
            raise ValueError(f"cannot write video to {self.path}: it is a folder; give a file path such as out.mp4")
        if not folder.is_dir():
            raise ValueError(f"cannot write video to {self.path}: folder {folder} does not exist")
        try:  # creating the segment folder now proves the folder is writable before any work is done
            if parts_dir is not None:
                self._parts = Path(parts_dir)
                self._parts.mkdir(parents=True, exist_ok=True)
            else:
                _remove_stale_parts(folder)
                self._parts = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.{os.getpid()}.", suffix=".parts",
                                                    dir=folder))  # fmt: skip
        except OSError as e:
            raise ValueError(f"cannot write video to {self.path}: folder {folder} is not writable ({e})") from e
        # Temporary segments are removed even if the writer is dropped; persistent ones survive for a resume.
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._parts), True) if parts_dir is None else None
        self._segments: deque[_Segment] = deque()  # final frames, in display order
        self._final_frames = 0
        self._pending: np.ndarray | None = None
        self._pending_at = "end"
        self._pending_segment: _Segment | None = None  # the pending frames, encoded for the last snapshot
        self._size: tuple[int, int] | None = None  # (H, W), fixed by the first frames seen
        self._serial = 0
        self._closed = False
        self.frames_encoded = 0
        self._written: list[list] = []  # [name, offset, frames, reorder] of each segment in the file at `path`

    # -------------------------------------------------------------------------------- public
    def state(self) -> dict:
        """JSON-serialisable description of the final segments (the pending edge is not included)."""
        return {
            "segments": [[seg.path.name, seg.frames, seg.reorder] for seg in self._segments],
            "size": list(self._size) if self._size else None,
            "serial": self._serial,
            "fps": self.fps,
            "crf": self.crf,
        }

    @classmethod
    def restore(cls, path: str | os.PathLike, state: dict, parts_dir: str | os.PathLike) -> SectionVideoWriter:
        """A writer continuing from `state()`, whose segment files are in `parts_dir`."""
        writer = cls(path, fps=state["fps"], crf=state["crf"], parts_dir=parts_dir)
        listed = {name for name, *_ in state["segments"]}
        missing = [name for name in listed if not (writer._parts / name).exists()]
        if missing:
            raise ValueError(f"cannot resume the video: segment files {missing} are missing from {writer._parts}")
        for extra in writer._parts.glob("*.mp4"):  # written after the state was saved: not part of it
            if extra.name not in listed:
                extra.unlink()
        for name, frames, reorder in state["segments"]:
            writer._segments.append(_Segment(writer._parts / name, frames, reorder))
        writer._final_frames = sum(seg.frames for seg in writer._segments)
        writer._size = tuple(state["size"]) if state["size"] else None
        writer._serial = state["serial"]
        return writer

    def layout(self) -> list[list]:
        """Where each segment's frames are in the file last written at `path`: [name, first frame, frames,
        reorder], in display order (`copy_segment` takes one back out without re-encoding)."""
        return [list(entry) for entry in self._written]

    def keep_segments(self) -> None:
        """Stop here without finishing: leave the last snapshot and the segments (for a later resume)."""
        self._drop_pending_segment()
        self._closed = True

    @property
    def effective_crf(self) -> int:
        """The crf given to x264: `crf`, except 0 -> 1 (crf 0 forces an unplayable lossless profile)."""
        return max(self.crf, 1)

    @property
    def num_frames(self) -> int:
        """Frames in the video so far: final + pending."""
        return self._final_frames + (0 if self._pending is None else len(self._pending))

    def add_final(self, frames: np.ndarray, at: str = "end") -> None:
        """Encode frames that will not change again, at the "end" or the "start" of the final part."""
        self._check_open()
        at = _check_side(at)
        frames = self._check_size(_check_frames(frames, "final frames"))
        if len(frames) == 0:
            return
        segment = self._encode(frames)
        if at == "end":
            self._segments.append(segment)
        else:
            self._segments.appendleft(segment)
        self._final_frames += len(frames)

    def prepend(self, chunks) -> None:
        """Put frames before everything, in order: `chunks` yields (T, H, W, 3) uint8 batches. Each
        batch is encoded as it comes, so only one is in memory at a time."""
        self._check_open()
        segments = []
        for chunk in chunks:
            frames = self._check_size(_check_frames(chunk, "final frames"))
            if len(frames):
                segments.append(self._encode(frames))
        self._segments.extendleft(reversed(segments))
        self._final_frames += sum(seg.frames for seg in segments)

    def set_pending(self, frames: np.ndarray | None, at: str = "end") -> None:
        """Replace the changeable edge (None or no frames: none) at the "end" or "start" of the video."""
        self._check_open()
        at = _check_side(at)
        if frames is not None:
            frames = self._check_size(_check_frames(frames, "pending frames"))
        self._drop_pending_segment()
        # A copy: the caller may reuse its buffer, and the snapshot must show what was passed now.
        self._pending = None if frames is None or len(frames) == 0 else frames.copy()
        self._pending_at = at

    def write_snapshot(self) -> Path:
        """Write final + pending frames to `path` (atomically replaced); encodes only the pending frames."""
        self._check_open()
        if self.num_frames == 0:
            raise ValueError("nothing to write yet: add frames with add_final or set_pending first")
        self._join(self._display_order(), self.path, faststart=False)
        return self.path

    def finish(self) -> Path:
        """Make the pending frames final, write the finished MP4 to `path`, remove temporary segments."""
        self._check_open()
        if self.num_frames == 0:
            self.abort()
            raise ValueError(f"no frames were added; nothing written to {self.path}")
        # The pending frames become final: encoded at most once more (not at all right after a snapshot).
        self._segments = deque(self._display_order())
        self._final_frames = sum(s.frames for s in self._segments)
        self._pending = self._pending_segment = None
        # moov in front: browsers can start playing the finished file before it is fully loaded.
        self._join(self._segments, self.path, faststart=True)
        self.abort()
        return self.path

    def abort(self) -> None:
        """Remove temporary files; the last snapshot at `path`, if any, stays. Safe to call twice."""
        self._closed = True
        self._pending_segment = None
        if self._cleanup is not None:
            self._cleanup()
        else:  # persistent segments: the job is over (finished or given up), so they go too
            shutil.rmtree(self._parts, ignore_errors=True)

    def __enter__(self) -> SectionVideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # no-op after finish()

    # -------------------------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the writer for {self.path} is finished or aborted")

    def _check_size(self, frames: np.ndarray) -> np.ndarray:
        h, w = frames.shape[1:3]
        if h % 2 or w % 2 or h == 0 or w == 0:
            raise ValueError(
                f"frames are {w}x{h} (width x height); H.264 yuv420p needs an even, non-zero width and height"
            )
        if self._size is None:
            self._size = (h, w)
        elif self._size != (h, w):
            raise ValueError(
                f"frames are {w}x{h} but this video is {self._size[1]}x{self._size[0]}; all frames need one size"
            )
        return frames

    def _drop_pending_segment(self) -> None:
        if self._pending_segment is not None:
            self._pending_segment.path.unlink(missing_ok=True)
            self._pending_segment = None

    def _display_order(self) -> list[_Segment]:
        segments = list(self._segments)
        if self._pending is None:
            return segments
        if self._pending_segment is None:  # unchanged pending frames are not encoded twice
            self._pending_segment = self._encode(self._pending)
        return [self._pending_segment, *segments] if self._pending_at == "start" else [*segments, self._pending_segment]

    def _encode(self, frames: np.ndarray) -> _Segment:
        """One libx264 session -> one segment MP4 (starts with an IDR frame)."""
        self._serial += 1
        path = self._parts / f"{self._serial:06d}.mp4"
        lead = 0
        count = 0
        try:
            with av.open(str(path), "w", format="mp4") as out:
                stream = out.add_stream("libx264", rate=self.fps)
                stream.height, stream.width = frames.shape[1:3]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(self.effective_crf), "x264-params": _X264_PARAMS}
                for i in range(len(frames) + 1):
                    frame = None
                    if i < len(frames):
                        frame = _yuv420_frame(frames[i])
                        frame.pts = i
                    for packet in stream.encode(frame):  # frame None flushes the encoder
                        lead = max(lead, count - packet.pts)  # packet.pts: display index (codec tb 1/fps)
                        count += 1
                        out.mux(packet)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if count != len(frames):
            path.unlink(missing_ok=True)
            raise RuntimeError(f"x264 returned {count} packets for {len(frames)} frames")
        self.frames_encoded += len(frames)
        return _Segment(path, len(frames), lead)

    def _join(self, segments: Sequence[_Segment], dest: Path, *, faststart: bool) -> None:
        """Stream-copy the segments' packets, in order, into one MP4 at `dest` (atomically replaced)."""
        tick = Fraction(1, self.fps)
        delay = max(s.reorder for s in segments)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            options = {"movflags": "+faststart"} if faststart else {}
            with av.open(str(tmp), "w", format="mp4", options=options) as out:
                ostream = None
                extradata = None
                offset = 0  # display index of the segment's first frame
                decoded = 0  # packets written so far (decode order)
                for seg in segments:
                    with av.open(str(seg.path)) as src:
                        istream = src.streams.video[0]
                        if ostream is None:
                            ostream = out.add_stream_from_template(istream)
                            ostream.time_base = tick
                            extradata = istream.codec_context.extradata
                        elif istream.codec_context.extradata != extradata:
                            raise RuntimeError(
                                f"segment {seg.path.name} has other H.264 parameter sets (SPS/PPS) than the first; "
                                "its packets cannot be stream-copied into one file"
                            )
                        n = 0
                        for packet in src.demux(istream):
                            if packet.pts is None:  # the demuxer's empty end-of-stream packet
                                continue
                            index = round(packet.pts * packet.time_base / tick)  # display index in the segment
                            if not 0 <= index < seg.frames:
                                raise RuntimeError(f"segment {seg.path.name}: frame index {index} out of range")
                            packet.pts = offset + index
                            packet.dts = decoded - delay  # strictly increasing, and <= pts by choice of delay
                            packet.duration = 1
                            packet.time_base = tick
                            packet.stream = ostream
                            out.mux(packet)
                            decoded += 1
                            n += 1
                    if n != seg.frames:
                        raise RuntimeError(f"segment {seg.path.name} holds {n} frames, expected {seg.frames}")
                    offset += seg.frames
            os.replace(tmp, dest)
            if dest == self.path:
                starts = np.cumsum([0] + [s.frames for s in segments])
                self._written = [[s.path.name, int(o), s.frames, s.reorder] for s, o in zip(segments, starts)]
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def copy_segment(source: str | os.PathLike, first: int, frames: int, reorder: int, dest: str | os.PathLike) -> None:
    """Copy the packets of frames `first` .. `first + frames - 1` of an MP4 that a `SectionVideoWriter`
    joined (one of its segments: `layout()` says where) into a segment file at `dest`, without
    re-encoding: the frames decode bit-identically. A segment began its own x264 session with an IDR
    frame, so its packets are contiguous in decode order and reference nothing outside it; anything
    else (a range that does not match a segment, a file that changed since) raises ValueError."""
    tick = Fraction(1, 30)
    src_path = Path(source)
    tmp = Path(dest).with_name(f".{Path(dest).name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with av.open(str(src_path)) as src, av.open(str(tmp), "w", format="mp4") as out:
            istream = src.streams.video[0]
            rate = istream.average_rate or istream.guessed_rate
            tick = Fraction(1, round(float(rate))) if rate else tick
            ostream = out.add_stream_from_template(istream)
            ostream.time_base = tick
            copied, runs, inside = 0, 0, False
            for packet in src.demux(istream):
                if packet.pts is None:
                    continue
                index = round(packet.pts * packet.time_base / tick)
                if not first <= index < first + frames:
                    inside = False
                    continue
                if not inside:
                    runs += 1
                    inside = True
                if copied == 0 and not packet.is_keyframe:
                    raise ValueError(f"{src_path}: frame {index} (the first of frames {first}..{first + frames - 1} "
                                     "in decode order) is not a key frame: not the start of a segment")  # fmt: skip
                packet.pts = index - first
                packet.dts = copied - reorder  # increasing, and <= pts (reorder: the segment's B-frame lead)
                packet.duration = 1
                packet.time_base = tick
                packet.stream = ostream
                out.mux(packet)
                copied += 1
        if copied != frames or runs != 1:
            raise ValueError(f"{src_path} holds {copied} packets of frames {first}..{first + frames - 1}"
                             f"{'' if runs <= 1 else ' in separate runs'}; expected one run of {frames}: the file "
                             "is not the one its layout describes")  # fmt: skip
        os.replace(tmp, dest)
    except av.FFmpegError as err:
        raise ValueError(f"cannot copy frames from {src_path}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)


_PARTS = re.compile(r"^\..+\.(\d+)\.[^.]+\.parts$")  # .NAME.PID.RANDOM.parts


def _remove_stale_parts(folder: Path) -> None:
    """Remove the hidden segment folders that writers of dead processes left in `folder` (a process
    killed with SIGKILL never cleans up); a folder of a live process is left alone."""
    for parts in folder.glob(".*.parts"):
        m = _PARTS.match(parts.name)
        if m is None or not parts.is_dir() or parts.is_symlink():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # alive (ours or another writer's)
        except ProcessLookupError:
            shutil.rmtree(parts, ignore_errors=True)
        except (PermissionError, OverflowError, OSError):
            continue  # another user's process, or not a pid: not ours to judge


# ------------------------------------------------------------------------------------------ assembler
class _Growth:
    """One end of the video that new sections grow: how a section joins the edge, what stays changeable."""

    def __init__(self, side: str) -> None:
        self.side = side  # the writer's "end" or "start"
        self.at_end = side == "end"

    def join(self, edge: torch.Tensor, new: torch.Tensor, overlap: int) -> torch.Tensor:
        """The official blend: at the end `soft_append(history, new)`, at the start `soft_append(new, history)`."""
        return soft_append(edge, new, overlap) if self.at_end else soft_append(new, edge, overlap)

    def edge(self, pixels: torch.Tensor, keep: int) -> torch.Tensor:
        """The `keep` frames on the growing side (the ones the next section blends into)."""
        t = pixels.shape[2]
        return pixels[:, :, t - keep :] if self.at_end else pixels[:, :, :keep]

    def rest(self, pixels: torch.Tensor, keep: int) -> torch.Tensor:
        """Everything but the edge: frames no later section changes."""
        t = pixels.shape[2]
        return pixels[:, :, : t - keep] if self.at_end else pixels[:, :, keep:]


_GROWTH = {side: _Growth(side) for side in _SIDES}


class OverlapAssembler:
    """Feeds decoded sections to a `SectionVideoWriter`, reproducing the official full-history blend.

    The official loop keeps every pixel: growing at the end (F1) `history = soft_append(history, new,
    overlap)`, at the start (original, built back to front) `history = soft_append(new, history,
    overlap)`. A blend touches only the `overlap` frames at the growing edge of the history, so we keep
    just those (float, on the CPU, in the sections' dtype) and blend the new section with them: the
    result equals the official history's affected frames value for value. Of it, all but the new edge
    is final. `grows_at` ("end" or "start") is the schedule's (`Schedule.grows_at`).

    The first section becomes pending except what lies beyond the edge (its frames furthest from the
    growing side). Every section must have the dtype, batch and size of the first, and from the
    second section on both it and the history must have at least `overlap` frames (as the official).
    """

    def __init__(self, writer: SectionVideoWriter, overlap: int, grows_at: str) -> None:
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
            raise ValueError(f"overlap must be an int >= 0 (frames cross-faded between sections), got {overlap!r}")
        if grows_at not in _GROWTH:
            raise ValueError(f"grows_at must be 'end' (sections appended) or 'start' (prepended), got {grows_at!r}")
        self.writer = writer
        self.overlap = overlap
        self.growth = _GROWTH[grows_at]
        self._edge: torch.Tensor | None = None  # (B, 3, <=overlap, H, W): frames the next section blends
        self._sections = 0
        self._input = None  # growing at the start: () -> chunks of an input video to put in front at the end

    def add(self, pixels: torch.Tensor) -> None:
        """Blend a newly decoded section (B, 3, T, H, W) float in [-1, 1] in, update the writer, snapshot."""
        if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
            raise ValueError(f"a section must be a float tensor (B, 3, T, H, W), got {_describe(pixels)}")
        if pixels.ndim != 5 or pixels.shape[1] != 3 or pixels.shape[2] == 0:
            raise ValueError(f"a section must be (B, 3, T, H, W) with T >= 1, got shape {tuple(pixels.shape)}")
        new = pixels.detach().cpu()
        edge = self._edge
        if edge is not None and (new.shape[:2] != edge.shape[:2] or new.shape[3:] != edge.shape[3:]):
            raise ValueError(
                f"section shape {tuple(new.shape)} does not match the earlier sections' "
                f"(B, 3, T, H, W) = {tuple(edge.shape[:2])} x T x {tuple(edge.shape[3:])}"
            )
        if edge is not None and new.dtype != edge.dtype:
            raise ValueError(f"section dtype {new.dtype} differs from the earlier sections' {edge.dtype}")
        # at the end: = official history[-len(edge):] onward; at the start: = official history[:len(joined)]
        joined = new if edge is None else self.growth.join(edge, new, self.overlap)
        keep = min(self.overlap, joined.shape[2])
        pending = self.growth.edge(joined, keep)
        self.writer.add_final(to_uint8_frames(self.growth.rest(joined, keep)), at=self.growth.side)
        self.writer.set_pending(to_uint8_frames(pending) if keep else None, at=self.growth.side)
        self.writer.write_snapshot()
        self._edge = pending.clone()  # a copy, so the rest of `joined` can be freed
        self._sections += 1

    def put_input_first(self, chunks, tail: np.ndarray, *, written: bool = False) -> None:
        """The video continues an input video, whose frames come first.

        `chunks()` yields all its frames ((T, H, W, 3) uint8 batches, in order; called when they are
        needed, so a long input is never held in memory); `tail` holds at least its last `overlap`
        frames. Growing at the end, the input is written now, before the first section, and its last
        `overlap` frames become the edge the first section cross-fades with, as between sections
        (`written`: a resumed job, whose segments hold it already). Growing at the start, the generated
        video begins with the input's last frame (its start image, re-encoded); at `finish` that frame
        is dropped and the input put in front, unchanged.
        """
        if self._sections and not written:
            raise ValueError("put_input_first comes before the first section")
        if not self.growth.at_end:
            self._input = chunks
            return
        keep = min(self.overlap, len(tail))
        edge = tail[len(tail) - keep :]
        self._edge = torch.from_numpy(edge.astype(np.float32) / 127.5 - 1).permute(3, 0, 1, 2)[None]  # (1,3,T,H,W)
        if written:  # kept as the first section's cross-fade partner, for `restore` after that section
            return
        pending: np.ndarray | None = None
        for chunk in chunks():  # everything but the last `keep` frames is final
            pending = chunk if pending is None else np.concatenate([pending, chunk])
            if len(pending) > keep:
                self.writer.add_final(pending[: len(pending) - keep], at="end")
                pending = pending[len(pending) - keep :]
        self.writer.set_pending(edge, at="end")
        self.writer.write_snapshot()

    def finish(self, *, complete: bool = True) -> Path:
        """The pending edge becomes final; returns the path of the finished MP4. `complete=False`: the
        job stopped early, so a video growing at the start does not reach an input video yet and it
        is not put in front."""
        if self._sections == 0:
            raise ValueError("no sections were added; nothing to finish")
        if complete and self._input is not None:
            self.writer.add_final(to_uint8_frames(self._edge[:, :, 1:]), at="start")
            self.writer.set_pending(None, at="start")
            self.writer.prepend(self._input())
        self._edge = None
        return self.writer.finish()

    def restore(self, last_section: torch.Tensor, sections: int) -> None:
        """Continue after `sections` sections whose last decode was `last_section` (B, 3, T, H, W).

        The pending edge is a raw slice of the latest decode (the official blend only touches the side
        facing the older frames), so re-decoding the last section's latents restores it exactly; the
        writer gets it back as its pending frames. The one exception is the first section after an
        input video (`put_input_first(..., written=True)` gives its tail again): its decode can be
        shorter than two overlaps, so the blend with the input's tail reaches into the edge, and is
        replayed.
        """
        pixels = last_section.detach().cpu()
        if sections == 1 and self._edge is not None:
            pixels = self.growth.join(self._edge.to(pixels.dtype), pixels, self.overlap)
        keep = min(self.overlap, pixels.shape[2])
        self._edge = self.growth.edge(pixels, keep).clone()
        self._sections = sections
        self.writer.set_pending(to_uint8_frames(self._edge) if keep else None, at=self.growth.side)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


# ------------------------------------------------------------------------------------------ reading
def resample(timed: Iterable[tuple[np.ndarray, float]], fps: int = 30) -> Iterator[np.ndarray]:
    """Frames at a constant `fps` from decoded frames with their presentation times (seconds, increasing).

    Times count from the first frame's. Tick k (at k / fps) shows the frame nearest to it in time, the
    later one on a tie (a tick exactly between two frames); ticks run up to the last frame's time, and
    the last frame always appears at least once (at the first tick nearer to it than to its
    predecessor). A 30 fps input comes back frame for frame; 60 fps keeps every other frame; 24 fps
    repeats every fourth. The one rule for inference inputs and training data (framepack.inputs).
    """
    tick, last, last_t, t0 = 0, None, 0.0, None
    for frame, t in timed:
        t0 = t if t0 is None else t0
        t -= t0
        if last is not None:
            while tick / fps < (last_t + t) / 2:  # ticks nearer the previous frame
                yield last
                tick += 1
        last, last_t = frame, t
    if last is not None:
        yield last
        tick += 1
        while tick / fps <= last_t + 1e-6:
            yield last
            tick += 1


def _open_video(path: str | os.PathLike) -> tuple[Path, av.container.InputContainer]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no video file at {p}")
    try:
        container = av.open(str(p))
    except av.FFmpegError as e:
        raise ValueError(f"cannot read {p} as a video: {e}") from e
    if not container.streams.video:
        container.close()
        raise ValueError(f"{p} has no video stream")
    return p, container


def read_frames(path: str | os.PathLike, start: int = 0, count: int | None = None) -> np.ndarray:
    """Decode frames start .. start+count-1 (all to the end if count is None) to (T, H, W, 3) uint8 RGB.

    Fewer than `count` frames come back if the video ends first. Decoding starts at the first frame
    (no seeking), so reading late frames costs time proportional to `start`.
    """
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ValueError(f"count must be None or an int >= 0, got {count!r}")
    p, container = _open_video(path)
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        h, w = stream.codec_context.height, stream.codec_context.width
        frames: list[np.ndarray] = []
        try:
            if count != 0:
                for i, frame in enumerate(container.decode(stream)):
                    if i >= start:
                        frames.append(frame.to_ndarray(format="rgb24"))
                        if count is not None and len(frames) == count:
                            break
        except av.FFmpegError as e:
            raise ValueError(f"cannot decode {p}: {e}") from e
    if not frames:
        return np.zeros((0, h, w, 3), np.uint8)
    return np.stack(frames)  # (T, H, W, 3)


def frames_at(path: str | os.PathLike, indices: Iterable[int]) -> dict[int, np.ndarray]:
    """The frames at `indices` ((H, W, 3) uint8 RGB each), decoded in one pass up to the last of them."""
    wanted = {int(i) for i in indices}
    found: dict[int, np.ndarray] = {}
    if not wanted:
        return found
    last = max(wanted)
    p, container = _open_video(path)
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    found[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
        except av.FFmpegError as e:
            raise ValueError(f"cannot decode {p}: {e}") from e
    return found


def probe(path: str | os.PathLike) -> dict:
    """{"frames", "width", "height", "fps", "codec", "profile", "pix_fmt"} of the first video stream.

    `frames` comes from the container's count, or from counting packets (no decoding) where the
    container does not store one.
    """
    p, container = _open_video(path)
    with container:
        stream = container.streams.video[0]
        cc = stream.codec_context
        frames = stream.frames
        if not frames:
            try:
                frames = sum(1 for packet in container.demux(stream) if packet.size)
            except av.FFmpegError as e:
                raise ValueError(f"cannot read {p}: {e}") from e
        rate = stream.average_rate or stream.guessed_rate
        return {
            "frames": int(frames),
            "width": cc.width,
            "height": cc.height,
            "fps": float(rate) if rate else 0.0,
            "codec": cc.name,
            "profile": cc.profile,
            "pix_fmt": cc.pix_fmt,
        }
