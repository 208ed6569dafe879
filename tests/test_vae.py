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


def test_tiled_decode_matches_untiled_on_a_small_input(model):
    z = torch.randn(1, 16, 2, 4, 4)
    assert torch.allclose(vae.decode(model, z, tiling=True), vae.decode(model, z, tiling=False), atol=1e-5)


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
