"""Conditioning encoders: LLaMA + CLIP for the prompt, SigLIP for the image (spec §2).

Prompt: the prompt goes into diffusers' HunyuanVideo chat template (imported, not retyped: the crop
offset depends on the exact string), is tokenised to `crop + 256` tokens (padded, truncated), and
the LLaMA's `hidden_states[-3]` (layer 30 of 32, no final norm) is cut to [crop : valid tokens], so
at most 256 tokens remain. CLIP gets the raw prompt (77 tokens) and gives its pooled EOS state.
`pad_text` zero-pads the LLaMA states to 512 with a boolean mask, as the transformer expects.

Embeddings are cached by (encoder identity, prompt): in memory and on disk, so a re-run with the same
prompt never loads the 8B text encoder again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MAX_PROMPT_TOKENS = 256
TEXT_PAD_LENGTH = 512
CLIP_MAX_LENGTH = 77


def prompt_template() -> dict:
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return DEFAULT_PROMPT_TEMPLATE


@dataclass(frozen=True)
class PromptEmbedding:
    llama: torch.Tensor  # (1, L <= 256, D_text): valid tokens only
    clip_pooled: torch.Tensor  # (1, D_pooled)

    def blend(self, other: PromptEmbedding, weight: float = 0.5) -> PromptEmbedding:
        """(1 - weight) * self + weight * other; the shorter token sequence is zero-padded first."""
        n = max(self.llama.shape[1], other.llama.shape[1])

        def padded(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[1]))

        llama = (1 - weight) * padded(self.llama) + weight * padded(other.llama)
        return PromptEmbedding(llama, (1 - weight) * self.clip_pooled + weight * other.clip_pooled)

    def zeros_like(self) -> PromptEmbedding:
        """The official negative prompt when real CFG is off: zeros, never run through the model."""
        return PromptEmbedding(torch.zeros_like(self.llama), torch.zeros_like(self.clip_pooled))


def pad_text(llama: torch.Tensor, length: int = TEXT_PAD_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (1, L, D) to (1, length, D) and return it with the (1, length) bool mask of valid tokens."""
    n = llama.shape[1]
    if n > length:
        raise ValueError(f"prompt has {n} tokens; at most {length} fit")
    padded = torch.zeros(llama.shape[0], length, llama.shape[2], dtype=llama.dtype, device=llama.device)
    padded[:, :n] = llama
    mask = torch.zeros(llama.shape[0], length, dtype=torch.bool, device=llama.device)
    mask[:, :n] = True
    return padded, mask


class TextEncoder:
    """LLaMA + CLIP text encoders with their tokenizers; `encode(prompt)` -> PromptEmbedding."""

    def __init__(self, llama, llama_tokenizer, clip, clip_tokenizer, *, crop: int | None, identity: str) -> None:
        self.llama, self.llama_tokenizer = llama, llama_tokenizer
        self.clip, self.clip_tokenizer = clip, clip_tokenizer
        self.template = prompt_template()["template"]
        self.crop = crop if crop is not None else self._count_prefix_tokens()
        self.identity = identity

    def _count_prefix_tokens(self) -> int:
        """Template tokens before the prompt, for tokenizers other than the official one (95 there)."""
        prefix = self.template.split("{}")[0]
        return len(self.llama_tokenizer(prefix)["input_ids"])

    @torch.no_grad()
    def encode(self, prompt: str) -> PromptEmbedding:
        dev = self.llama.device
        tok = self.llama_tokenizer(
            self.template.format(prompt),
            padding="max_length",
            max_length=self.crop + MAX_PROMPT_TOKENS,
            truncation=True,
            return_tensors="pt",
            return_attention_mask=True,
        )
        ids, mask = tok["input_ids"].to(dev), tok["attention_mask"].to(dev)
        states = self.llama(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-3]
        valid = int(mask.sum())
        if not bool(mask[0, :valid].all()):
            raise RuntimeError("the LLaMA tokenizer must pad on the right")
        llama = states[:, self.crop : valid]
        tok2 = self.clip_tokenizer(
            prompt, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
        )
        pooled = self.clip(input_ids=tok2["input_ids"].to(self.clip.device)).pooler_output
        return PromptEmbedding(llama.float().cpu(), pooled.float().cpu())


class PromptCache:
    """Prompt -> PromptEmbedding, in memory and on disk (one small safetensors file per prompt)."""

    def __init__(self, directory: str | os.PathLike | None) -> None:
        self.dir = Path(directory) if directory else None
        self.memory: dict[str, PromptEmbedding] = {}

    @staticmethod
    def key(identity: str, prompt: str) -> str:
        return hashlib.sha256(json.dumps([identity, prompt]).encode()).hexdigest()[:32]

    def get(self, identity: str, prompt: str) -> PromptEmbedding | None:
        key = self.key(identity, prompt)
        if key in self.memory:
            return self.memory[key]
        if self.dir and (self.dir / f"{key}.safetensors").exists():
            try:
                t = load_file(self.dir / f"{key}.safetensors")
                emb = PromptEmbedding(t["llama"], t["clip_pooled"])
            except Exception:  # a damaged cache entry is only a cache miss
                return None
            self.memory[key] = emb
            return emb
        return None

    def put(self, identity: str, prompt: str, emb: PromptEmbedding) -> None:
        key = self.key(identity, prompt)
        self.memory[key] = emb
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f".{key}.partial"
            save_file({"llama": emb.llama.contiguous(), "clip_pooled": emb.clip_pooled.contiguous()}, str(tmp))
            os.replace(tmp, self.dir / f"{key}.safetensors")


class ImageEncoder:
    """SigLIP vision tower + its preprocessor: `encode(uint8 HWC image)` -> (1, tokens, D) last hidden state."""

    def __init__(self, model, processor) -> None:
        self.model, self.processor = model, processor

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> torch.Tensor:
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.model.device, self.model.dtype)
        return self.model(pixel_values=pixels).last_hidden_state.float().cpu()


def encoder_identity(paths: dict[str, Path], prompt_crop: int | None) -> str:
    """Names the conditioning encoders (every component but the transformer: their configs, tokenizers
    and processor settings), the prompt template and the crop. Cached prompt embeddings and training
    datasets record it, so neither is ever reused with other encoders."""
    h = hashlib.sha256()
    for name in sorted(n for n in paths if n != "transformer"):
        for f in sorted(Path(paths[name]).glob("*.json")):
            h.update(f"{name}/{f.name}".encode() + f.read_bytes())
    h.update(repr(prompt_template()).encode() + repr(prompt_crop).encode())
    return h.hexdigest()[:24]


def siglip_processor_class():
    """transformers' PIL-based SigLIP image processor class (no torchvision needed)."""
    try:
        from transformers import SiglipImageProcessorPil as Processor  # transformers >= 5
    except ImportError:
        from transformers import SiglipImageProcessor as Processor  # PIL-based before 5
    return Processor


def load_image_processor(path: str | os.PathLike):
    """SigLIP preprocessing (resize bicubic, rescale 1/255, normalise 0.5/0.5) without torchvision."""
    return siglip_processor_class().from_pretrained(path)
