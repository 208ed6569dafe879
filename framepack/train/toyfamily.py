"""The toy model family: every FramePack component at toy size, in the real repos' on-disk layout.

    <root>/encoders/tokenizer, tokenizer_2      word-level tokenizers over the toy vocabulary
    <root>/encoders/text_encoder                LlamaModel   (frozen at its seeded initialisation)
    <root>/encoders/text_encoder_2              CLIPTextModel (frozen at its seeded initialisation)
    <root>/encoders/vae                         AutoencoderKLHunyuanVideo, trained on toy frames (`train_vae`)
    <root>/image/feature_extractor, image_encoder  SigLIP processor + SiglipVisionModel (frozen, seeded)
    <root>/transformer                          the FramePack transformer (written by `package`)
    <root>/manifest.json                        versions, seeds, configs, training records

This is the layout of `framepack.tiny`'s family folder, so the registry's `toy` / `toy-f1` load it
through exactly the code that loads the real weights. Weights are stored in bf16 (the package ships
at <= 25 MB); the engine loads them as fp32 on the CPU. The frozen encoders are written once, in
bf16, before anything is encoded with them, so cached embeddings always match the shipped weights.

Frozen random encoders are enough: the transformer learns to read them. Two choices make their
outputs informative: the LLaMA token embeddings have unit scale and its layers a 0.1 init (so
`hidden_states[-3]` keeps word identity and mixes in word order), and CLIP uses a larger init so
its pooled vector varies with the caption.

`train_vae` trains the VAE on freshly generated toy clips: L1 + MSE reconstruction and a small KL,
with some steps decoding the way diffusers' temporal tiles do (a tile that starts mid-video decodes
its first latent as a lone frame and drops it) and some on single frames (inference encodes the start
image alone, and the VAE's GroupNorms pool over time, so a lone frame is a case of its own), then
sets `scaling_factor` so that scaled latents have unit standard deviation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from framepack.config import FRAMEPACK_HY, TransformerConfig
from framepack.tiny import WORDS, write_prompt_tokenizers
from framepack.train import toyworld
from framepack.train.checkpoints import CsvLog, checkpoint_path, latest, load_state, prune, save_state
from framepack.train.lr import warmup_cosine

VERSION = "toy-v1"
FAMILY_SEED = 20251121


@dataclass(frozen=True)
class FamilyConfig:
    """Sizes of the frozen encoders and the VAE (the transformer's are in `TransformerConfig`)."""

    llama_hidden: int = 64
    llama_layers: int = 3  # hidden_states[-3] = the output of layer 1
    llama_heads: int = 4
    llama_mlp: int = 128
    llama_init: float = 0.1
    clip_hidden: int = 32
    clip_layers: int = 2
    clip_heads: int = 2
    clip_mlp: int = 64
    clip_init_factor: float = 5.0
    siglip_hidden: int = 64
    siglip_layers: int = 2
    siglip_heads: int = 2
    siglip_mlp: int = 128
    siglip_image: int = 64
    siglip_patch: int = 16  # 4 x 4 = 16 image tokens
    vae_channels: tuple[int, ...] = (32, 32, 32, 32)  # >= 17 at full resolution: see README (oneDNN path)
    vae_layers: int = 1
    vae_groups: int = 8

    def transformer_config(self, base: TransformerConfig) -> TransformerConfig:
        """`base` with the conditioning widths of these encoders."""
        return dataclasses.replace(
            base,
            text_embed_dim=self.llama_hidden,
            pooled_projection_dim=self.clip_hidden,
            image_proj_dim=self.siglip_hidden,
        )


TOY_FAMILY = FamilyConfig()
# The shipped transformer: 128 wide (4 heads x 32), 2 double + 6 single blocks, 1 refiner block.
TOY_TRANSFORMER = TOY_FAMILY.transformer_config(
    dataclasses.replace(
        FRAMEPACK_HY,
        num_attention_heads=4,
        attention_head_dim=32,
        num_layers=2,
        num_single_layers=6,
        num_refiner_layers=1,
        rope_axes_dim=(8, 12, 12),
    )
)
# A much smaller family for tests and smoke runs (seconds to build and train).
MINI_FAMILY = dataclasses.replace(
    TOY_FAMILY,
    llama_hidden=32,
    llama_mlp=64,
    clip_hidden=16,
    clip_mlp=32,
    siglip_hidden=24,
    siglip_mlp=48,
    siglip_image=32,
    vae_channels=(8, 8, 8, 8),
    vae_groups=4,
)
MINI_TRANSFORMER = MINI_FAMILY.transformer_config(
    dataclasses.replace(
        FRAMEPACK_HY,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        rope_axes_dim=(4, 6, 6),
    )
)
FAMILIES = {"toy": (TOY_FAMILY, TOY_TRANSFORMER), "mini": (MINI_FAMILY, MINI_TRANSFORMER)}


def vocabulary() -> list[str]:
    """The tokenizers' words: the prompt template's and everyday words of the tiny family + the toy grammar."""
    return sorted(set(WORDS) | set(toyworld.VOCAB))


def family_paths(root: str | os.PathLike) -> dict[str, Path]:
    """Component name -> folder, with the names of `ModelSpec.sources`."""
    root = Path(root)
    enc, img = root / "encoders", root / "image"
    return {
        "transformer": root / "transformer",
        "text_encoder": enc / "text_encoder",
        "tokenizer": enc / "tokenizer",
        "text_encoder_2": enc / "text_encoder_2",
        "tokenizer_2": enc / "tokenizer_2",
        "vae": enc / "vae",
        "feature_extractor": img / "feature_extractor",
        "image_encoder": img / "image_encoder",
    }


def read_manifest(root: str | os.PathLike) -> dict:
    p = Path(root) / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else {}


def write_manifest(root: str | os.PathLike, manifest: dict) -> None:
    p = Path(root) / "manifest.json"
    tmp = p.with_name(p.name + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, p)


# ------------------------------------------------------------------------------------ the family
def _quiet() -> None:
    import diffusers
    import transformers

    diffusers.logging.set_verbosity_error()  # "cast with to()" notes about the bf16 copies we save on purpose
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def build_vae(cfg: FamilyConfig):
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=cfg.vae_layers,
        latent_channels=16,
        norm_num_groups=cfg.vae_groups,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )


def _tap(conv: torch.nn.Conv3d, out_ch: int, in_ch: int, value: float, spatial=None) -> None:
    """Set the causal "current frame" tap (time index 2) of a 3x3x3 causal conv, centre or a 3x3 kernel."""
    k = conv.weight.shape[2] - 1
    if spatial is None:
        conv.weight[out_ch, in_ch, k, conv.weight.shape[3] // 2, conv.weight.shape[4] // 2] = value
    else:
        conv.weight[out_ch, in_ch, k] = value * spatial


POSTERIOR_LOGVAR = -6.0  # the fresh VAE's posterior log-variance bias: near-deterministic (std e^-3)


def _linear_start_problem(vae) -> str | None:
    """Why `linear_start` cannot shape this VAE (it needs groups of 4 channels, at least 3 of them), or None."""
    channels, groups = vae.encoder.conv_in.conv.weight.shape[0], vae.encoder.conv_norm_out.num_groups
    gs = channels // groups
    if gs != 4 or groups < 3:
        return f"linear_start needs groups of 4 channels and at least 3 groups, got {groups} x {gs}"
    return None


@torch.no_grad()
def linear_start(vae, reference: float = 8.0) -> None:
    """Start the VAE as a blocky linear autoencoder of the RGB colour, with every residual branch open
    to learn the rest.

    A GroupNorm on the main path removes each group's mean over channels and space, which hides a
    flat colour from a randomly initialised network (it learns colours very slowly). Here groups 0-2
    carry (c, -c, K, -K) for c = R, G, B and a constant K: the group mean is exactly 0 and its std
    nearly constant (K >> |c|), so the normalisation passes c through linearly, and after the SiLU
    silu(c) - silu(-c) = c reads it back. Residual branches (conv2, attention outputs) start at zero,
    the strided convs average (tent) or repeat, so encode -> decode starts as 8x8 block colours.
    """
    if (problem := _linear_start_problem(vae)) is not None:
        raise ValueError(problem)
    channels = vae.encoder.conv_in.conv.weight.shape[0]
    k2 = reference / math.sqrt(2.0)  # GroupNorm weight undoing the division by std = K / sqrt(2)
    tent = torch.tensor([0.25, 0.5, 0.25])
    tent2 = tent[:, None] * tent[None, :]
    for name, m in vae.named_modules():  # residual branches: zero (identity blocks)
        if name.endswith(".conv2"):
            m.conv.weight.zero_()
            m.conv.bias.zero_()
        if name.endswith("attentions.0"):
            m.to_out[0].weight.zero_()
            m.to_out[0].bias.zero_()
    for part in (vae.encoder, vae.decoder):
        for name, m in part.named_modules():
            if isinstance(m, torch.nn.Conv3d) and (".downsamplers." in name or ".upsamplers." in name):
                m.weight.zero_()
                m.bias.zero_()
                for c in range(channels):
                    _tap(m, c, c, 1.0, tent2 if ".downsamplers." in name else None)
        norm = part.conv_norm_out
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        norm.weight[:12] = k2
    # encoder: RGB -> (c, -c, K, -K) in groups 0-2; its output -> latent channels 0-2 = R, G, B
    enc_in, enc_out = vae.encoder.conv_in.conv, vae.encoder.conv_out.conv
    dec_in, dec_out = vae.decoder.conv_in.conv, vae.decoder.conv_out.conv
    for conv in (enc_in, enc_out, dec_in, dec_out):
        conv.weight.mul_(0.1)  # the other channels start small: learnable, not in the way
        conv.bias.zero_()
    for g in range(3):
        for conv in (enc_in, dec_in):
            conv.weight[4 * g : 4 * g + 4].zero_()
            _tap(conv, 4 * g, g, 1.0)
            _tap(conv, 4 * g + 1, g, -1.0)
            conv.bias[4 * g + 2], conv.bias[4 * g + 3] = reference, -reference
        for conv in (enc_out, dec_out):
            conv.weight[g].zero_()
            _tap(conv, g, 4 * g, 1.0)
            _tap(conv, g, 4 * g + 1, -1.0)
    latent = vae.post_quant_conv.weight.shape[0]
    enc_out.weight[latent : latent + 3].zero_()  # log-variance of the colour channels: from the bias
    for conv in (vae.quant_conv, vae.post_quant_conv):
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(conv.weight.shape[0]):
            conv.weight[c, c] = 1.0
    vae.quant_conv.bias[latent:] = POSTERIOR_LOGVAR


def build_family(root: str | os.PathLike, cfg: FamilyConfig = TOY_FAMILY, seed: int = FAMILY_SEED) -> Path:
    """Write tokenizers, the frozen encoders and an untrained VAE under `root` (bf16 weights)."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        LlamaConfig,
        LlamaModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from framepack.encoders import siglip_processor_class

    SiglipImageProcessor = siglip_processor_class()

    _quiet()
    root = Path(root)
    paths = family_paths(root)
    # the tiny family's word tokenizers (framepack.tiny) over the larger toy vocabulary
    llama_tok, clip_tok = write_prompt_tokenizers(vocabulary(), paths["tokenizer"], paths["tokenizer_2"])

    torch.manual_seed(seed)
    llama = LlamaModel(
        LlamaConfig(
            vocab_size=len(llama_tok), hidden_size=cfg.llama_hidden, intermediate_size=cfg.llama_mlp,
            num_hidden_layers=cfg.llama_layers, num_attention_heads=cfg.llama_heads,
            num_key_value_heads=cfg.llama_heads, max_position_embeddings=2048, initializer_range=cfg.llama_init,
            bos_token_id=llama_tok.bos_token_id, eos_token_id=llama_tok.eos_token_id,
            pad_token_id=llama_tok.pad_token_id,
        )
    )  # fmt: skip
    with torch.no_grad():  # unit-scale word vectors: the states the transformer reads are O(1)
        llama.embed_tokens.weight.normal_(0.0, 1.0)
    llama.to(torch.bfloat16).save_pretrained(paths["text_encoder"])

    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=cfg.clip_hidden, intermediate_size=cfg.clip_mlp,
            num_hidden_layers=cfg.clip_layers, num_attention_heads=cfg.clip_heads, max_position_embeddings=77,
            initializer_factor=cfg.clip_init_factor, bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
        )
    )  # fmt: skip
    clip.to(torch.bfloat16).save_pretrained(paths["text_encoder_2"])

    torch.manual_seed(seed + 2)
    vae = build_vae(cfg)
    if _linear_start_problem(vae) is None:
        linear_start(vae)  # a randomly initialised VAE learns colours very slowly (see linear_start)
    else:  # (the test-size family) near-deterministic posterior only
        with torch.no_grad():
            vae.quant_conv.bias[vae.post_quant_conv.weight.shape[0] :] = POSTERIOR_LOGVAR
    vae.to(torch.bfloat16).save_pretrained(paths["vae"])

    torch.manual_seed(seed + 3)
    SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=cfg.siglip_hidden, intermediate_size=cfg.siglip_mlp, num_hidden_layers=cfg.siglip_layers,
            num_attention_heads=cfg.siglip_heads, image_size=cfg.siglip_image, patch_size=cfg.siglip_patch,
        )
    ).to(torch.bfloat16).save_pretrained(paths["image_encoder"])  # fmt: skip
    s = cfg.siglip_image
    SiglipImageProcessor(
        size={"height": s, "width": s}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(paths["feature_extractor"])
    write_manifest(
        root,
        {
            "family": "framepack-toy",
            "version": VERSION,
            "seed": seed,
            "config": dataclasses.asdict(cfg),
            "vae": {"trained": False},
        },
    )
    return root


def load_vae(root: str | os.PathLike, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo.from_pretrained(family_paths(root)["vae"], torch_dtype=dtype)


# ------------------------------------------------------------------------------------ VAE training
@dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 2000
    batch_size: int = 2
    frames: int = 9  # 3 latents; must be 4k + 1
    # From the linear start, Adam at 3e-5 or more first undoes it (the zero-initialised residual branches
    # all move at once); 1e-5 improves steadily (measured: block L1 0.060 -> 0.054 in 80 steps).
    lr: float = 1e-5
    warmup: int = 100
    kl_weight: float = 1e-4  # on the mean KL per latent element (L1/MSE are means per pixel value)
    tile_probability: float = 0.2  # steps that decode latents[1:] like a mid-video tile
    # steps on single frames (every frame of the batch alone): the start image is encoded alone, and
    # most of what the VAE has to learn (colours, shapes) is per image
    single_probability: float = 0.5
    size: int = toyworld.DEFAULT_SIZE
    seed: int = 0
    save_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    calibration_clips: int = 32


def _toy_batch(cfg: VAETrainConfig, step: int) -> torch.Tensor:
    """(B, 3, frames, H, W) in [-1, 1]: fresh toy clips, seeded by (seed, step, i)."""
    clips = []
    for i in range(cfg.batch_size):
        rng = np.random.default_rng([cfg.seed, step, i])
        scene = toyworld.sample_scene(rng, cfg.size)
        clips.append(toyworld.render(scene, toyworld.simulate(scene, cfg.frames)))
    x = torch.from_numpy(np.stack(clips)).float() / 127.5 - 1  # (B, T, H, W, 3)
    return x.permute(0, 4, 1, 2, 3).contiguous()  # (B, 3, T, H, W)


def _posterior(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log-variance (B, 16, T', h, w) of the whole clip, encoded in one causal pass (no tiles)."""
    moments = vae.quant_conv(vae.encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def vae_loss(vae, x: torch.Tensor, cfg: VAETrainConfig, mode: str, generator: torch.Generator) -> dict:
    """mode: "clip" (encode and decode the whole clip), "tile" (decode latents 1.. as a mid-video tile
    does: the first comes out as one frame, dropped) or "single" (the first frame alone)."""
    if mode == "single":  # every frame of the batch as an image of its own: many images for one step's cost
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, 1, h, w)
    mean, logvar = _posterior(vae, x)
    z = mean + torch.randn(mean.shape, generator=generator) * (0.5 * logvar).exp()
    if mode == "tile":
        recon = vae.decoder(vae.post_quant_conv(z[:, :, 1:]))[:, :, 1:]
        target = x[:, :, 5:]
    else:
        recon = vae.decoder(vae.post_quant_conv(z))
        target = x
    l1 = (recon - target).abs().mean()
    mse = (recon - target).square().mean()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    return {"loss": l1 + mse + cfg.kl_weight * kl, "l1": l1, "mse": mse, "kl": kl}


@torch.no_grad()
def calibrate_scaling(vae, cfg: VAETrainConfig, clips: int) -> dict:
    """1 / std of the posterior means over `clips` fresh toy clips (HunyuanVideo has no shift factor)."""
    means = []
    for i in range(clips):
        x = _toy_batch(dataclasses.replace(cfg, batch_size=1, seed=cfg.seed + 7919), 10_000_000 + i)
        means.append(_posterior(vae, x)[0])
    m = torch.cat(means)
    std = float(m.std())
    return {"scaling_factor": 1.0 / std, "latent_std": std, "latent_mean": float(m.mean())}


def train_vae(root: str | os.PathLike, out: str | os.PathLike, cfg: VAETrainConfig, *, resume: bool = False,
              progress: bool = True) -> dict:  # fmt: skip
    """Train the family's VAE on toy clips; write it (bf16, calibrated scaling) to <root>/encoders/vae.

    `out` holds checkpoints (step_XXXXXXXX.pt) and loss.csv; `resume` continues from the newest one.
    Returns the training record stored in the manifest.
    """
    from tqdm import tqdm

    if (cfg.frames - 1) % 4:
        raise ValueError(f"frames must be 4k + 1 (the VAE's causal layout), got {cfg.frames}")
    _quiet()
    root, out = Path(root), Path(out)
    torch.manual_seed(cfg.seed)
    vae = load_vae(root).train()
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    log = CsvLog(out / "loss.csv", ["step", "loss", "l1", "mse", "kl", "lr", "seconds"])
    step, elapsed = 0, 0.0
    ckpt = latest(out / "checkpoints") if resume else None
    if ckpt is not None:
        state = load_state(ckpt)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, elapsed = state["step"], state["seconds"]
        log.truncate(step)
    t0, window = time.perf_counter() - elapsed, []
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, unit="step", desc="vae", dynamic_ncols=True)
    while step < cfg.steps:
        lr = warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup)  # cosine down to 0.1 lr
        for g in opt.param_groups:
            g["lr"] = lr
        x = _toy_batch(cfg, step)
        u = float(torch.rand((), generator=gen))
        mode = (
            "single"
            if u < cfg.single_probability
            else "tile"
            if u < cfg.single_probability + cfg.tile_probability
            else "clip"
        )
        parts = vae_loss(vae, x, cfg, mode, gen)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        values = {k: v.item() for k, v in parts.items()}
        window.append(values)
        bar.set_postfix_str(f"loss {values['loss']:.4f} l1 {values['l1']:.4f}", refresh=False)
        if step % cfg.log_every == 0 or step == cfg.steps:  # means over the steps since the last row
            means = {k: sum(v[k] for v in window) / len(window) for k in values}
            log.write({"step": step, **means, "lr": lr, "seconds": round(time.perf_counter() - t0, 1)})
            window = []
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_state(checkpoint_path(out / "checkpoints", step), {
                "model": vae.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                "step": step, "seconds": time.perf_counter() - t0, "config": dataclasses.asdict(cfg),
            })  # fmt: skip
            prune(out / "checkpoints", cfg.keep_checkpoints)
    bar.close()
    seconds = time.perf_counter() - t0
    # Round to bf16 first: the scaling factor, the dataset latents and the shipped decoder then all
    # see the very weights that ship.
    vae = vae.to(torch.bfloat16).float().eval()
    cal = calibrate_scaling(vae, cfg, cfg.calibration_clips)
    vae.register_to_config(scaling_factor=cal["scaling_factor"])
    vae.use_framewise_encoding = vae.use_framewise_decoding = True
    target = family_paths(root)["vae"]
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.to(torch.bfloat16).save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    rows = log.rows()
    tail = [float(r["l1"]) for r in rows[-10:]] if rows else []
    record = {"trained": True, "steps": cfg.steps, "seconds": round(seconds, 1), "config": dataclasses.asdict(cfg),
              "final_l1": sum(tail) / len(tail) if tail else None, **cal}  # fmt: skip
    manifest = read_manifest(root)
    manifest["vae"] = record
    write_manifest(root, manifest)
    return record


# ------------------------------------------------------------------------------------ packaging
def package(family: str | os.PathLike, transformer: str | os.PathLike, out: str | os.PathLike,
            *, dtype: torch.dtype = torch.bfloat16, training: dict | None = None) -> Path:  # fmt: skip
    """Copy the family and the trained transformer (stored in `dtype`) into `out`, the folder the
    registry's `toy` / `toy-f1` load. Returns `out`."""
    from framepack.weights import load_transformer, save_transformer

    family, out = Path(family), Path(out)
    if not read_manifest(family).get("vae", {}).get("trained"):
        raise ValueError(f"{family}: the VAE is not trained yet (run `framepack train vae --family {family}`)")
    model = load_transformer(transformer, dtype=torch.float32)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("encoders", "image"):
        shutil.copytree(family / sub, tmp / sub)
    save_transformer(model, tmp / "transformer", dtype=dtype)
    manifest = read_manifest(family)
    manifest["transformer"] = {"config": model.config.to_json_dict(), "dtype": str(dtype).removeprefix("torch."),
                               **(training or {})}  # fmt: skip
    write_manifest(tmp, manifest)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def folder_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def vae_tile_loss_check(vae, clip: np.ndarray) -> float:
    """Mean |decode(encode(clip)) - clip| in [0, 255] units through the engine's (tiled) decode."""
    from framepack import vae as engine_vae

    latents = engine_vae.encode_frames(vae, clip, torch.Generator().manual_seed(0))
    pixels = engine_vae.decode(vae, latents)  # (1, 3, T, H, W) in [-1, 1]
    ref = torch.from_numpy(clip).float().permute(3, 0, 1, 2)[None] / 127.5 - 1
    return float(F.l1_loss(pixels.clamp(-1, 1), ref) * 127.5)
