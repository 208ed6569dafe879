"""`framepack` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time


def _selftest(args: argparse.Namespace) -> int:
    """Build the tiny transformer, save it as a sharded checkpoint, load it back and run one section step."""
    import torch

    from framepack import load_transformer, save_transformer
    from framepack.config import TINY
    from framepack.models.transformer import FramePackTransformer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = save_transformer(FramePackTransformer(TINY), f"{tmp}/tiny", max_shard_bytes=200_000)
        model = load_transformer(path, dtype=torch.float32)
        c, h, w = TINY.in_channels, 16, 16
        kw = dict(
            hidden_states=torch.randn(1, c, 9, h, w),
            timestep=torch.tensor([1000.0]),
            encoder_hidden_states=torch.randn(1, 512, TINY.text_embed_dim),
            encoder_attention_mask=torch.arange(512)[None] < 20,
            pooled_projections=torch.randn(1, TINY.pooled_projection_dim),
            guidance=torch.tensor([10000.0]),
            latent_indices=torch.arange(1, 10)[None],
            clean_latents=torch.randn(1, c, 2, h, w),
            clean_latent_indices=torch.tensor([[0, 10]]),
            clean_latents_2x=torch.randn(1, c, 2, h, w),
            clean_latent_2x_indices=torch.tensor([[11, 12]]),
            clean_latents_4x=torch.randn(1, c, 16, h, w),
            clean_latent_4x_indices=torch.arange(13, 29)[None],
            image_embeddings=torch.randn(1, 729, TINY.image_proj_dim),
        )
        with torch.no_grad():
            out = model(**kw).sample
        shards = len(list(path.glob("*.safetensors")))
    ok = out.shape == kw["hidden_states"].shape and bool(torch.isfinite(out).all())
    print(
        f"tiny FramePack transformer: saved in {shards} shards, loaded, one packed-context step "
        f"{tuple(out.shape)} {out.dtype} in {time.perf_counter() - t0:.2f} s: {'OK' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="framepack", description="FramePack video generation")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("selftest", help="check the install on the built-in tiny model (offline, seconds)")
    p.set_defaults(func=_selftest)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
