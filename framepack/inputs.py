"""A job's pixel inputs, checked and brought to one size: the start frame (from an image, the input
video, or a plain colour for text-to-video), the end frame and keyframes, and the input video.

Every image is loaded with framepack.images (EXIF, alpha, 16-bit, size limits) and cropped to the
start frame's bucket, so all latents share one shape. An input video is read as a stream, resampled
to 30 fps and cropped the same way; only its first frame and the frames that feed the context are
kept in memory (the rest is re-read when written), so a long input never sits in RAM.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np

from framepack.config import GenerationRequest, RequestError
from framepack.images import load_image, nearest_bucket, prepare_image, resize_and_center_crop
from framepack.sections import FPS, Schedule
from framepack.video import resample

MAX_INPUT_SECONDS = 600  # an input video longer than this is refused (10 minutes at 30 fps)
MAX_INPUT_PIXELS = 4096 * 4096


@dataclass
class VideoInput:
    path: str
    frames: int  # at 30 fps, after resampling
    first: np.ndarray  # (H, W, 3) uint8, cropped
    tail: np.ndarray  # (T, H, W, 3) uint8: the last frames (context + cross-fade)

    def iter_frames(self, size: tuple[int, int], chunk: int = 64) -> Iterator[np.ndarray]:
        """All frames again, cropped to `size`, in chunks of (<= chunk, H, W, 3)."""
        batch = []
        for frame in read_video_frames(self.path):
            batch.append(resize_and_center_crop(frame, *size))
            if len(batch) == chunk:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)


@dataclass
class JobInputs:
    start: np.ndarray | None  # (H, W, 3) uint8; None: text-to-video generates its start frame
    size: tuple[int, int]  # (H, W)
    end: np.ndarray | None
    keyframes: list[np.ndarray]
    video: VideoInput | None
    video_context: np.ndarray | None = None  # (T, H, W, 3): input video frames the schedule encodes into its context


def read_video_frames(path: str | os.PathLike, *, max_seconds: float | None = None,
                      max_pixels: int | None = None) -> Iterator[np.ndarray]:  # fmt: skip
    """A video's RGB frames resampled to 30 fps (`framepack.video.resample`: each tick shows the frame
    nearest in time), decoded as a stream; RequestError for an unreadable, damaged, too large or too
    long file (limits: MAX_INPUT_SECONDS, MAX_INPUT_PIXELS unless given). The one reader of input
    videos, for inference and for training data alike."""
    max_seconds = MAX_INPUT_SECONDS if max_seconds is None else max_seconds
    max_pixels = MAX_INPUT_PIXELS if max_pixels is None else max_pixels
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise RequestError(f"cannot read video {path}: {err}") from None
    with container:
        if not container.streams.video:
            raise RequestError(f"{path} has no video stream (accepted: MP4, WebM, GIF, MOV, MKV)")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"

        def timed() -> Iterator[tuple[np.ndarray, float]]:
            t0 = None
            for n, frame in enumerate(container.decode(stream)):
                if frame.width * frame.height > max_pixels:
                    raise RequestError(f"{path} is {frame.width}x{frame.height}; at most {max_pixels} pixels")
                t = float(frame.time) if frame.time is not None else n / FPS
                t0 = t if t0 is None else t0
                if t - t0 > max_seconds:
                    raise RequestError(f"{path} is longer than {max_seconds:g} s; trim it first")
                yield frame.to_ndarray(format="rgb24"), t

        try:
            yield from resample(timed(), FPS)
        except av.error.FFmpegError as err:
            raise RequestError(f"{path} is damaged or not a video: {err}") from None


def read_video_input(path: str, keep: int, base: int) -> VideoInput:
    """First pass over an input video: length, first frame and the last `keep` frames (cropped)."""
    if not os.path.isfile(path):
        raise RequestError(f"input video not found: {path}")
    first, tail, n, size = None, deque(maxlen=keep), 0, None
    for frame in read_video_frames(path):
        if size is None:
            size = nearest_bucket(frame.shape[0], frame.shape[1], base)
            first = resize_and_center_crop(frame, *size)
        tail.append(frame)
        n += 1
    if n == 0:
        raise RequestError(f"{path} contains no frames")
    return VideoInput(path, n, first, np.stack([resize_and_center_crop(f, *size) for f in tail]))


def solid_color(spec: str, size: tuple[int, int]) -> np.ndarray:
    rgb = [int(spec[i : i + 2], 16) for i in (7, 9, 11)]  # "color:#RRGGBB"
    return np.broadcast_to(np.array(rgb, np.uint8), (*size, 3)).copy()


def prepare_inputs(request: GenerationRequest, base: int, schedule: Schedule,
                   image: np.ndarray | None = None) -> JobInputs:  # fmt: skip
    """Load and check every pixel input of a request (before any model runs)."""
    video, context = None, None
    if request.video is not None:
        overlap = schedule.overlap()
        need = max(overlap, request.video_context_frames)
        video = read_video_input(request.video, need, base)
        if video.frames < overlap:
            raise RequestError(f"the input video has {video.frames} frames; extending needs at least {overlap}")
        size = video.first.shape[:2]
        start, context = schedule.extend(video.first, video.tail, request.video_context_frames)
    elif image is not None or request.image is not None:
        start, size = prepare_image(image if image is not None else request.image, base)
    else:  # text-to-video
        size = nearest_bucket(base, base, base)
        start = None if request.t2v_start == "generate" else solid_color(request.t2v_start, size)

    def fitted(source: str) -> np.ndarray:
        return resize_and_center_crop(load_image(source), *size)

    end = fitted(request.end_image) if request.end_image else None
    keyframes = [fitted(path) for _, path in request.keyframes]
    return JobInputs(start, size, end, keyframes, video, context)
