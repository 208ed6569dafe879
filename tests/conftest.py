"""Shared fixtures: tiny configs, hand-written index layouts from the spec, input builders."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh FRAMEPACK_HOME for one test module (its tiny family, prompt cache, LoRA folder)."""
    path = tmp_path_factory.mktemp("framepack-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("FRAMEPACK_HOME", str(path))
    yield path
    mp.undo()


@pytest.fixture
def app_env(tmp_path_factory, monkeypatch):
    """FRAMEPACK_HOME of the app tests: one for all of them (apphelpers.home), so the tiny models are made
    once and prompts stay cached (modules use it with `pytestmark = pytest.mark.usefixtures("app_env")`)."""
    from apphelpers import home as app_home

    monkeypatch.setenv("FRAMEPACK_HOME", app_home(tmp_path_factory))


@pytest.fixture
def queue(app_env, tmp_path):
    """A JobQueue on the tiny models in tmp_path/outputs (apphelpers.tiny_queue; modules may define their own)."""
    from apphelpers import tiny_queue

    yield from tiny_queue(tmp_path / "outputs")


@pytest.fixture(scope="module")
def pipe(home):
    """The tiny model on the CPU, loaded once per test module (in its own FRAMEPACK_HOME)."""
    from framepack.pipeline import load_pipeline

    return load_pipeline("tiny", device="cpu")


def force_streamed_transformer(monkeypatch) -> None:
    """Make every job's memory plan stream the transformer's blocks (the other models resident),
    whatever the device's free memory: the block streamer runs even for the tiny model."""
    import framepack.components as comp
    from framepack.memory import Mode, Placement, Plan

    real_plan = comp.plan_memory

    def streamed(footprints, **kw):
        plan = real_plan(footprints, **kw)
        placed = {f.name: Placement(Mode("stream" if f.name == "transformer" else "resident"), 1, 0, 2)
                  for f in footprints}  # fmt: skip
        return Plan(plan.budget_bytes, placed)

    monkeypatch.setattr(comp, "plan_memory", streamed)


# Frame-index layouts at latent window 9, copied from spec §3.1/§3.2 by hand (not from our schedules).
LAYOUTS = {
    # original (inverted): [pre | blank P | window | post | 2x | 4x], padding p=0 and p=3
    "original_p0": dict(latent=list(range(1, 10)), clean=[0, 10], x2=[11, 12], x4=list(range(13, 29))),
    "original_p3": dict(latent=list(range(28, 37)), clean=[0, 37], x2=[38, 39], x4=list(range(40, 56))),
    # F1 (forward): [start | 4x | 2x | 1x | window]
    "f1": dict(latent=list(range(20, 29)), clean=[0, 19], x2=[17, 18], x4=list(range(1, 17))),
}

# diffusers' HunyuanVideoFramepackTransformer3DModel names for the official keyword arguments.
DIFFUSERS_NAMES = {
    "image_embeddings": "image_embeds",
    "latent_indices": "indices_latents",
    "clean_latents": "latents_clean",
    "clean_latent_indices": "indices_latents_clean",
    "clean_latents_2x": "latents_history_2x",
    "clean_latent_2x_indices": "indices_latents_history_2x",
    "clean_latents_4x": "latents_history_4x",
    "clean_latent_4x_indices": "indices_latents_history_4x",
}


def make_inputs(
    cfg,
    layout: str = "original_p0",
    *,
    batch: int = 1,
    h: int = 16,
    w: int = 16,
    text_lens: tuple[int, ...] = (5,),
    text_total: int = 8,
    siglip_tokens: int = 7,
    parts: tuple[str, ...] = ("1x", "2x", "4x"),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Official keyword arguments for one section-step of the given layout."""
    assert len(text_lens) == batch
    g = torch.Generator().manual_seed(seed)
    lay = LAYOUTS[layout]
    c = cfg.in_channels

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    mask = torch.zeros(batch, text_total, dtype=torch.bool)
    for i, n in enumerate(text_lens):
        mask[i, :n] = True
    kw = dict(
        hidden_states=rnd(batch, c, len(lay["latent"]), h, w),
        timestep=torch.tensor([900.0 - 37 * i for i in range(batch)]),
        encoder_hidden_states=rnd(batch, text_total, cfg.text_embed_dim),
        encoder_attention_mask=mask,
        pooled_projections=rnd(batch, cfg.pooled_projection_dim),
        guidance=torch.full((batch,), 10000.0),
        latent_indices=torch.tensor([lay["latent"]]),
        image_embeddings=rnd(batch, siglip_tokens, cfg.image_proj_dim),
    )
    if "1x" in parts:
        kw.update(clean_latents=rnd(batch, c, 2, h, w), clean_latent_indices=torch.tensor([lay["clean"]]))
    if "2x" in parts:
        kw.update(clean_latents_2x=rnd(batch, c, 2, h, w), clean_latent_2x_indices=torch.tensor([lay["x2"]]))
    if "4x" in parts:
        kw.update(clean_latents_4x=rnd(batch, c, 16, h, w), clean_latent_4x_indices=torch.tensor([lay["x4"]]))
    return kw


def to_diffusers_kwargs(kw: dict) -> dict:
    """Rename for diffusers' class, which takes 1-D indices shared by the batch."""
    out = {}
    for k, v in kw.items():
        if k.endswith("indices"):
            v = v[0]
        out[DIFFUSERS_NAMES.get(k, k)] = v
    return out


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random value (norm weights around 1) so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name and name.endswith("weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return model


@pytest.fixture
def tiny_config():
    from framepack.config import TINY

    return TINY


def assert_same_file(a, b) -> None:
    """Two MP4s of the same job (same request and seed, resumed or not, in this process or another):
    the same bytes. x264 is limited to its reproducible code (framepack.video._x264_params), so
    "same seed, same video" holds exactly, not within codec noise."""
    import hashlib
    from pathlib import Path

    da, db = (hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in (a, b))
    assert da == db, f"{a} and {b} differ"
