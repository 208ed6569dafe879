"""A deliberately plain float64 re-statement of the FramePack transformer, written from the spec
(../shared/spec/framepack-reference.md §1.2, §2, §4), used as the yardstick for our fast model.

Independent formulation on purpose: it processes one sample at a time with its text cut to the
valid tokens (the official varlen semantics), patchifies with conv3d, applies RoPE on even/odd
channel slices, and runs explicit softmax attention. It shares no code with framepack.models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _sinusoid(t: float) -> torch.Tensor:
    i = torch.arange(128, dtype=torch.float64)
    f = torch.exp(-math.log(10000.0) * i / 128)
    return torch.cat([torch.cos(t * f), torch.sin(t * f)])


class _W:
    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.sd = {k: v.double() for k, v in sd.items()}

    def __getitem__(self, k: str) -> torch.Tensor:
        return self.sd[k]

    def lin(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x @ self.sd[name + ".weight"].T + self.sd[name + ".bias"]

    def mlp(self, name: str, x: torch.Tensor, act=F.silu) -> torch.Tensor:
        return self.lin(name + ".linear_2", act(self.lin(name + ".linear_1", x)))


def _ln(x, w=None, b=None):
    return F.layer_norm(x, x.shape[-1:], w, b, eps=1e-6)


def _rms(x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w


def _attn(q, k, v, heads):  # (L, D) each, plain multi-head softmax attention
    D = q.shape[1]
    d = D // heads
    q, k, v = (t.reshape(-1, heads, d).transpose(0, 1) for t in (q, k, v))
    s = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
    return (s @ v).transpose(0, 1).reshape(-1, D)


def _pair_angles(cfg, frames: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(n, h, w, head_dim/2) rotation angle of each channel pair."""
    parts = []
    for axis, dim in enumerate(cfg.rope_axes_dim):
        freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        pos = [
            frames.double()[:, None, None],
            torch.arange(h).double()[None, :, None],
            torch.arange(w).double()[None, None, :],
        ][axis]
        parts.append((pos[..., None] * freq).expand(len(frames), h, w, -1))
    return torch.cat(parts, -1)


def _rope_cs(cfg, frames, h, w, pool):
    """cos, sin per token and channel pair; for 2x/4x context averaged over the pooled cells."""
    a = _pair_angles(cfg, frames, h, w)
    c, s = torch.cos(a), torch.sin(a)
    if pool > 1:

        def down(t):
            t = t.permute(3, 0, 1, 2)[None]  # (1, P, n, h, w)
            n = t.shape[2]
            t = F.pad(t, (0, (-w) % pool, 0, (-h) % pool, 0, (-n) % pool), mode="replicate")
            return F.avg_pool3d(t, pool)[0].permute(1, 2, 3, 0)

        c, s = down(c), down(s)
    return c.reshape(-1, c.shape[-1]), s.reshape(-1, s.shape[-1])


def _rotate(x, cs, heads):  # x (L, D) -> rotated per head on interleaved pairs
    c, s = cs
    L, D = x.shape
    x = x.reshape(L, heads, -1)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * c[:, None] - x1 * s[:, None]
    out[..., 1::2] = x1 * c[:, None] + x0 * s[:, None]
    return out.reshape(L, D)


def _qk(W, p, name, norm, t, heads):
    """Projection, then RMSNorm per head."""
    y = W.lin(p + "attn." + name, t).reshape(t.shape[0], heads, -1)
    return _rms(y, W[p + "attn." + norm + ".weight"]).reshape(t.shape[0], -1)


def _ff(W, pre, t):
    return W.lin(pre + ".net.2", F.gelu(W.lin(pre + ".net.0.proj", t), approximate="tanh"))


def reference_forward(sd, cfg, **kw) -> torch.Tensor:
    W = _W(sd)
    hs = kw["hidden_states"].double()
    outs = [_one(W, cfg, kw, b, hs[b]) for b in range(hs.shape[0])]
    return torch.stack(outs)


def _one(W, cfg, kw, b, x):
    heads = cfg.num_attention_heads
    C, T, H, Wd = x.shape
    hp, wp = H // 2, Wd // 2

    def idx(name, n):
        t = kw.get(name)
        t = torch.arange(n) if t is None else torch.as_tensor(t)
        return t[min(b, t.shape[0] - 1)] if t.ndim == 2 else t

    t_val = float(kw["timestep"][b])
    temb = W.mlp("time_text_embed.timestep_embedder", _sinusoid(t_val))
    temb = temb + W.mlp("time_text_embed.guidance_embedder", _sinusoid(float(kw["guidance"][b])))
    temb = temb + W.mlp("time_text_embed.text_embedder", kw["pooled_projections"][b].double())

    # --- conditioning stream: refined text (valid tokens only) after projected SigLIP tokens
    mask = kw["encoder_attention_mask"][b].bool()
    llama = kw["encoder_hidden_states"][b].double()[: int(mask.sum())]
    tr = W.mlp("context_embedder.time_text_embed.timestep_embedder", _sinusoid(t_val))
    tr = tr + W.mlp("context_embedder.time_text_embed.text_embedder", llama.mean(0))
    txt = W.lin("context_embedder.proj_in", llama)
    for i in range(cfg.num_refiner_layers):
        p = f"context_embedder.token_refiner.refiner_blocks.{i}."
        g_msa, g_mlp = W.lin(p + "norm_out.linear", F.silu(tr)).chunk(2)
        n = _ln(txt, W[p + "norm1.weight"], W[p + "norm1.bias"])
        a = _attn(W.lin(p + "attn.to_q", n), W.lin(p + "attn.to_k", n), W.lin(p + "attn.to_v", n), heads)
        txt = txt + g_msa * W.lin(p + "attn.to_out.0", a)
        n = _ln(txt, W[p + "norm2.weight"], W[p + "norm2.bias"])
        txt = txt + g_mlp * W.lin(p + "ff.net.2", F.silu(W.lin(p + "ff.net.0.proj", n)))
    siglip = kw["image_embeddings"][min(b, kw["image_embeddings"].shape[0] - 1)].double()
    img = W.lin("image_projection.down", F.silu(W.lin("image_projection.up", siglip)))
    cond = torch.cat([img, txt])

    # --- image stream: [4x | 2x | 1x | noisy], each patchified by its own conv3d
    def embed(lat, name, k):
        lat = lat.double()[None]
        pad = [(-lat.shape[i]) % k[i - 2] for i in (2, 3, 4)]
        lat = F.pad(lat, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
        y = F.conv3d(lat, W[name + ".weight"], W[name + ".bias"], stride=k)
        return y[0].flatten(1).T  # (tokens in t, h, w order, D)

    toks, cos, sin = [], [], []
    for lat_name, idx_name, proj, k, pool in (
        ("clean_latents_4x", "clean_latent_4x_indices", "clean_x_embedder.proj_4x", (4, 8, 8), 4),
        ("clean_latents_2x", "clean_latent_2x_indices", "clean_x_embedder.proj_2x", (2, 4, 4), 2),
        ("clean_latents", "clean_latent_indices", "clean_x_embedder.proj", (1, 2, 2), 1),
    ):
        lat = kw.get(lat_name)
        if lat is None:
            continue
        lat = lat[min(b, lat.shape[0] - 1)]
        toks.append(embed(lat, proj, k))
        c, s = _rope_cs(cfg, idx(idx_name, lat.shape[1]), hp, wp, pool)
        cos.append(c)
        sin.append(s)
    toks.append(embed(x, "x_embedder.proj", (1, 2, 2)))
    c, s = _rope_cs(cfg, idx("latent_indices", T), hp, wp, 1)
    cos.append(c)
    sin.append(s)
    xi = torch.cat(toks)
    rope = (torch.cat(cos), torch.cat(sin))
    n_img, n_noisy = xi.shape[0], T * hp * wp

    for i in range(cfg.num_layers):
        p = f"transformer_blocks.{i}."
        m = W.lin(p + "norm1.linear", F.silu(temb)).chunk(6)
        mc = W.lin(p + "norm1_context.linear", F.silu(temb)).chunk(6)
        ni = _ln(xi) * (1 + m[1]) + m[0]
        nc = _ln(cond) * (1 + mc[1]) + mc[0]

        q = torch.cat(
            [
                _rotate(_qk(W, p, "to_q", "norm_q", ni, heads), rope, heads),
                _qk(W, p, "add_q_proj", "norm_added_q", nc, heads),
            ]
        )
        k = torch.cat(
            [
                _rotate(_qk(W, p, "to_k", "norm_k", ni, heads), rope, heads),
                _qk(W, p, "add_k_proj", "norm_added_k", nc, heads),
            ]
        )
        v = torch.cat([W.lin(p + "attn.to_v", ni), W.lin(p + "attn.add_v_proj", nc)])
        a = _attn(q, k, v, heads)
        xi = xi + m[2] * W.lin(p + "attn.to_out.0", a[:n_img])
        cond = cond + mc[2] * W.lin(p + "attn.to_add_out", a[n_img:])
        xi = xi + m[5] * _ff(W, p + "ff", _ln(xi) * (1 + m[4]) + m[3])
        cond = cond + mc[5] * _ff(W, p + "ff_context", _ln(cond) * (1 + mc[4]) + mc[3])

    xs = torch.cat([xi, cond])
    for i in range(cfg.num_single_layers):
        p = f"single_transformer_blocks.{i}."
        shift, scale, gate = W.lin(p + "norm.linear", F.silu(temb)).chunk(3)
        n = _ln(xs) * (1 + scale) + shift
        mlp = F.gelu(W.lin(p + "proj_mlp", n), approximate="tanh")

        q, k = (_qk(W, p, name, norm, n, heads) for name, norm in (("to_q", "norm_q"), ("to_k", "norm_k")))
        q, k = (torch.cat([_rotate(t[:n_img], rope, heads), t[n_img:]]) for t in (q, k))
        a = _attn(q, k, W.lin(p + "attn.to_v", n), heads)
        xs = xs + gate * W.lin(p + "proj_out", torch.cat([a, mlp], -1))

    out = xs[n_img - n_noisy : n_img]
    scale, shift = W.lin("norm_out.linear", F.silu(temb)).chunk(2)
    out = W.lin("proj_out", _ln(out) * (1 + scale) + shift)  # (T*hp*wp, C*2*2)
    out = out.reshape(T, hp, wp, C, 2, 2).permute(3, 0, 1, 4, 2, 5)  # c, t, h, ph, w, pw
    return out.reshape(C, T, H, Wd)
