"""Rank processes for tests/test_parallel.py (importable by torch.multiprocessing's spawned children)."""

from __future__ import annotations

import dataclasses
import os
import traceback

import torch

from framepack.config import TINY

# The tiny config with 4 heads, so 2 and 4 ranks both divide them (the shipped tiny model has 2).
TINY4 = dataclasses.replace(TINY, num_attention_heads=4, attention_head_dim=16, num_layers=2, num_single_layers=2)


def model4():
    from framepack.models.transformer import FramePackTransformer

    torch.manual_seed(0)  # every rank builds the same weights
    return FramePackTransformer(TINY4).eval()


def inputs(case: str, gen: torch.Generator) -> dict:
    """Transformer kwargs of one case: the F1 and the original schedule's context layouts on an uneven
    token count (6 x 6 latents: 107 image tokens), padded text, batch 2 with two text lengths, a
    joint part that divides the degree (split between the ranks) and ones that do not (kept whole)."""
    c, h, w = TINY4.in_channels, 6, 6
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    batch = 2 if case in ("batch2", "text-split") else 1
    # The joint part is 11 SigLIP tokens + the longest text: 31 (f1), 44 (original), 18 (padded: split
    # on 2 ranks, whole on 4), 23 (batch2: whole), 32 (text-split: split on 2 and 4 ranks, padded too).
    text_len = {"f1": 20, "original": 33, "padded": 7, "batch2": 12, "text-split": 21}[case]
    mask = torch.arange(40)[None] < torch.tensor([text_len] + ([9 if case == "text-split" else 5] if batch == 2
                                                               else []))[:, None]  # fmt: skip
    if case == "original":  # the inverted schedule: [start, end-side 1x frame] around a later window
        clean_idx, lat_idx, idx2, idx4 = [0, 30], list(range(21, 30)), [31, 32], list(range(33, 49))
    else:  # F1: the start and the newest frame before the window
        clean_idx, lat_idx, idx2, idx4 = [0, 19], list(range(20, 29)), [17, 18], list(range(1, 17))
    return dict(
        hidden_states=r(batch, c, 9, h, w), timestep=torch.tensor([700.0] * batch),
        encoder_hidden_states=r(batch, 40, TINY4.text_embed_dim), encoder_attention_mask=mask,
        pooled_projections=r(batch, TINY4.pooled_projection_dim), guidance=torch.tensor([10000.0] * batch),
        latent_indices=torch.tensor([lat_idx]), clean_latents=r(1, c, 2, h, w),
        clean_latent_indices=torch.tensor([clean_idx]),
        clean_latents_2x=r(1, c, 2, h, w), clean_latent_2x_indices=torch.tensor([idx2]),
        clean_latents_4x=r(1, c, 16, h, w), clean_latent_4x_indices=torch.tensor([idx4]),
        image_embeddings=r(1, 11, TINY4.image_proj_dim),
    )  # fmt: skip


def equality_rank(rank: int, world: int, port: int, results) -> None:
    """Rank 0: each case's output on one process vs on `world` ranks (and CFG-split for batch 2);
    the others follow. Puts {case: max |difference|} (or the error) on `results`."""
    from framepack import parallel

    try:
        collective = parallel.init(rank, world, torch.device("cpu"), "127.0.0.1", port)
        model = model4()
        if rank != 0:
            parallel.follow(model, collective)
            return
        blocks = parallel.ParallelBlocks(collective)
        out = {}
        with torch.inference_mode():
            for case in ("f1", "original", "padded", "batch2", "text-split"):
                kw = inputs(case, torch.Generator().manual_seed(1))
                model.parallel = None
                alone = model(**kw).sample
                model.parallel = blocks
                out[case] = (alone - model(**kw).sample).abs().max().item()
                if case == "batch2" and blocks.can_split_cfg:
                    with blocks.cfg_split():
                        out["batch2-cfg"] = (alone - model(**kw).sample).abs().max().item()
                model.parallel = None
        out["calls"] = blocks.calls
        blocks.stop()
        results.put(out)
    except BaseException:
        results.put({"error": traceback.format_exc()})
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.pop("MASTER_PORT", None)
