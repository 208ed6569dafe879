"""Every attention backend against a float64 softmax reference; unavailable backends skip with why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from framepack.models import attention as attn_mod
from framepack.models.attention import (
    BACKENDS,
    AttentionBackend,
    AttentionBackendError,
    KeyPadding,
    reference_attention,
    select_backend,
    unavailable_reason,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = {  # name: (batch, Lq, Lk, heads, head_dim, key lengths or None)
    "plain": (1, 200, 200, 3, 32, None),
    "padded-batch": (3, 150, 150, 2, 64, [150, 97, 1]),
    "query-subset": (2, 40, 180, 2, 32, [180, 120]),
}


def _qkv(batch, lq, lk, h, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, h, d, generator=g) for n in (lq, lk, lk))
    return (t.to(DEVICE, dtype) for t in (q, k, v))


def _padding(lengths, lk):
    return None if lengths is None else KeyPadding(lengths, lk)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_backend_matches_float64_reference(name, case):
    reason = unavailable_reason(name)
    if reason:
        pytest.skip(reason)
    b, lq, lk, h, d, lengths = CASES[case]
    dtype = torch.float32 if name in ("sdpa", "xformers") else torch.bfloat16
    q, k, v = _qkv(b, lq, lk, h, d, dtype)
    out = select_backend(name)(q, k, v, _padding(lengths, lk))
    ref = reference_attention(q, k, v, _padding(lengths, lk))
    assert out.shape == q.shape and out.dtype == q.dtype
    tol = 2e-5 if dtype == torch.float32 else (0.1 if name == "sage" else 2e-2)
    assert (out.double() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_path_bounds_the_score_matrix(case, monkeypatch):
    """Forced query chunking: no call ever sees more than `rows` queries, and results are unchanged."""
    b, lq, lk, h, d, lengths = CASES[case]
    q, k, v = _qkv(b, lq, lk, h, d, torch.float32, seed=1)
    chunk_bytes = 64 * 1024
    rows = chunk_bytes // (b * h * lk * 4 * 2)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q_, *a, **kw):
        seen.append(q_.shape[2])
        return real(q_, *a, **kw)

    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", spy)
    pad = _padding(lengths, lk)
    mask = None if pad is None else pad.sdpa_mask(q.device)
    out = attn_mod.sdpa_chunked(q, k, v, mask, chunk_bytes)
    assert max(seen) == rows < lq and sum(seen) == lq
    assert (out.double() - reference_attention(q, k, v, pad)).abs().max().item() <= 2e-5


def test_sdpa_falls_back_to_chunks_when_no_fused_kernel(monkeypatch):
    """On GPUs without flash/mem-efficient kernels the backend must not hand SDPA the whole matrix."""
    import contextlib

    calls = []

    @contextlib.contextmanager
    def no_fused_kernel(backends):
        raise RuntimeError("No available kernel. Aborting execution.")
        yield

    monkeypatch.setattr("torch.nn.attention.sdpa_kernel", no_fused_kernel)
    monkeypatch.setattr(attn_mod, "_fused_ok", {})
    real = attn_mod.sdpa_chunked
    monkeypatch.setattr(attn_mod, "sdpa_chunked", lambda *a: calls.append(a[-1]) or real(*a))
    q, k, v = _qkv(1, 64, 64, 2, 16, torch.float32)
    out = AttentionBackend("sdpa", chunk_bytes=4096)(q, k, v)
    assert calls == [4096]
    assert (out.double() - reference_attention(q, k, v)).abs().max().item() <= 2e-5


def test_key_padding_validation_and_masks():
    with pytest.raises(ValueError, match=r"must lie in 1\.\.5"):
        KeyPadding([6], 5)
    with pytest.raises(ValueError, match=r"must lie in 1\.\.5"):
        KeyPadding([0, 5], 5)
    pad = KeyPadding([3, 5], 5)
    assert pad.sdpa_mask(torch.device("cpu"))[:, 0, 0].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert pad.kv_index(torch.device("cpu")).tolist() == [0, 1, 2, 5, 6, 7, 8, 9]
    assert pad.cu_seqlens_k(torch.device("cpu")).tolist() == [0, 3, 8]


def test_select_backend_errors():
    with pytest.raises(AttentionBackendError, match="unknown attention backend 'fast'"):
        select_backend("fast")
    for name in ("flash", "sage", "xformers"):
        reason = unavailable_reason(name)
        if reason:
            with pytest.raises(AttentionBackendError, match=name):
                select_backend(name)
    assert select_backend("auto").name == "sdpa"
    assert select_backend("sdpa", chunk_mb=1).chunk_bytes == 2**20
