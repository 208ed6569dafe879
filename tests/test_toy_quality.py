"""The toy-quality benchmark's measurements (framepack.train.quality), checked on videos whose answer is
known (the ground truth itself, a shifted copy, a copy without the object), so its numbers mean what
its table says."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from framepack.train import quality as Q
from framepack.train import toyworld


def _background_video(clip) -> np.ndarray:
    """The clip's frames without its object: the scene's background in every frame."""
    return np.broadcast_to(np.rint(toyworld.background_image(clip.scene)).astype(np.uint8), clip.frames.shape)


def test_held_out_scenes_are_single_moving_objects_not_in_training():
    clips = Q.held_out_scenes(8, 2, plain_size=True)
    assert len(clips) == 8 and all(c.seed[0] == Q.HELD_OUT for c in clips)
    for c in clips:
        (o,) = c.scene.objects
        assert o.direction is not None and o.growth == 0 and len(c.frames) == 73
    # `first` skips qualifying scenes: the fresh set continues the list, sharing no scene with its head
    head, fresh = Q.held_out_scenes(5, 1), Q.held_out_scenes(3, 1, first=2)
    assert [c.seed for c in fresh] == [c.seed for c in head[2:]]
    assert [c.caption for c in fresh] == [c.caption for c in head[2:]]


def test_motion_metrics_on_known_videos():
    judged = 0
    for clip in Q.held_out_scenes(6, 2):
        truth = Q.motion_metrics(clip.frames, clip)
        assert truth["error"] < 0.2 and truth["lost"] == 0.0 and truth["direction_ok"] is not False
        judged += truth["direction_ok"] is True
        # the same motion drawn 4 px further right (partly cut off at the right wall in a few frames)
        moved = dataclasses.replace(clip.truth, centers=clip.truth.centers + np.array([4.0, 0.0]))
        shifted = Q.motion_metrics(toyworld.render(clip.scene, moved), clip)
        assert 3.5 < shifted["error"] < 4.5, shifted
        empty = Q.motion_metrics(_background_video(clip), clip)
        assert empty["lost"] == 1.0 and empty["direction_ok"] is not True  # None: bounce too early to judge
    assert judged >= 4
    # an object moving the wrong way: the truth's frames of a scene with the opposite velocity
    clip = Q.held_out_scenes(1, 1)[0]
    o = clip.scene.objects[0]
    back = toyworld.SceneSpec(clip.scene.size, clip.scene.background, clip.scene.gradient,
                              (toyworld.replace(o, vx=-o.vx, vy=-o.vy),))  # fmt: skip
    frames = toyworld.render(back, toyworld.simulate(back, len(clip.frames)))
    assert Q.motion_metrics(frames, clip)["direction_ok"] is False


def test_direction_is_read_between_the_frames_where_the_object_is_found():
    clip = next(c for c in Q.held_out_scenes(12, 2) if not c.truth.bounced[: Q.SECTION_FRAMES + 1, 0].any())
    assert Q.motion_metrics(clip.frames, clip)["direction_ok"] is True
    background = _background_video(clip)
    hidden = clip.frames.copy()
    hidden[Q.SECTION_FRAMES - 2 : Q.SECTION_FRAMES + 1] = background[:3]  # lost at the window's end
    hidden[:2] = background[:2]  # and at its start
    m = Q.motion_metrics(hidden, clip)
    assert m["lost"] > 0 and m["direction_ok"] is True
    hidden[6:] = background[6:]  # found only in frames 2..5: a span too short to show a direction
    assert Q.motion_metrics(hidden, clip)["direction_ok"] is False


def test_appearance_on_known_frames():
    clip = Q.held_out_scenes(1, 1, plain_size=True)[0]
    truth = Q.appearance(clip.frames, clip.scene)
    assert truth["color"] < 1.0 and truth["size"] < 0.15 and truth["background"] < 1.0
    dim = (clip.frames.astype(np.float32) * 0.7).astype(np.uint8)  # everything 30% darker
    dimmed = Q.appearance(dim, clip.scene)
    assert dimmed["color"] > 30 and dimmed["background"] > 5
    gone = Q.appearance(_background_video(clip), clip.scene)
    assert gone["size"] == 1.0 and gone["color"] > 60


def test_vae_round_trip_converts_frames_and_the_shipped_vae_keeps_slow_objects():
    import types

    import torch

    class Identity:  # a VAE whose posterior is its input with no spread: the round trip gives the frames back
        device, dtype = torch.device("cpu"), torch.float32
        config = types.SimpleNamespace(scaling_factor=0.5)

        def encode(self, x):
            return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=x, std=torch.zeros_like(x)))

        def decode(self, z):
            return types.SimpleNamespace(sample=z)

        def enable_tiling(self):
            raise AssertionError("the round trip decodes the clip in one pass")

        def disable_tiling(self):
            pass

    clip = Q.held_out_scenes(1, 1)[0]
    back = Q.vae_round_trip(Identity(), clip.frames)
    assert back.shape == clip.frames.shape and back.dtype == np.uint8
    # the saver truncates (as the official one does): float error may cost one level, never more
    assert np.abs(back.astype(int) - clip.frames.astype(int)).max() <= 1
    assert (back == clip.frames).mean() > 0.9
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        Q.vae_round_trip(Identity(), clip.frames[:-1])

    from framepack.registry import packaged_dir
    from framepack.train import toyfamily

    vae = toyfamily.load_vae(packaged_dir("toy")).float().eval()
    slow = next(c for c in Q.held_out_scenes(12, 1) if "slowly" in c.caption and c.scene.objects[0].size > 6)
    rt = Q.vae_round_trip(vae, slow.frames)
    assert rt.shape == slow.frames.shape and rt.dtype == np.uint8
    m = Q.motion_metrics(rt, slow)
    assert m["error"] < 4.0 and m["lost"] < 0.2, m
