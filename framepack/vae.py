"""The HunyuanVideo causal 3D VAE (diffusers' AutoencoderKLHunyuanVideo): 8x spatial, 4x temporal,
16 latent channels; T latent frames decode to 4T - 3 pixel frames.

`encode` samples the posterior with an explicit generator (the official samples unseeded, so its
runs are not reproducible). `decode` optionally tiles (spatial 256 px tiles, temporal 16-frame
tiles, diffusers' defaults) to bound memory. `preview` is the cheap latent -> RGB projection shown
while sampling (spec §5), no VAE involved.
"""

from __future__ import annotations

import numpy as np
import torch

# Rows: latent channels 0..15; columns: R, G, B (ComfyUI's HunyuanVideo factors, spec §5).
_PREVIEW_WEIGHTS = torch.tensor(
    [
        [-0.0395, -0.0331, 0.0445], [0.0696, 0.0795, 0.0518], [0.0135, -0.0945, -0.0282],
        [0.0108, -0.0250, -0.0765], [-0.0209, 0.0032, 0.0224], [-0.0804, -0.0254, -0.0639],
        [-0.0991, 0.0271, -0.0669], [-0.0646, -0.0422, -0.0400], [-0.0696, -0.0595, -0.0894],
        [-0.0799, -0.0208, -0.0375], [0.1166, 0.1627, 0.0962], [0.1165, 0.0432, 0.0407],
        [-0.2315, -0.1920, -0.1355], [-0.0270, 0.0401, -0.0821], [-0.0616, -0.0997, -0.0727],
        [0.0249, -0.0469, -0.1703],
    ]
)  # fmt: skip
_PREVIEW_BIAS = torch.tensor([0.0259, -0.0192, -0.0761])


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, 1, H, W) float in [-1, 1] (pixel / 127.5 - 1)."""
    return (torch.from_numpy(np.ascontiguousarray(image)).float() / 127.5 - 1).permute(2, 0, 1)[None, :, None]


@torch.no_grad()
def encode(vae, image: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """Start latent (1, C, 1, H/8, W/8) in fp32 on the CPU, scaled by the VAE's scaling factor."""
    x = image_to_tensor(image).to(vae.device, vae.dtype)
    dist = vae.encode(x).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(dist.mean.device)
    latent = dist.mean.float() + dist.std.float() * noise  # a seeded posterior sample
    return (latent * vae.config.scaling_factor).cpu()


@torch.no_grad()
def encode_frames(vae, frames: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """Latents (1, C, K, H/8, W/8) of consecutive frames (T, H, W, 3) uint8, an input video's tail.

    The causal VAE maps 4K-3 frames to K latents; extra frames at the start are dropped. The first
    latent of a clip stands for one frame, as it does for every decoded window of FramePack.
    """
    keep = (len(frames) - 1) // 4 * 4 + 1
    x = torch.from_numpy(np.ascontiguousarray(frames[len(frames) - keep :])).float() / 127.5 - 1
    x = x.permute(3, 0, 1, 2)[None].to(vae.device, vae.dtype)  # (1, 3, T, H, W)
    dist = vae.encode(x).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(dist.mean.device)
    return ((dist.mean.float() + dist.std.float() * noise) * vae.config.scaling_factor).cpu()


@torch.no_grad()
def decode(vae, latents: torch.Tensor, *, tiling: bool = False) -> torch.Tensor:
    """(B, C, T, h, w) latents -> (B, 3, 4T-3, 8h, 8w) pixels in about [-1, 1], fp32 on the CPU."""
    if tiling:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    z = (latents / vae.config.scaling_factor).to(vae.device, vae.dtype)
    return vae.decode(z).sample.float().cpu()


def preview(latents: torch.Tensor) -> np.ndarray:
    """(1, C, T, h, w) latents -> (h, T*w, 3) uint8: the frames side by side at latent resolution."""
    x = latents[0].float().cpu()  # (C, T, h, w)
    rgb = torch.einsum("cthw,cr->rthw", x, _PREVIEW_WEIGHTS) + _PREVIEW_BIAS[:, None, None, None]
    rgb = (rgb.clamp(0, 1) * 255).to(torch.uint8)  # (3, T, h, w)
    return rgb.permute(2, 1, 3, 0).reshape(x.shape[2], -1, 3).numpy()  # h, (t w), rgb
