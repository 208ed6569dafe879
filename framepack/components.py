"""Loading the five models of a FramePack model spec and holding them for the pipeline.

Dtypes follow the device: CUDA runs the transformer in bf16 and the encoders/VAE in fp16 (as the
official); the CPU uses bf16 (fp16 matmuls are ~1000x slower on CPUs); the tiny family runs in fp32.
The text encoders are loaded lazily, only when a prompt is not in the prompt cache, and freed after
encoding unless asked to stay.

With managed memory (the default on accelerators) every model is loaded to host memory and
`plan_job` decides per job, from the models' sizes, the job's working sets and the free device
memory, what is resident, swapped or streamed (framepack.memory).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from framepack.config import RuntimeOptions
from framepack.encoders import ImageEncoder, PromptCache, PromptEmbedding, TextEncoder, load_image_processor, pad_text
from framepack.memory import (
    Footprint,
    GiB,
    MemoryManager,
    auto_preserved_bytes,
    device_free_bytes,
    device_total_bytes,
    module_bytes,
    plan_memory,
    release_host_memory,
)
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
    device: torch.device  # where models compute
    host: torch.device  # where their weights live between phases (the device itself when unmanaged)
    encoder_dtype: torch.dtype
    transformer: torch.nn.Module
    vae: torch.nn.Module
    image_encoder: ImageEncoder
    prompt_cache: PromptCache
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    _text: TextEncoder | None = field(default=None, repr=False)

    @property
    def managed(self) -> bool:
        return self.host != self.device or self.options.memory == "managed"

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
            from transformers import AutoTokenizer, CLIPTextModel

            _quiet_transformers()
            p, dt, dev = self.paths, self.encoder_dtype, self.host
            self._text = TextEncoder(
                _load_llama(p["text_encoder"], dt, dev),
                AutoTokenizer.from_pretrained(p["tokenizer"]),
                CLIPTextModel.from_pretrained(p["text_encoder_2"], torch_dtype=dt).to(dev).eval().requires_grad_(False),
                AutoTokenizer.from_pretrained(p["tokenizer_2"]),
                crop=self.spec.prompt_crop,
                identity=self.text_identity,
            )
        return self._text

    def free_text_encoders(self) -> None:
        """Drop LLaMA + CLIP (16 GB for the real model): prompts are cached, they are rarely needed again."""
        if self._text is not None and not self.options.keep_text_encoders:
            self._text = None
            gc.collect()
            release_host_memory()

    def cached_prompt(self, prompt: str) -> PromptEmbedding | None:
        return self.prompt_cache.get(self.text_identity, prompt)

    def encode_prompt(self, prompt: str) -> PromptEmbedding:
        cached = self.cached_prompt(prompt)
        if cached is not None:
            return cached
        emb = self.text_encoder().encode(prompt)
        self.prompt_cache.put(self.text_identity, prompt, emb)
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

    # ---------------------------------------------------------------------------- memory
    def plan_job(self, *, height: int, width: int, window: int, with_text: bool) -> MemoryManager | None:
        """A MemoryManager for one job of latent size height x width (None when memory is not managed)."""
        if not self.managed:
            return None
        modules = {"transformer": self.transformer, "vae": self.vae, "image_encoder": self.image_encoder.model}
        blocks = {"transformer": [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]}
        if with_text:  # one phase: LLaMA (its layers streamable) and CLIP run back to back
            text = self.text_encoder()
            modules["text_encoder"] = torch.nn.ModuleDict({"llama": text.llama, "clip": text.clip})
            blocks["text_encoder"] = list(text.llama.layers)
        footprints = [self._footprint(n, m, blocks.get(n, []), height, width, window) for n, m in modules.items()]
        gb = self.options.preserved_memory_gb
        if self.options.device_free_bytes is not None:  # a simulated device: exactly what the caller states
            free, preserved = self.options.device_free_bytes, int((gb or 0) * GiB)
        else:
            free = device_free_bytes(self.device)
            preserved = int(gb * GiB) if gb is not None else auto_preserved_bytes(device_total_bytes(self.device))
        plan = plan_memory(footprints, free_bytes=free, preserved_bytes=preserved)
        return MemoryManager(self.device, plan, modules, blocks)

    def _footprint(self, name, module, blocks, h, w, window) -> Footprint:
        """Weights, streamable blocks and a working-set estimate (activations while the model runs)."""
        weights = module_bytes(module)
        block_bytes = tuple(module_bytes(b) for b in blocks)
        if name == "transformer":  # the residual stream, q/k/v, attention out, MLP hidden: (8 D + 2 mlp) a token
            cfg, act = self.transformer.config, self.transformer.dtype.itemsize
            frame = (h // 2) * (w // 2)
            tokens = (window + 2) * frame + frame // 4 * 2 // 2 + frame // 16 * 4 // 4 + 729 + 256
            working = int(1.25 * tokens * (8 * cfg.inner_dim + 2 * cfg.mlp_dim) * act)
        elif name == "vae":  # decoding 2 windows: a few full-resolution activations, tiled beyond 3 GiB
            frames, channels = 4 * (2 * window + 1) - 3, max(self.vae.config.block_out_channels)
            working = min(4 * frames * 64 * h * w * channels * self.encoder_dtype.itemsize, 3 * GiB)
        elif name == "text_encoder":  # LLaMA keeps every layer's hidden states of (crop + 256) tokens
            c = module["llama"].config
            tokens = 512
            working = tokens * (c.hidden_size * (c.num_hidden_layers + 1) + 2 * c.intermediate_size) * 4
        else:  # SigLIP over its patch tokens
            c = module.config
            tokens = (c.image_size // c.patch_size) ** 2 + 1
            working = tokens * (6 * c.hidden_size + 2 * c.intermediate_size) * 4 + tokens**2 * c.num_attention_heads * 4
        return Footprint(name, weights, int(working), block_bytes)


def _load_llama(path: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """LLaMA whose weights are zero-copy views of its memory-mapped safetensors when they are stored in
    `dtype` (the official fp16 on CUDA): no host copy of the 8B model exists, pages come and go with
    use. Otherwise (a dtype conversion is needed) a normal load."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaModel

    from framepack.weights import map_tensors

    tensors = map_tensors(path)
    if {t.dtype for t in tensors.values()} == {dtype}:
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (RoPE) real
            model = LlamaModel(LlamaConfig.from_pretrained(path))
        try:
            model.load_state_dict(tensors, strict=True, assign=True)
            return model.to(device).eval().requires_grad_(False)
        except RuntimeError:  # another key layout: fall back to the library's loader
            pass
    tensors.clear()
    return LlamaModel.from_pretrained(path, torch_dtype=dtype).to(device).eval().requires_grad_(False)


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
    options: RuntimeOptions | None = None,
) -> Components:
    from diffusers import AutoencoderKLHunyuanVideo
    from transformers import SiglipVisionModel

    from framepack.models.quant import quantize_fp8_

    options = options or RuntimeOptions()
    spec = get_spec(model)
    paths = resolve_spec(spec, models_root=models_dir, download=download)
    t_dtype, e_dtype = default_dtypes(spec, device)
    t_dtype = dtype or t_dtype
    managed = options.memory == "managed" or (options.memory == "auto" and device.type in ("cuda", "mps"))
    host = torch.device("cpu") if managed else device
    if options.fp8 and device.type == "mps":
        raise ValueError("fp8 weights are not supported on MPS; run without --fp8")
    _quiet_transformers()
    transformer = load_transformer(paths["transformer"], dtype=t_dtype, device=host, attention=attention)
    if options.fp8:
        quantize_fp8_(transformer, compute_dtype=t_dtype)
    vae_model = AutoencoderKLHunyuanVideo.from_pretrained(paths["vae"], torch_dtype=e_dtype).to(host).eval()
    siglip = SiglipVisionModel.from_pretrained(paths["image_encoder"], torch_dtype=e_dtype).to(host).eval()
    for m in (vae_model, siglip):
        m.requires_grad_(False)
    return Components(
        spec=spec,
        paths=paths,
        device=device,
        host=host,
        encoder_dtype=e_dtype,
        transformer=transformer,
        vae=vae_model,
        image_encoder=ImageEncoder(siglip, load_image_processor(paths["feature_extractor"])),
        prompt_cache=PromptCache(prompt_cache_dir if prompt_cache_dir is not None else default_cache_dir()),
        options=options,
    )
