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
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from framepack.config import RuntimeOptions, framepack_home
from framepack.encoders import (
    ImageEncoder,
    PromptCache,
    PromptEmbedding,
    TextEncoder,
    encoder_identity,
    load_image_processor,
    pad_text,
)
from framepack.memory import (
    GiB,
    MemoryManager,
    NullMemory,
    auto_preserved_bytes,
    device_free_bytes,
    device_total_bytes,
    footprint,
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


def quiet_transformers() -> None:
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
    originals: object | None = None  # weights.CheckpointTensors: the transformer's weights as loaded
    _text: TextEncoder | None = field(default=None, repr=False)
    _libraries: dict = field(default_factory=dict, repr=False)
    _merger: object | None = field(default=None, repr=False)

    @property
    def managed(self) -> bool:
        return self.host != self.device or self.options.memory == "managed"

    @functools.cached_property
    def text_identity(self) -> str:
        """The encoders' identity (`encoders.encoder_identity`): the prompt cache's key."""
        return encoder_identity(self.paths, self.spec.prompt_crop)

    def text_encoder(self) -> TextEncoder:
        if self._text is None:
            self._text = load_text_encoder(self.paths, dtype=self.encoder_dtype, device=self.host,
                                           crop=self.spec.prompt_crop, identity=self.text_identity)  # fmt: skip
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

    def speed(self) -> dict:
        """How the transformer computes (for the sidecar): fp8 mode and kernels, regional compile."""
        from framepack.models.compile import is_compiled

        out: dict = {"fp8": self.options.fp8, "compile": is_compiled(self.transformer)}
        if self.options.fp8:
            from framepack.models.quant import fp8_report

            out["fp8_kernels"] = fp8_report(self.transformer)
        return out

    # ---------------------------------------------------------------------------- LoRAs
    @functools.cached_property
    def lora_targets(self):
        """The transformer's Linears and every LoRA spelling of them (`models.lora.TargetTable`)."""
        from framepack.models.lora import TargetTable

        return TargetTable.of(self.transformer)

    def lora_library(self):
        """The LoRA folder of the current options (`--lora-dir`, default <FRAMEPACK_HOME>/loras)."""
        from framepack.lora import LoraLibrary

        folder = self.options.lora_dir
        if folder not in self._libraries:
            self._libraries[folder] = LoraLibrary(folder)
        return self._libraries[folder]

    def prepare_loras(self, request) -> list:
        """The request's LoRAs found, read and checked against this transformer (LoraError otherwise)."""
        if not request.loras:
            return []
        return self.lora_library().load(tuple(request.loras), self.lora_targets, request.lora_include,
                                        request.lora_exclude)  # fmt: skip

    def apply_loras(self, loaded: list) -> dict | None:
        """Merge `loaded` into the transformer in place of what the previous job merged (None: nothing to do)."""
        from framepack.lora import KeptWeights, LoraMerger

        if self._merger is None:
            if not loaded:
                return None
            self._merger = LoraMerger(self.transformer, self.originals or KeptWeights(self.transformer))
        if not loaded and not self._merger.active:
            return None
        report = self._merger.apply(loaded)
        if self.transformer.parallel is not None:  # the other ranks' transformers merge the same set
            self.transformer.parallel.send_loras(loaded)
        return report

    # ---------------------------------------------------------------------------- memory
    def plan_job(self, *, height: int, width: int, window: int, with_text: bool,
                 preserved_memory_gb: float | None = None) -> MemoryManager | NullMemory:  # fmt: skip
        """The memory manager of one job of latent size height x width (`NullMemory` when unmanaged);
        `preserved_memory_gb`: this job's, instead of the options' (a queued job's own setting)."""
        if not self.managed:
            return NullMemory()
        modules = {"transformer": self.transformer, "vae": self.vae, "image_encoder": self.image_encoder.model}
        blocks = {"transformer": [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]}
        if with_text:  # one phase: LLaMA (its layers streamable) and CLIP run back to back
            text = self.text_encoder()
            modules["text_encoder"] = torch.nn.ModuleDict({"llama": text.llama, "clip": text.clip})
            blocks["text_encoder"] = list(text.llama.layers)
        footprints = [footprint(n, m, blocks.get(n, []), height=height, width=width, window=window)
                      for n, m in modules.items()]  # fmt: skip
        gb = self.options.preserved_memory_gb if preserved_memory_gb is None else preserved_memory_gb
        if self.options.device_free_bytes is not None:  # a simulated device: exactly what the caller states
            free, preserved = self.options.device_free_bytes, int((gb or 0) * GiB)
        else:
            free = device_free_bytes(self.device)
            preserved = int(gb * GiB) if gb is not None else auto_preserved_bytes(device_total_bytes(self.device))
        plan = plan_memory(footprints, free_bytes=free, preserved_bytes=preserved)
        return MemoryManager(self.device, plan, modules, blocks)


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


def _frozen(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return model.to(device).eval().requires_grad_(False)


def load_text_encoder(paths: dict[str, Path], *, dtype: torch.dtype, device: torch.device, crop: int | None,
                      identity: str) -> TextEncoder:  # fmt: skip
    """LLaMA (memory-mapped where its stored dtype is `dtype`) + CLIP and their tokenizers, frozen."""
    from transformers import AutoTokenizer, CLIPTextModel

    quiet_transformers()
    llama = _load_llama(paths["text_encoder"], dtype, device)
    clip = _frozen(CLIPTextModel.from_pretrained(paths["text_encoder_2"], torch_dtype=dtype), device)
    return TextEncoder(llama, AutoTokenizer.from_pretrained(paths["tokenizer"]), clip,
                       AutoTokenizer.from_pretrained(paths["tokenizer_2"]), crop=crop, identity=identity)  # fmt: skip


def load_image_encoder(paths: dict[str, Path], *, dtype: torch.dtype, device: torch.device) -> ImageEncoder:
    """SigLIP and its preprocessing, frozen."""
    from transformers import SiglipVisionModel

    quiet_transformers()
    siglip = SiglipVisionModel.from_pretrained(paths["image_encoder"], torch_dtype=dtype)
    return ImageEncoder(_frozen(siglip, device), load_image_processor(paths["feature_extractor"]))


def load_vae(paths: dict[str, Path], *, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The HunyuanVideo VAE, frozen."""
    from diffusers import AutoencoderKLHunyuanVideo

    return _frozen(AutoencoderKLHunyuanVideo.from_pretrained(paths["vae"], torch_dtype=dtype), device)


def default_cache_dir() -> Path:
    return framepack_home() / "prompt-cache"


def load_transformer_for(model: str, device: torch.device, *, models_dir: str | os.PathLike | None = None,
                         download: bool = True, options: RuntimeOptions | None = None,
                         attention: str = "auto") -> torch.nn.Module:  # fmt: skip
    """Only the transformer of `model`, on `device`, in the dtype and form `load_components` gives it
    (fp8, compile): what a follower rank of a multi-GPU run holds (framepack.parallel)."""
    options = options or RuntimeOptions()
    spec = get_spec(model)
    paths = resolve_spec(spec, models_root=models_dir, download=download)
    t_dtype, _ = default_dtypes(spec, device)
    return _transformer(paths, t_dtype, device, device, attention, options).eval().requires_grad_(False)


def _transformer(paths: dict, dtype: torch.dtype, host: torch.device, device: torch.device, attention: str,
                 options: RuntimeOptions) -> torch.nn.Module:  # fmt: skip
    """The transformer loaded onto `host`, its blocks stored in fp8 and / or compiled as `options` say."""
    from framepack.models.quant import quantize_fp8_

    quiet_transformers()
    transformer = load_transformer(paths["transformer"], dtype=dtype, device=host, attention=attention)
    if options.fp8:
        quantize_fp8_(transformer, compute_dtype=dtype, mode=options.fp8, device=device)
    if options.compile:
        from framepack.models.compile import compile_blocks

        compile_blocks(transformer)
    return transformer


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
    from framepack.weights import CheckpointTensors

    options = options or RuntimeOptions()
    spec = get_spec(model)
    paths = resolve_spec(spec, models_root=models_dir, download=download)
    t_dtype, e_dtype = default_dtypes(spec, device)
    t_dtype = dtype or t_dtype
    managed = options.memory == "managed" or (options.memory == "auto" and device.type in ("cuda", "mps"))
    host = torch.device("cpu") if managed else device
    if options.fp8 and device.type == "mps":
        raise ValueError("fp8 weights are not supported on MPS; run without --fp8")
    transformer = _transformer(paths, t_dtype, host, device, attention, options)
    return Components(
        spec=spec,
        paths=paths,
        device=device,
        host=host,
        encoder_dtype=e_dtype,
        transformer=transformer,
        vae=load_vae(paths, dtype=e_dtype, device=host),
        image_encoder=load_image_encoder(paths, dtype=e_dtype, device=host),
        prompt_cache=PromptCache(prompt_cache_dir if prompt_cache_dir is not None else default_cache_dir()),
        options=options,
        originals=CheckpointTensors(paths["transformer"], t_dtype),  # LoRA switching restores from here
    )
