"""Loading the five models of a FramePack model spec and holding them for the pipeline.

Dtypes follow the device: CUDA runs the transformer in bf16 and the encoders/VAE in fp16 (as the
official); the CPU uses bf16 (fp16 matmuls are ~1000x slower on CPUs); the tiny family runs in fp32.
The text encoders are loaded lazily, only when a prompt is not in the prompt cache.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from framepack.encoders import ImageEncoder, PromptCache, PromptEmbedding, TextEncoder, load_image_processor, pad_text
from framepack.registry import ModelSpec, get_spec, resolve_spec
from framepack.weights import load_transformer


def default_dtypes(spec: ModelSpec, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(transformer dtype, encoders/VAE dtype)."""
    if spec.builtin:
        return torch.float32, torch.float32
    if device.type == "cuda":
        return torch.bfloat16, torch.float16
    return torch.bfloat16, torch.bfloat16


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # per-tensor "Loading weights" bars of tiny files
    logging.getLogger("transformers").setLevel(logging.ERROR)


@dataclass
class Components:
    spec: ModelSpec
    paths: dict[str, Path]
    device: torch.device
    encoder_dtype: torch.dtype
    transformer: torch.nn.Module
    vae: torch.nn.Module
    image_encoder: ImageEncoder
    prompt_cache: PromptCache
    vae_tiling: bool = False
    _text: TextEncoder | None = field(default=None, repr=False)

    @functools.cached_property
    def text_identity(self) -> str:
        """Names the text encoders and template, so cached embeddings are never reused across models."""
        h = hashlib.sha256()
        for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            for f in sorted(self.paths[name].glob("*.json")):
                h.update(f.name.encode() + f.read_bytes())
        from framepack.encoders import prompt_template

        h.update(repr(prompt_template()).encode() + repr(self.spec.prompt_crop).encode())
        return h.hexdigest()[:24]

    def text_encoder(self) -> TextEncoder:
        if self._text is None:
            from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

            _quiet_transformers()
            p, dt, dev = self.paths, self.encoder_dtype, self.device
            self._text = TextEncoder(
                LlamaModel.from_pretrained(p["text_encoder"], torch_dtype=dt).to(dev).eval(),
                AutoTokenizer.from_pretrained(p["tokenizer"]),
                CLIPTextModel.from_pretrained(p["text_encoder_2"], torch_dtype=dt).to(dev).eval(),
                AutoTokenizer.from_pretrained(p["tokenizer_2"]),
                crop=self.spec.prompt_crop,
                identity=self.text_identity,
            )
        return self._text

    def encode_prompt(self, prompt: str) -> PromptEmbedding:
        identity = self.text_identity
        cached = self.prompt_cache.get(identity, prompt)
        if cached is not None:
            return cached
        emb = self.text_encoder().encode(prompt)
        self.prompt_cache.put(identity, prompt, emb)
        return emb

    def transformer_inputs(self, prompt: PromptEmbedding, siglip: torch.Tensor, guidance: float) -> dict:
        """Keyword arguments of the transformer that stay fixed for the whole job."""
        dt, dev = self.transformer.dtype, self.device
        text, mask = pad_text(prompt.llama)
        return {
            "encoder_hidden_states": text.to(dev, dt),
            "encoder_attention_mask": mask.to(dev),
            "pooled_projections": prompt.clip_pooled.to(dev, dt),
            "image_embeddings": siglip.to(dev, dt),
            "guidance": torch.tensor([guidance * 1000.0], device=dev, dtype=dt),  # bf16: 10000 -> 9984
        }


def default_cache_dir() -> Path:
    base = os.environ.get("FRAMEPACK_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "framepack")
    return Path(base) / "prompt-cache"


def load_components(
    model: str,
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    attention: str = "auto",
    models_dir: str | os.PathLike | None = None,
    download: bool = True,
    prompt_cache_dir: str | os.PathLike | None = None,
) -> Components:
    from diffusers import AutoencoderKLHunyuanVideo
    from transformers import SiglipVisionModel

    spec = get_spec(model)
    paths = resolve_spec(spec, models_root=models_dir, download=download)
    t_dtype, e_dtype = default_dtypes(spec, device)
    t_dtype = dtype or t_dtype
    _quiet_transformers()
    transformer = load_transformer(paths["transformer"], dtype=t_dtype, device=device, attention=attention)
    vae_model = AutoencoderKLHunyuanVideo.from_pretrained(paths["vae"], torch_dtype=e_dtype).to(device).eval()
    siglip = SiglipVisionModel.from_pretrained(paths["image_encoder"], torch_dtype=e_dtype).to(device).eval()
    for m in (vae_model, siglip):
        m.requires_grad_(False)
    return Components(
        spec=spec,
        paths=paths,
        device=device,
        encoder_dtype=e_dtype,
        transformer=transformer,
        vae=vae_model,
        image_encoder=ImageEncoder(siglip, load_image_processor(paths["feature_extractor"])),
        prompt_cache=PromptCache(prompt_cache_dir if prompt_cache_dir is not None else default_cache_dir()),
        vae_tiling=device.type == "cuda" and not spec.builtin,
    )
