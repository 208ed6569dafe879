"""The built-in tiny model family: every FramePack component at toy size, random but deterministic.

`ensure_tiny()` writes it once (about a second) into a local directory in the same on-disk formats
as the real repos, so it is loaded through exactly the code that loads the real weights:

    framepack-tiny/transformer/     config.json + safetensors shards + index      (like FramePackI2V_HY)
    framepack-tiny/encoders/        text_encoder (LLaMA), text_encoder_2 (CLIP), tokenizer, tokenizer_2,
                                    vae (AutoencoderKLHunyuanVideo)               (like HunyuanVideo)
    framepack-tiny/image/           feature_extractor (SigLIP processor), image_encoder (SigLIP)
                                                                                  (like flux_redux_bfl)

Tokenizers are word-level, built offline with the `tokenizers` library (`word_tokenizer`,
`write_prompt_tokenizers`: public, for other families built the same way over their own words). The
weights are random: the videos are noise, which is enough to exercise the whole pipeline on a CPU in
seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from framepack.config import TINY, framepack_home

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

VERSION = "tiny-v1"
SEED = 20250503
LLAMA_SPECIALS = ["<unk>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<pad>"]
CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
PUNCTUATION = list(".,:!?;'\"-0123456789")  # single characters with tokens of their own, after the words
# Words of the HunyuanVideo prompt template plus a small everyday vocabulary; others map to <unk>.
WORDS = """
system user describe the video by detailing following aspects main content and theme of color shape size
texture quantity text spatial relationships objects actions events behaviors temporal physical movement changes
background environment light style atmosphere camera angles movements transitions used in a an is are with
on at to from into over under near far left right up down forward backward slowly quickly man woman girl boy
person people child dog cat bird horse car train ball circle square triangle red green blue yellow white black
orange purple pink brown gray grey dances dance walks walk runs run jumps jump waves wave turns turn moves move
bounces bounce rotates rotate grows shrinks falls rises flies swims smiles looks sits stands holds opens closes
character doing some simple body gracefully clear full charm movements sky sea water tree forest city street
room house mountain river sun moon rain snow fire night day morning evening big small large tiny fast slow
his her their its it this that there here very beautiful happy sad wall floor ground around across through
""".split()


def tiny_root() -> Path:
    return framepack_home() / VERSION


def ensure_tiny(root: Path | None = None) -> Path:
    """Directory holding the tiny family, generated on first use (atomically: never half-written)."""
    root = Path(root) if root else tiny_root()
    if (root / "manifest.json").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        build_tiny(tmp)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first
            if not (root / "manifest.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def word_tokenizer(words: list[str], specials: list[str], bos: str, eos: str, pad: str,
                   *, close: bool) -> PreTrainedTokenizerFast:  # fmt: skip
    """A lower-casing word-level fast tokenizer: whitespace + punctuation split, unknown words -> <unk>.

    Ids follow the order of `specials`, then `words` (those not already specials), then the
    `PUNCTUATION` marks not already among the words. `close` appends `eos` after the text (CLIP's
    layout); LLaMA's template brings its own end tokens.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = specials + [w for w in words if w not in specials] + [p for p in PUNCTUATION if p not in words]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(specials)
    template = f"{bos} $A" + (f" {eos}" if close else "")
    marks = [(bos, vocab[bos])] + ([(eos, vocab[eos])] if close else [])
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=marks)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token="<unk>")


def save_tokenizer(tok: PreTrainedTokenizerFast, path: Path, max_length: int) -> None:
    tok.model_max_length = max_length
    tok.save_pretrained(path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # the generic class: readable by transformers 4.x and 5.x
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def write_prompt_tokenizers(words: list[str], llama_path: Path,
                            clip_path: Path) -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:  # fmt: skip
    """The LLaMA-style (`tokenizer`) and CLIP-style (`tokenizer_2`) word tokenizers over `words`,
    saved to the two folders; returns them (llama, clip)."""
    llama = word_tokenizer(words, LLAMA_SPECIALS, "<|begin_of_text|>", "<|eot_id|>", "<pad>", close=False)
    save_tokenizer(llama, llama_path, 2048)
    clip = word_tokenizer(words, CLIP_SPECIALS, "<|startoftext|>", "<|endoftext|>", "<|endoftext|>", close=True)
    save_tokenizer(clip, clip_path, 77)
    return llama, clip


def build_tiny(root: Path, seed: int = SEED) -> None:
    import transformers
    from diffusers import AutoencoderKLHunyuanVideo
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

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    from framepack.models.transformer import FramePackTransformer
    from framepack.weights import save_transformer

    enc, img = root / "framepack-tiny" / "encoders", root / "framepack-tiny" / "image"

    llama_tok, clip_tok = write_prompt_tokenizers(sorted(set(WORDS)), enc / "tokenizer", enc / "tokenizer_2")

    torch.manual_seed(seed)
    llama = LlamaModel(
        LlamaConfig(
            vocab_size=len(llama_tok), hidden_size=TINY.text_embed_dim, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
            bos_token_id=llama_tok.bos_token_id, eos_token_id=llama_tok.eos_token_id,
            pad_token_id=llama_tok.pad_token_id,
        )
    )  # fmt: skip
    llama.save_pretrained(enc / "text_encoder")
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=TINY.pooled_projection_dim, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
        )
    )  # fmt: skip
    clip.save_pretrained(enc / "text_encoder_2")
    torch.manual_seed(seed + 2)
    AutoencoderKLHunyuanVideo(
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=4
    ).save_pretrained(enc / "vae")

    torch.manual_seed(seed + 3)
    SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=TINY.image_proj_dim, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        )
    ).save_pretrained(img / "image_encoder")  # fmt: skip
    SiglipImageProcessor(
        size={"height": 32, "width": 32}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(img / "feature_extractor")

    torch.manual_seed(seed + 4)
    transformer = FramePackTransformer(TINY)
    total = sum(p.numel() * p.element_size() for p in transformer.parameters())
    save_transformer(transformer, root / "framepack-tiny" / "transformer", max_shard_bytes=total // 3 + 1)
    (root / "manifest.json").write_text(json.dumps({"version": VERSION, "seed": seed}, indent=2) + "\n")
