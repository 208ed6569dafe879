"""VAE wrapper: seeded encoding, frame arithmetic of decoding, and the latent preview by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo

from framepack import vae


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoencoderKLHunyuanVideo(
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=4
    ).eval()


def test_image_to_tensor_scaling():
    img = np.array([[[0, 127, 255]]], np.uint8)
    t = vae.image_to_tensor(img)
    assert t.shape == (1, 3, 1, 1, 1)
    assert t.flatten().tolist() == pytest.approx([-1.0, 127 / 127.5 - 1, 1.0])


def test_encode_is_seeded_and_scaled(model):
    img = (np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)
    a = vae.encode(model, img, torch.Generator().manual_seed(5))
    b = vae.encode(model, img, torch.Generator().manual_seed(5))
    c = vae.encode(model, img, torch.Generator().manual_seed(6))
    assert a.shape == (1, 16, 1, 4, 6) and torch.equal(a, b) and not torch.equal(a, c)
    with torch.no_grad():
        dist = model.encode(vae.image_to_tensor(img)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(5))
    expected = (dist.mean + dist.std * noise) * model.config.scaling_factor
    assert torch.allclose(a, expected, atol=1e-6)


@pytest.mark.parametrize("frames", [1, 2, 9])
def test_decode_gives_4t_minus_3_frames(model, frames):
    out = vae.decode(model, torch.randn(1, 16, frames, 4, 4))
    assert out.shape == (1, 3, 4 * frames - 3, 32, 32) and out.dtype == torch.float32


def test_tiled_decode_tiles_and_stays_close_on_a_trained_vae():
    """`tiling=True` really decodes in spatial tiles (diffusers' blended tiles; their sizes are shrunk here so
    a 96 px clip needs 2 x 2 of them), `tiling=False` never does (both decode long clips in temporal
    tiles: diffusers' framewise default), and on a trained VAE (the shipped toy one) the tiled
    reconstruction of a toy clip is about as good as the untiled one: the seams cost under 1 level of L1
    against the clip."""
    from framepack.registry import packaged_dir
    from framepack.train import toyfamily, toyworld

    m = toyfamily.load_vae(packaged_dir("toy")).float().eval()
    m.tile_sample_min_height = m.tile_sample_min_width = 64
    m.tile_sample_stride_height = m.tile_sample_stride_width = 48
    m.tile_sample_min_num_frames, m.tile_sample_stride_num_frames = 8, 4
    calls = []
    for name in ("tiled_decode", "_temporal_tiled_decode"):
        real = getattr(m, name)
        setattr(m, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    frames = toyworld.make_clip((5, 1), 1, size=96).frames[:17]  # (17, 96, 96, 3)
    z = vae.encode_frames(m, frames, torch.Generator().manual_seed(0))  # (1, 16, 5, 12, 12)
    plain = vae.decode(m, z, tiling=False)
    assert calls == ["_temporal_tiled_decode"]
    calls.clear()
    tiled = vae.decode(m, z, tiling=True)
    assert calls[0] == "_temporal_tiled_decode" and calls.count("tiled_decode") >= 2
    assert tiled.shape == plain.shape == (1, 3, 17, 96, 96)
    truth = torch.from_numpy(frames).float().permute(3, 0, 1, 2)[None] / 127.5 - 1

    def levels(x: torch.Tensor) -> float:
        return float(x.abs().mean() * 127.5)

    assert levels(tiled - plain) < 4.0  # measured 2.0; the seams alone reach tens of levels
    assert levels(tiled.clamp(-1, 1) - truth) < levels(plain.clamp(-1, 1) - truth) + 1.0  # measured +0.45


def test_preview_by_hand():
    """Channel 10 alone at 1.0: RGB = its row (.1166, .1627, .0962) + bias (.0259, -.0192, -.0761)."""
    z = torch.zeros(1, 16, 2, 3, 4)
    z[0, 10, 1] = 1.0
    img = vae.preview(z)
    assert img.shape == (3, 8, 3) and img.dtype == np.uint8  # (h, T*w, 3): frames side by side
    bias = np.clip(np.array([0.0259, -0.0192, -0.0761]), 0, 1)
    hot = np.clip(np.array([0.1166 + 0.0259, 0.1627 - 0.0192, 0.0962 - 0.0761]), 0, 1)
    assert (img[:, :4] == (bias * 255).astype(np.uint8)).all()
    assert (img[:, 4:] == (hot * 255).astype(np.uint8)).all()
