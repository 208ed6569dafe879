"""Measurements of generated toy videos against the toy world's ground truth (benchmarks/toy_quality.py).

The toy world knows the answer for every clip it makes (the object's colour, size and centre in every
frame, when it bounces), so a generated video can be scored instead of looked at:

  * `held_out_scenes(count, sections)`: the evaluation clips. Single moving objects from seeds
    (HELD_OUT, i), never seen in training (its clips use (data seed, i), seed 0 for the shipped
    model). `first` skips the head of the list (a fresh set), `plain_size` drops growing shapes.
  * `motion_metrics(frames, clip)`: does the object move where the truth moves? A colour tracker follows
    it in the frames: the mean centroid error in pixels per frame (over the frames where it is found),
    the fraction of frames where it is lost, and whether its early motion (up to the first bounce,
    within the first section) points within 45 degrees of the true direction (None: too short a
    window to judge).
  * `appearance(frames, scene)`: does it still look right? Means over the frames of the object's colour
    error (median of its pixels vs the truth, RGB units), its relative size error (square root of its
    area) and the background's colour error away from it. The drift benchmark compares the first and
    the last section of a long video.
  * `vae_round_trip(vae, frames)`: the truth encoded and decoded with the pipeline's own conversions,
    the bound the VAE puts on every number above.
"""

from __future__ import annotations

import math

import numpy as np

from framepack.train import toyworld

HELD_OUT = 7_777  # first element of every held-out scene seed; training clips use (data seed, i) with seed 0
SECTION_FRAMES = 36  # window 9


def held_out_scenes(count: int, sections: int, *, first: int = 0, plain_size: bool = False) -> list:
    """Single-object moving scenes from seeds (HELD_OUT, i), skipping the first `first` of them;
    `plain_size` also excludes growing shapes."""
    out, i, skipped = [], 0, 0
    while len(out) < count:
        clip = toyworld.make_clip((HELD_OUT, i), sections, max_objects=1)
        o = clip.scene.objects[0]
        i += 1
        if o.direction is None or (plain_size and o.growth):
            continue
        if skipped < first:
            skipped += 1
            continue
        out.append(clip)
    return out


def vae_round_trip(vae, frames: np.ndarray, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8, T = 4k+1 -> the same clip encoded and decoded by `vae` in one pass.

    The conversions are the pipeline's own (a seeded posterior sample, decode, clamp and truncate to
    uint8), so the only difference from a generated video is where the latents came from.
    """
    import torch

    from framepack import vae as vae_io
    from framepack.video import to_uint8_frames

    if (len(frames) - 1) % 4:
        raise ValueError(f"the VAE round trip needs 4k+1 frames, got {len(frames)}")
    latents = vae_io.encode_frames(vae, frames, torch.Generator().manual_seed(seed))
    return to_uint8_frames(vae_io.decode(vae, latents))


def motion_metrics(gen: np.ndarray, clip) -> dict:
    """Centroid error (px per frame), fraction of frames lost, early direction correct (or None)."""
    o, truth = clip.scene.objects[0], clip.truth
    n = min(len(gen), truth.frames)
    cent, _ = toyworld.track(gen[:n], o.rgb)
    true = truth.centers[:n, 0]
    err = np.linalg.norm(cent - true, axis=1)
    lost = np.isnan(err)
    # early motion: frames 0..k, up to the first bounce (or the first section); judged when k >= 6.
    # The direction is read between the first and the last frame of that window in which the object
    # is found (a frame lost at either end does not make a correct motion wrong); an object found in
    # fewer than 6 frames' span of the window shows no direction, which counts as wrong.
    bounce = np.flatnonzero(truth.bounced[:n, 0])
    k = min(int(bounce[0]) - 1 if len(bounce) else n - 1, SECTION_FRAMES)
    ok = None
    if k >= 6:
        found = np.flatnonzero(~lost[: k + 1])
        ok = False
        if len(found) and found[-1] - found[0] >= 6:
            d = cent[found[-1]] - cent[found[0]]
            v = np.array([o.vx, o.vy])
            cos = float(d @ v / (np.linalg.norm(d) * np.linalg.norm(v) + 1e-9))
            ok = cos > math.cos(math.radians(45))
    return {"error": float(np.nanmean(err)) if (~lost).any() else float("nan"), "lost": float(lost.mean()),
            "direction_ok": ok}  # fmt: skip


def appearance(frames: np.ndarray, scene) -> dict:
    """Mean over `frames` of: object colour error, relative size error, background colour error (RGB units)."""
    o = scene.objects[0]
    bg = toyworld.background_image(scene)  # (H, W, 3) float
    area = float(toyworld.coverage(o.shape, o.x, o.y, o.size, o.angle, scene.size).sum())
    col, size, back = [], [], []
    for f in frames.astype(np.float32):
        dist = np.sqrt(((f - bg) ** 2).sum(-1))
        mask = dist > 60.0
        grown = mask.copy()
        for dy in (-2, -1, 0, 1, 2):
            for dx in (-2, -1, 0, 1, 2):
                grown |= np.roll(np.roll(mask, dy, 0), dx, 1)
        if mask.sum() >= 3:
            col.append(float(np.linalg.norm(np.median(f[mask], axis=0) - np.array(o.rgb, np.float32))))
        else:
            col.append(float(np.linalg.norm(bg.mean((0, 1)) - np.array(o.rgb, np.float32))))  # object gone
        size.append(abs(math.sqrt(mask.sum()) - math.sqrt(area)) / math.sqrt(area))
        back.append(float(np.abs(f[~grown] - bg[~grown]).mean()) if (~grown).any() else float("nan"))
    return {"color": float(np.mean(col)), "size": float(np.mean(size)), "background": float(np.nanmean(back))}
