"""The packed transformer against two independent implementations: diffusers' FramePack class (same
weights) and a plain float64 re-statement of the spec (tests/reference_transformer.py)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from conftest import LAYOUTS, make_inputs, randomize_, to_diffusers_kwargs
from diffusers import HunyuanVideoFramepackTransformer3DModel
from reference_transformer import reference_forward

from framepack.config import FRAMEPACK_HY, TINY
from framepack.models.transformer import FramePackTransformer

# (batch, h, w, text lengths): batch 1 with a padded text mask, batch 2 with different lengths, and
# latent sizes not divisible by 8 (and by 4) so the 2x/4x replicate-padding path runs.
CASES = [
    (1, 16, 16, (5,)),
    (1, 12, 20, (3,)),
    (2, 16, 16, (5, 8)),
    (2, 10, 14, (2, 6)),
]


def _diffusers_pair(seed: int = 0):
    torch.manual_seed(seed)
    ref = HunyuanVideoFramepackTransformer3DModel(**dataclasses.asdict(TINY)).eval()
    randomize_(ref, seed)
    ours = FramePackTransformer(TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def pair():
    return _diffusers_pair()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("batch,h,w,lens", CASES)
def test_matches_diffusers(pair, layout, batch, h, w, lens):
    ref, ours = pair
    kw = make_inputs(TINY, layout, batch=batch, h=h, w=w, text_lens=lens, seed=batch * 100 + h)
    with torch.no_grad():
        expected = ref(**to_diffusers_kwargs(kw)).sample
        got = ours(**kw).sample
    assert got.dtype == torch.float32 and got.shape == expected.shape == kw["hidden_states"].shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_state_dict_is_diffusers_state_dict(pair):
    ref, ours = pair
    a, b = ref.state_dict(), ours.state_dict()
    assert set(a) == set(b)
    assert all(a[k].shape == b[k].shape for k in a)


def test_full_size_config_matches_diffusers_on_meta():
    with torch.device("meta"):
        ours = FramePackTransformer(FRAMEPACK_HY)
        ref = HunyuanVideoFramepackTransformer3DModel(**dataclasses.asdict(FRAMEPACK_HY))
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert a == b
    assert sum(p.numel() for p in ours.parameters()) == 12_874_314_816


ABSENT = [s for r in range(1, 4) for s in itertools.combinations(("1x", "2x", "4x"), r)]


@pytest.mark.parametrize("absent", ABSENT, ids=lambda s: "no-" + "-".join(s))
def test_missing_context_parts_against_float64_reference(absent):
    """diffusers' class crashes when a context part is None; the official (and we) just pack fewer tokens."""
    model = randomize_(FramePackTransformer(TINY), seed=3).eval()
    parts = tuple(p for p in ("1x", "2x", "4x") if p not in absent)
    kw = make_inputs(TINY, "f1", batch=2, h=10, w=12, text_lens=(4, 7), parts=parts, seed=7)
    with torch.no_grad():
        got = model(**kw).sample
        got64 = model.double()(**kw).sample
    expected = reference_forward(model.state_dict(), TINY, **kw)
    # In float64 our model and the reference must agree to rounding: same maths, different code.
    assert (got64 - expected).abs().max().item() <= 1e-10
    # fp32 carries only rounding error (these random weights amplify it; a wrong token would be O(1)).
    assert (got.double() - expected).abs().max().item() <= 1e-3 * expected.abs().max().item()


@pytest.mark.parametrize("layout", ["original_p3", "f1"])
def test_full_context_against_float64_reference(layout):
    model = randomize_(FramePackTransformer(TINY), seed=5).double().eval()
    kw = make_inputs(TINY, layout, batch=2, h=12, w=18, text_lens=(8, 3), seed=11)
    with torch.no_grad():
        got = model(**kw).sample
    assert (got - reference_forward(model.state_dict(), TINY, **kw)).abs().max().item() <= 1e-10


def test_reference_agrees_with_diffusers(pair):
    """The float64 reference is itself checked against diffusers, so the two yardsticks agree."""
    ref, _ = pair
    kw = make_inputs(TINY, "original_p0", batch=2, h=10, w=14, text_lens=(2, 6), seed=1)
    with torch.no_grad():
        expected = ref(**to_diffusers_kwargs(kw)).sample.double()
    ours = reference_forward(ref.state_dict(), TINY, **kw)
    assert (ours - expected).abs().max().item() <= 1e-3 * expected.abs().max().item()  # fp32 rounding only


def test_section_work_is_reused_across_steps(pair, monkeypatch):
    _, ours = pair
    calls = []
    real = ours._prepare
    monkeypatch.setattr(ours, "_prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours.clear_section_cache()
    kw = make_inputs(TINY, "f1", seed=2)
    with torch.no_grad():
        first = ours(**kw).sample
        for t in (800.0, 700.0):  # new steps: new noisy latents and timestep, same context tensors
            ours(**{**kw, "hidden_states": torch.randn_like(kw["hidden_states"]), "timestep": torch.tensor([t])})
        assert len(calls) == 1
        again = ours(**kw).sample
        assert torch.equal(first, again)
        # Editing a context tensor in place must invalidate the cached section.
        kw["clean_latents"].mul_(2)
        changed = ours(**kw).sample
    assert len(calls) == 2
    fresh = FramePackTransformer(TINY).eval()
    fresh.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert torch.equal(changed, fresh(**kw).sample)


def test_batch_rows_are_independent(pair):
    """Batch 2 with different prompt lengths equals two batch-1 calls (padding never leaks)."""
    _, ours = pair
    kw = make_inputs(TINY, "original_p3", batch=2, h=16, w=16, text_lens=(3, 8), seed=4)
    with torch.no_grad():
        both = ours(**kw).sample
        for i in range(2):
            one = {k: (v[i : i + 1] if torch.is_tensor(v) and v.shape[0] == 2 else v) for k, v in kw.items()}
            assert (ours(**one).sample[0] - both[i]).abs().max().item() <= 1e-5


def test_gradients_flow_and_match_inference(pair):
    _, ours = pair
    kw = make_inputs(TINY, "f1", seed=9)
    with torch.no_grad():
        expected = ours(**kw).sample
    ours.requires_grad_(True)
    try:
        out = ours(**kw).sample
        out.square().mean().backward()
        grads = [p.grad for p in ours.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert (out.detach() - expected).abs().max().item() <= 1e-5
        ours.gradient_checkpointing = True
        ours.zero_grad()
        ours(**kw).sample.square().mean().backward()
        assert all(p.grad is not None for p in ours.parameters())
    finally:
        ours.gradient_checkpointing = False
        ours.requires_grad_(False).zero_grad(set_to_none=True)


def test_bfloat16_runs_and_returns_fp32(pair):
    _, ours = pair
    model = FramePackTransformer(TINY).eval()
    model.load_state_dict(ours.state_dict())
    model.to(torch.bfloat16)
    kw = make_inputs(TINY, "original_p0", seed=5)
    with torch.no_grad():
        out16 = model(**kw).sample
        out32 = ours(**kw).sample
    assert out16.dtype == torch.float32
    assert (out16 - out32).abs().mean() < 0.05 * out32.abs().mean()


def test_official_call_conventions(pair):
    _, ours = pair
    kw = make_inputs(TINY, "f1", seed=6)
    with torch.no_grad():
        a = ours(**kw, return_dict=False)[0]
        # diffusers-style 1-D indices and a scalar timestep work too
        kw1 = {k: (v[0] if k.endswith("indices") else v) for k, v in kw.items()}
        kw1["timestep"] = kw["timestep"][0]
        b = ours(**kw1).sample
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(hidden_states=torch.randn(1, 16, 9, 15, 16)), "divisible by the patch size"),
        (dict(image_embeddings=None), "image_embeddings"),
        (dict(guidance=None), "guidance is required"),
        (dict(clean_latent_indices=torch.tensor([[0, 1, 2]])), "clean_latents indices has shape"),
        (dict(clean_latents_2x=None), "must be given together"),
        (
            dict(encoder_attention_mask=torch.tensor([[False, True, True, False, False, False, False, False]])),
            "right padding",
        ),
        (dict(encoder_attention_mask=torch.zeros(1, 8, dtype=torch.bool)), "no valid text token"),
        (dict(encoder_hidden_states=torch.randn(3, 8, 32)), "encoder_hidden_states has batch 3"),
    ],
)
def test_bad_inputs_give_clear_errors(pair, change, message):
    _, ours = pair
    kw = {**make_inputs(TINY, "original_p0", seed=8), **change}
    with pytest.raises(ValueError, match=message), torch.no_grad():
        ours(**kw)
