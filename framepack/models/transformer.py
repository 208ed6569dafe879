"""The packed HunyuanVideo DiT of FramePack (official class `HunyuanVideoTransformer3DModelPacked`).

Contract: `FramePackTransformer(config)(**official_kwargs)` maps noisy latents, a timestep and the
conditions to a flow-matching velocity (B, C, T, H, W) in fp32. It knows nothing of schedules,
devices or files. Parameter names and shapes equal the official checkpoints', so a state dict loads
into it unchanged (see `framepack.weights`).

Token layout (one residual buffer per step):

    x = [ 4x ctx | 2x ctx | 1x ctx | noisy window | SigLIP tokens | text tokens ]
        '---------------- image stream (n_img) ---------------' '-- conditioning stream --'

Image-stream tokens carry 3-axis RoPE (frame index, row, column); conditioning tokens carry none.

Where this differs from a direct transcription, for speed at equal outputs:
  * Work constant within a section (patch-embedding the context latents, RoPE tables, the SigLIP
    projection, the LLaMA input projection and its pooled mean, key-padding masks) is computed once
    and reused while the caller passes the same tensors (`_SectionCache`), so the 25 steps of a
    section only embed the noisy window. The cache is keyed on tensor identity and version.
  * The residual stream is one buffer, updated in place in inference; the double blocks work on views
    of it, so nothing is concatenated or split per block.
  * Text padding is dropped before the refiner (valid rows never see padded keys), and batch 1 runs
    unmasked; batch > 1 uses a key-padding mask with every attention backend.
  * The last block computes only the rows that reach the output (the noisy window).
  * No host synchronisation per step; the few (text lengths, mask checks) happen once per section.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from framepack.config import TransformerConfig
from framepack.models.attention import AttentionBackend, KeyPadding
from framepack.models.caches import BlockStack

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sign-folded sin), each (B or 1, L, 1, head_dim), fp32


class TransformerOutput(NamedTuple):
    sample: torch.Tensor  # velocity (B, C, T, H, W), fp32


# ------------------------------------------------------------------------------------------ helpers
def _inference() -> bool:
    # In-place updates are only safe when autograd is not recording (training needs the originals).
    return not torch.is_grad_enabled()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: LayerNorm(x) (no affine, eps 1e-6) * (1 + scale) + shift; shift/scale (B, 1, D)."""
    n = F.layer_norm(x, x.shape[-1:], eps=1e-6)
    if _inference():
        return n.mul_(1 + scale).add_(shift)
    return torch.addcmul(shift, n, 1 + scale)


def _gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y, written into x in inference (x is often a view of the token buffer)."""
    if _inference():
        return x.addcmul_(y, gate)
    return torch.addcmul(x, y, gate)


def _linear_of_joined(linear: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """linear(cat([a, b], -1)). A plain Linear does it as two matmuls on column blocks of its weight (no
    concatenated copy); a replacement attached from outside (an fp8 Linear that runs its own matmul)
    gets the joined input, so its own kernel does all of it."""
    if type(linear) is not nn.Linear:
        return linear(torch.cat([a, b], -1))
    d, w = a.shape[-1], linear.weight
    out = F.linear(a, w[:, :d], linear.bias)
    return out.add_(F.linear(b, w[:, d:])) if _inference() else out + F.linear(b, w[:, d:])


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))  # (B, L, H*D) -> (B, L, H, D)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis; statistics in fp32 (or fp64), as the official.

    One reduction pass (no x^2 temporary) and, in inference, scaling in place: x is always a fresh
    projection output here. (F.rms_norm decomposes into four passes on CPU.)
    """
    ft = _precise(x.dtype)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=ft)  # (..., 1)
    if _inference():
        inv = norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    else:
        inv = torch.rsqrt(norm.square() / x.shape[-1] + eps)
    if x.dtype == ft:
        return x.mul_(inv).mul_(weight) if _inference() else x * inv * weight
    return (x.to(ft) * inv).to(x.dtype) * weight.to(x.dtype)


def _rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate interleaved channel pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); x (B, L, H, D)."""
    cos, sin_signed = rope  # sin_signed = (-sin, +sin) per pair, so rotation is one swap and one fma
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
    if x.dtype == cos.dtype and _inference():
        return x.mul_(cos).addcmul_(swapped, sin_signed)
    ct = cos.dtype  # fp32 for fp32 / half models (as the official), fp64 for fp64 models
    return (x.to(ct) * cos + swapped.to(ct) * sin_signed).to(x.dtype)


def _rope_prefix(x: torch.Tensor, rope: Rope, n: int) -> torch.Tensor:
    """RoPE on the first n tokens of x (the image stream), none on the rest."""
    if n == x.shape[1]:
        return _rope(x, rope)
    if _inference() and x.dtype == rope[0].dtype:
        _rope(x[:, :n], rope)
        return x
    return torch.cat([_rope(x[:, :n], rope), x[:, n:]], dim=1)


def _precise(dtype: torch.dtype) -> torch.dtype:
    """Dtype for positional/timestep tables: fp32 (as the official) unless the model runs in fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f_i), sin(t f_i)] with f_i = max_period^(-i / (dim/2)); (B,) -> (B, dim)."""
    half, ft = dim // 2, _precise(t.dtype)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=ft, device=t.device) / half)
    angles = t.to(ft)[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _patchify(proj: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """Conv3d with kernel == stride as one matmul, after replicate-padding to whole patches."""
    kt, kh, kw = proj.kernel_size
    _, _, t, h, w = x.shape
    pad = ((-w) % kw, (-h) % kh, (-t) % kt)
    if any(pad):
        x = F.pad(x, (0, pad[0], 0, pad[1], 0, pad[2]), mode="replicate")
    tokens = rearrange(x, "b c (t kt) (h kh) (w kw) -> b (t h w) (c kt kh kw)", kt=kt, kh=kh, kw=kw)
    return F.linear(tokens, proj.weight.flatten(1), proj.bias)  # (B, tokens, D)


# ------------------------------------------------------------------------------------------ modules
class _MLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (timestep, guidance and pooled-text embedders)."""

    def __init__(self, dim_in: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimeTextEmbed(nn.Module):
    def __init__(self, dim: int, pooled_dim: int, guidance: bool) -> None:
        super().__init__()
        self.timestep_embedder = _MLP(256, dim)
        self.text_embedder = _MLP(pooled_dim, dim)
        self.guidance_embedder = _MLP(256, dim) if guidance else None

    def time(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_sinusoid(t.to(_precise(dtype))).to(dtype))

    def guide(self, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.guidance_embedder(timestep_sinusoid(g.to(_precise(dtype))).to(dtype))


class _Modulation(nn.Module):
    """Linear(SiLU(temb)) split into `n` (B, 1, D) chunks."""

    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).unsqueeze(1).chunk(self.n, dim=-1)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.weight)


class _Proj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)


class _FeedForward(nn.Module):
    """net.0.proj -> activation -> net.2 (net.1 is the parameterless dropout slot of the checkpoints)."""

    def __init__(self, dim: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.net = nn.ModuleList([_Proj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net[0].proj(x)
        inplace = _inference()
        if self.activation == "silu":
            h = F.silu(h, inplace=inplace)
        else:
            h = torch.ops.aten.gelu_(h, approximate="tanh") if inplace else F.gelu(h, approximate="tanh")
        return self.net[2](h)


class _Attention(nn.Module):
    """Projections only; the attention itself is the backend function passed in."""

    def __init__(self, dim: int, heads: int, head_dim: int, kind: str) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        if kind in ("double", "single"):
            self.norm_q, self.norm_k = _RMSNorm(head_dim), _RMSNorm(head_dim)
        if kind == "double":
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
            self.norm_added_q, self.norm_added_k = _RMSNorm(head_dim), _RMSNorm(head_dim)
            self.to_add_out = nn.Linear(dim, dim)
        if kind in ("double", "refiner"):
            self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])


class _RefinerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads, head_dim, "refiner")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ff = _FeedForward(dim, mlp_dim, "silu")
        self.norm_out = _Modulation(dim, 2)  # (gate_msa, gate_mlp)

    def forward(self, x, temb, padding: KeyPadding | None, attend: AttentionBackend) -> torch.Tensor:
        gate_msa, gate_mlp = self.norm_out(temb)
        a, n = self.attn, self.norm1(x)
        o = attend(_heads(a.to_q(n), a.heads), _heads(a.to_k(n), a.heads), _heads(a.to_v(n), a.heads), padding)
        x = _gated_add(x, a.to_out[0](o.flatten(2)), gate_msa)
        return _gated_add(x, self.ff(self.norm2(x)), gate_mlp)


class _TextRefiner(nn.Module):
    """`context_embedder`: LLaMA states -> refined text tokens, conditioned on t and the pooled text."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.inner_dim
        self.time_text_embed = _TimeTextEmbed(d, cfg.text_embed_dim, guidance=False)
        self.proj_in = nn.Linear(cfg.text_embed_dim, d)
        blocks = [
            _RefinerBlock(d, cfg.num_attention_heads, cfg.attention_head_dim, cfg.mlp_dim)
            for _ in range(cfg.num_refiner_layers)
        ]
        self.token_refiner = nn.Module()
        self.token_refiner.refiner_blocks = nn.ModuleList(blocks)


class _DoubleBlock(nn.Module):
    """Separate weights for the image and conditioning streams, joint attention over both."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d, h, hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.norm1, self.norm1_context = _Modulation(d, 6), _Modulation(d, 6)
        self.attn = _Attention(d, h, hd, "double")
        self.ff = _FeedForward(d, cfg.mlp_dim, "gelu_tanh")
        self.ff_context = _FeedForward(d, cfg.mlp_dim, "gelu_tanh")

    def forward(self, xi, xt, temb, rope: Rope, padding, attend) -> tuple[torch.Tensor, torch.Tensor]:
        # xi (B, n_img, D) image stream, xt (B, n_cond, D) conditioning stream
        mi, mt = self.norm1(temb), self.norm1_context(temb)  # (shift, scale, gate) x (msa, mlp)
        ni, nt = modulate(xi, mi[0], mi[1]), modulate(xt, mt[0], mt[1])
        a, h = self.attn, self.attn.heads
        q = torch.cat([_rope(a.norm_q(_heads(a.to_q(ni), h)), rope), a.norm_added_q(_heads(a.add_q_proj(nt), h))], 1)
        k = torch.cat([_rope(a.norm_k(_heads(a.to_k(ni), h)), rope), a.norm_added_k(_heads(a.add_k_proj(nt), h))], 1)
        v = torch.cat([_heads(a.to_v(ni), h), _heads(a.add_v_proj(nt), h)], 1)
        o = attend(q, k, v, padding).flatten(2)  # (B, n_img + n_cond, D)
        n_img = xi.shape[1]
        xi = _gated_add(xi, a.to_out[0](o[:, :n_img]), mi[2])
        xt = _gated_add(xt, a.to_add_out(o[:, n_img:]), mt[2])
        xi = _gated_add(xi, self.ff(modulate(xi, mi[3], mi[4])), mi[5])
        xt = _gated_add(xt, self.ff_context(modulate(xt, mt[3], mt[4])), mt[5])
        return xi, xt


class _SingleBlock(nn.Module):
    """One weight set over the whole sequence; attention and MLP in parallel (pre-only attention)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.inner_dim
        self.attn = _Attention(d, cfg.num_attention_heads, cfg.attention_head_dim, "single")
        self.norm = _Modulation(d, 3)  # (shift, scale, gate)
        self.proj_mlp = nn.Linear(d, cfg.mlp_dim)
        self.proj_out = nn.Linear(d + cfg.mlp_dim, d)

    def forward(self, x, temb, rope: Rope, padding, attend, keep: slice | None = None) -> torch.Tensor:
        """x (B, N, D), image stream first. With `keep`, only those (image) rows are computed and returned."""
        shift, scale, gate = self.norm(temb)
        n = modulate(x, shift, scale)
        a, h, n_img = self.attn, self.attn.heads, rope[0].shape[1]
        k = _rope_prefix(a.norm_k(_heads(a.to_k(n), h)), rope, n_img)
        v = _heads(a.to_v(n), h)
        if keep is None:
            nq, q = n, _rope_prefix(a.norm_q(_heads(a.to_q(n), h)), rope, n_img)
        else:
            nq = n[:, keep]
            q = _rope(a.norm_q(_heads(a.to_q(nq), h)), (rope[0][:, keep], rope[1][:, keep]))
        mlp = self.proj_mlp(nq)
        mlp = torch.ops.aten.gelu_(mlp, approximate="tanh") if _inference() else F.gelu(mlp, approximate="tanh")
        o = attend(q, k, v, padding).flatten(2)  # (B, rows, D)
        return _gated_add(x if keep is None else x[:, keep], _linear_of_joined(self.proj_out, o, mlp), gate)


class _HistoryEmbed(nn.Module):
    """`clean_x_embedder`: the 1x / 2x / 4x context latents, each with its own patch kernel."""

    def __init__(self, c: int, d: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(c, d, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(c, d, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(c, d, kernel_size=(4, 8, 8), stride=(4, 8, 8))


class _ImageProjection(nn.Module):
    def __init__(self, dim_in: int, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim_in, 3 * d)
        self.down = nn.Linear(3 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


# ---------------------------------------------------------------------------- per-section cache
@dataclass
class _Section:
    """Everything a forward needs that does not change between the steps of a section."""

    ctx_tokens: torch.Tensor  # (B, n_ctx, D) embedded 4x | 2x | 1x context
    rope: Rope  # for the whole image stream (context + noisy)
    n_ctx: int
    n_img: int
    text: torch.Tensor  # (B, n_text, D) proj_in(LLaMA), padding dropped where possible
    text_pooled: torch.Tensor  # (B, D) refiner's embedding of the masked-mean LLaMA state
    image_tokens: torch.Tensor  # (B, n_siglip, D)
    text_padding: KeyPadding | None
    joint_padding: KeyPadding | None


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors keep no version counter
        return -1


class _SectionCache:
    """Recently prepared sections keyed on input identity + version (2 slots: cond and uncond passes)."""

    def __init__(self, slots: int = 2) -> None:
        self.slots = slots
        self.entries: list[tuple[tuple, list, _Section]] = []

    @staticmethod
    def _fingerprint(items: list) -> tuple:
        return tuple((id(t), _version(t), t.data_ptr()) if isinstance(t, torch.Tensor) else t for t in items)

    def get(self, tensors: list, build: Callable[[], _Section]) -> _Section:
        if torch.is_grad_enabled():  # training: never reuse anything across calls
            return build()
        fp = self._fingerprint(tensors)
        for i, (key, refs, section) in enumerate(self.entries):
            if key == fp and all(a is b for a, b in zip(refs, tensors) if isinstance(a, torch.Tensor)):
                self.entries.append(self.entries.pop(i))
                return section
        section = build()
        self.entries = [*self.entries[-(self.slots - 1) :], (fp, list(tensors), section)]
        return section

    def clear(self) -> None:
        self.entries.clear()


# --------------------------------------------------------------------------------------- the model
class FramePackTransformer(nn.Module):
    def __init__(self, config: TransformerConfig, attention: AttentionBackend | None = None) -> None:
        super().__init__()
        cfg = self.config = config
        d, c, p = cfg.inner_dim, cfg.in_channels, cfg.patch_size
        self.attention = attention or AttentionBackend()
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv3d(c, d, kernel_size=(cfg.patch_size_t, p, p), stride=(cfg.patch_size_t, p, p))
        self.clean_x_embedder = _HistoryEmbed(c, d)
        self.context_embedder = _TextRefiner(cfg)
        self.image_projection = _ImageProjection(cfg.image_proj_dim, d)
        self.time_text_embed = _TimeTextEmbed(d, cfg.pooled_projection_dim, cfg.guidance_embeds)
        self.transformer_blocks = nn.ModuleList(_DoubleBlock(cfg) for _ in range(cfg.num_layers))
        self.single_transformer_blocks = nn.ModuleList(_SingleBlock(cfg) for _ in range(cfg.num_single_layers))
        self.norm_out = _Modulation(d, 2)  # (scale, shift): this one order is reversed in the checkpoints
        self.proj_out = nn.Linear(d, cfg.patch_size_t * p * p * cfg.out_channels)
        self.gradient_checkpointing = False
        self.step_cache = None  # a models.caches.StepCache, attached from outside
        self.parallel = None  # a framepack.parallel.ParallelBlocks: the blocks run on several ranks
        self._sections = _SectionCache()

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    def clear_section_cache(self) -> None:
        self._sections.clear()

    # ----------------------------------------------------------------------------------- RoPE
    def _rope_table(self, indices: torch.Tensor, h: int, w: int, pool: int = 1) -> Rope:
        """cos / sin for frames `indices` (B, n) on an h x w token grid, avg-pooled by `pool` on all axes."""
        dev, ft = indices.device, _precise(self.dtype)
        b, n = indices.shape
        pos = [indices.to(ft)[:, :, None, None], torch.arange(h, device=dev, dtype=ft)[:, None],
               torch.arange(w, device=dev, dtype=ft)]  # fmt: skip
        freqs = [
            1.0 / self.config.rope_theta ** (torch.arange(0, a, 2, dtype=ft) / a) for a in self.config.rope_axes_dim
        ]
        angles = torch.cat(
            [(p[..., None] * f.to(dev)).expand(b, n, h, w, -1) for p, f in zip(pos, freqs)], dim=-1
        ).repeat_interleave(2, dim=-1)  # (B, n, h, w, head_dim): each frequency for both channels of a pair
        cos, sin = angles.cos(), angles.sin()
        if pool > 1:
            # The 2x/4x context tokens get the average of the cos/sin values they cover (replicate-padded).
            def down(t: torch.Tensor) -> torch.Tensor:
                t = rearrange(t, "b n h w d -> b d n h w")
                t = F.pad(t, (0, (-w) % pool, 0, (-h) % pool, 0, (-n) % pool), mode="replicate")
                return rearrange(F.avg_pool3d(t, pool), "b d n h w -> b n h w d")

            cos, sin = down(cos), down(sin)
        sign = torch.tensor([-1.0, 1.0], device=dev, dtype=ft).repeat(cos.shape[-1] // 2)
        flat = "b n h w d -> b (n h w) 1 d"
        return rearrange(cos, flat).contiguous(), rearrange(sin * sign, flat).contiguous()

    # --------------------------------------------------------------------------- preparation
    def _prepare(self, shape, latent_indices, contexts, text, mask, image_embeddings) -> _Section:
        b, _, _, h, w = shape
        hp, wp = h // self.config.patch_size, w // self.config.patch_size
        dtype, dev = self.dtype, self.device

        def batch(t: torch.Tensor, what: str) -> torch.Tensor:
            if t.shape[0] not in (1, b):
                raise ValueError(f"{what} has batch {t.shape[0]}, expected 1 or {b} (the batch of hidden_states)")
            return t.expand(b, *t.shape[1:])

        tokens, ropes = [], []
        for latents, indices, pool, proj, name in contexts:
            tokens.append(batch(_patchify(proj, latents.to(dev, dtype)), name))
            ropes.append(self._rope_table(indices.to(dev), hp, wp, pool))
        ropes.append(self._rope_table(latent_indices.to(dev), hp, wp))
        d = self.config.inner_dim
        ctx_tokens = torch.cat(tokens, 1) if tokens else torch.zeros(b, 0, d, dtype=dtype, device=dev)
        rb = max(r[0].shape[0] for r in ropes)  # tables stay batch 1 when every sample shares its indices
        rope = tuple(torch.cat([r[i].expand(rb, -1, -1, -1) for r in ropes], 1) for i in range(2))

        # Text: keep the valid prefix (right padding), once per section: the only host sync.
        text = batch(text, "encoder_hidden_states").to(dev, dtype)
        if mask is None:
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=dev)
        mask = batch(mask, "encoder_attention_mask").to(dev).bool()
        lengths = mask.sum(1)
        prefix = torch.arange(mask.shape[1], device=dev)[None] < lengths[:, None]
        if not torch.equal(prefix, mask):
            raise ValueError("encoder_attention_mask must be ones followed by zeros (right padding) in every row")
        lengths = lengths.tolist()
        if min(lengths) == 0:
            raise ValueError("encoder_attention_mask has a row with no valid text token")
        n_text = max(lengths)
        text, mask = text[:, :n_text], mask[:, :n_text]
        pooled = (text.to(_precise(dtype)) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        ce = self.context_embedder
        image_tokens = self.image_projection(batch(image_embeddings, "image_embeddings").to(dev, dtype))
        n_img = rope[0].shape[1]
        n_cond = image_tokens.shape[1] + n_text
        padded = any(n != n_text for n in lengths)
        return _Section(
            ctx_tokens=ctx_tokens,
            rope=rope,
            n_ctx=ctx_tokens.shape[1],
            n_img=n_img,
            text=ce.proj_in(text),
            text_pooled=ce.time_text_embed.text_embedder(pooled.to(dtype)),
            image_tokens=image_tokens,
            text_padding=KeyPadding(lengths, n_text) if padded else None,
            joint_padding=(
                KeyPadding([n_img + image_tokens.shape[1] + n for n in lengths], n_img + n_cond) if padded else None
            ),
        )

    # --------------------------------------------------------------------------------- forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor | None = None,
        latent_indices: torch.Tensor | None = None,
        clean_latents: torch.Tensor | None = None,
        clean_latent_indices: torch.Tensor | None = None,
        clean_latents_2x: torch.Tensor | None = None,
        clean_latent_2x_indices: torch.Tensor | None = None,
        clean_latents_4x: torch.Tensor | None = None,
        clean_latent_4x_indices: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,  # accepted for signature compatibility; unused
        return_dict: bool = True,
    ) -> TransformerOutput | tuple[torch.Tensor]:
        cfg = self.config
        b, c, t, h, w = hidden_states.shape
        if c != cfg.in_channels or h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(
                f"hidden_states {tuple(hidden_states.shape)}: expected {cfg.in_channels} channels and a latent "
                f"height/width divisible by the patch size {cfg.patch_size}"
            )
        if image_embeddings is None:
            raise ValueError("image_embeddings (SigLIP states) are required by FramePack checkpoints")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("guidance is required: this checkpoint embeds the distilled guidance scale")
        raw = [latent_indices, clean_latents, clean_latent_indices, clean_latents_2x, clean_latent_2x_indices,
               clean_latents_4x, clean_latent_4x_indices]  # fmt: skip
        e = self.clean_x_embedder
        key = [*raw, encoder_hidden_states, encoder_attention_mask, image_embeddings, e.proj.weight,
               e.proj_2x.weight, e.proj_4x.weight, self.image_projection.down.weight,
               self.context_embedder.proj_in.weight, tuple(hidden_states.shape), hidden_states.device]  # fmt: skip

        def prepare() -> _Section:
            indices = latent_indices if latent_indices is not None else torch.arange(t)
            contexts = []  # packed in this order: 4x, 2x, 1x
            for latents, idx, pool, proj, name in (
                (clean_latents_4x, clean_latent_4x_indices, 4, e.proj_4x, "clean_latents_4x"),
                (clean_latents_2x, clean_latent_2x_indices, 2, e.proj_2x, "clean_latents_2x"),
                (clean_latents, clean_latent_indices, 1, e.proj, "clean_latents"),
            ):
                if (latents is None) != (idx is None):
                    raise ValueError(f"{name} and its indices must be given together")
                if latents is not None:
                    idx = _as_batch_indices(idx, latents.shape[0], latents.shape[2], f"{name} indices")
                    contexts.append((latents, idx, pool, proj, name))
            return self._prepare(
                hidden_states.shape,
                _as_batch_indices(indices, b, t, "latent_indices"),
                contexts,
                encoder_hidden_states,
                encoder_attention_mask,
                image_embeddings,
            )

        sec = self._sections.get(key, prepare)

        dtype = self.dtype
        timestep = timestep.expand(b) if timestep.ndim == 0 else timestep
        temb = self.time_text_embed.time(timestep, dtype) + self.time_text_embed.text_embedder(
            pooled_projections.to(self.device, dtype)
        )
        if self.time_text_embed.guidance_embedder is not None:
            guidance = guidance.expand(b) if guidance.ndim == 0 else guidance
            temb = temb + self.time_text_embed.guide(guidance, dtype)
        noisy = _patchify(self.x_embedder.proj, hidden_states.to(self.device, dtype))  # (B, T*hp*wp, D)
        x_img = torch.cat([sec.ctx_tokens, noisy], 1)  # (B, n_img, D)

        def run_blocks() -> torch.Tensor:
            return self._blocks(x_img, self._refine_text(sec, timestep), temb, sec)

        if self.step_cache is not None and _inference():  # the one hook for step caches (models/caches.py)
            out = self.step_cache(BlockStack(self, x_img, temb, slice(sec.n_ctx, sec.n_img), run_blocks))
        else:
            out = run_blocks()
        scale, shift = self.norm_out(temb)
        head = _precise(dtype)  # the official runs proj_out in fp32: the velocity comes out fp32
        out = modulate(out, shift, scale).to(head)
        out = F.linear(out, self.proj_out.weight.to(head), self.proj_out.bias.to(head))
        p = cfg.patch_size
        out = rearrange(
            out, "b (t h w) (c ph pw) -> b c t (h ph) (w pw)", t=t, h=h // p, w=w // p, ph=p, pw=p
        )  # (B, C, T, H, W)
        return TransformerOutput(out) if return_dict else (out,)

    def _refine_text(self, sec: _Section, timestep: torch.Tensor) -> torch.Tensor:
        """Refined conditioning tokens [SigLIP | text] (B, n_cond, D) for this timestep."""
        ce = self.context_embedder
        temb_r = ce.time_text_embed.time(timestep, self.dtype) + sec.text_pooled
        x = sec.text.clone() if _inference() else sec.text  # the cached tensor must stay untouched
        for blk in ce.token_refiner.refiner_blocks:
            x = blk(x, temb_r, sec.text_padding, self.attention)
        return torch.cat([sec.image_tokens, x], 1)

    def _blocks(self, x_img, cond, temb, sec: _Section) -> torch.Tensor:
        """All transformer blocks; returns the final hidden states of the noisy rows only (B, n_noisy, D)."""
        if self.parallel is not None and _inference():  # sequence / CFG parallel over ranks (framepack.parallel)
            return self.parallel.run(self, x_img, cond, temb, sec)
        x = torch.cat([x_img, cond], 1)  # (B, n_img + n_cond, D): the one residual buffer
        xi, xt = x[:, : sec.n_img], x[:, sec.n_img :]
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for blk in self.transformer_blocks:
            args = (xi, xt, temb, sec.rope, sec.joint_padding, self.attention)
            xi, xt = checkpoint(blk, *args, use_reentrant=False) if ckpt else blk(*args)
        if not _inference():  # in inference xi and xt were updated in place inside x
            x = torch.cat([xi, xt], 1)
        last = len(self.single_transformer_blocks) - 1
        keep = slice(sec.n_ctx, sec.n_img)
        for i, blk in enumerate(self.single_transformer_blocks):
            args = (x, temb, sec.rope, sec.joint_padding, self.attention, keep if i == last else None)
            x = checkpoint(blk, *args, use_reentrant=False) if ckpt else blk(*args)
        return x if last >= 0 else x[:, keep]


def _as_batch_indices(indices: torch.Tensor, batch: int, frames: int, name: str) -> torch.Tensor:
    """Frame indices as (B or 1, frames); the official passes (1, n) or (B, n), diffusers passes (n,)."""
    indices = torch.as_tensor(indices)
    if indices.ndim == 1:
        indices = indices[None]
    if indices.ndim != 2 or indices.shape[1] != frames or indices.shape[0] not in (1, batch):
        raise ValueError(f"{name} has shape {tuple(indices.shape)}; expected ({batch} or 1, {frames}) frame indices")
    return indices
