"""Regional torch.compile (framepack.models.compile) on the CPU (inductor, gcc): equal to eager for both
schedules' layouts, one graph per block class whatever the depth, no recompiles between steps and
sections, after a LoRA-style weight change, or with streamed blocks."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import force_streamed_transformer, make_inputs
from PIL import Image

from framepack.config import TINY, GenerationRequest, RuntimeOptions
from framepack.events import SectionDone
from framepack.models.compile import compile_blocks, compile_counts, is_compiled
from framepack.models.transformer import FramePackTransformer
from framepack.pipeline import load_pipeline
from framepack.sections import section_count


def _model(cfg=TINY, seed=0) -> FramePackTransformer:
    torch.manual_seed(seed)
    m = FramePackTransformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


@torch.no_grad()
def test_compiled_blocks_equal_eager_with_one_graph_per_block_class():
    deep = dataclasses.replace(TINY, num_layers=3, num_single_layers=4)  # TINY's block shapes, more blocks
    model = _model(deep)
    cases = [make_inputs(TINY, "original_p0", batch=2, text_lens=(5, 3)),  # padded text, both layouts
             make_inputs(TINY, "f1", seed=1), make_inputs(TINY, "original_p3", parts=("1x", "4x"), seed=2)]
    eager = [model(**kw).sample for kw in cases]
    before = compile_counts()
    assert compile_blocks(model) == {"blocks": 8, "classes": ["_DoubleBlock", "_SingleBlock", "_RefinerBlock"]}
    assert is_compiled(model) and compile_blocks(model)["blocks"] == 0  # a second call compiles nothing more
    for kw, want in zip(cases, eager):
        torch.testing.assert_close(model(**kw).sample, want, rtol=1e-5, atol=1e-5)
    first = compile_counts()["graphs"] - before["graphs"]
    # refiner, double, single, the last single (it computes only the image rows) + the other inputs' shapes:
    # never one per block (8 blocks, 3 input shapes)
    assert 4 <= first <= 4 * len(cases), first
    again = compile_counts()
    for kw in cases:  # new timesteps: the same graphs
        model(**{**kw, "timestep": kw["timestep"] * 0.5})
    assert compile_counts() == again


@torch.no_grad()
def test_a_weight_change_needs_no_recompile():
    model = _model(seed=3)
    kw = make_inputs(TINY, "original_p0", seed=4)
    compile_blocks(model)
    model(**kw)
    counts = compile_counts()
    model.single_transformer_blocks[0].attn.to_q.weight.add_(0.01)  # what a LoRA merge does: in place
    out = model(**kw).sample
    assert compile_counts() == counts
    eager = _model(seed=3)
    eager.single_transformer_blocks[0].attn.to_q.weight.add_(0.01)
    torch.testing.assert_close(out, eager(**kw).sample, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def start_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile") / "start.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("memory", ["off", "managed"])
def test_generation_compiles_once_and_matches_eager(home, start_image, tmp_path, monkeypatch, memory):
    """Two sections with TeaCache skipping steps: no graph is compiled after the first section, the
    latents equal the eager run's (to rounding: the MP4 codec would turn a 1e-6 difference into a
    different encoding) and TeaCache skips the same steps. `managed`: the transformer's blocks are
    streamed (a forced plan: every block copied in before it runs)."""
    import framepack.vae as vae_mod

    if memory == "managed":
        force_streamed_transformer(monkeypatch)

    seen, real = [], vae_mod.decode
    monkeypatch.setattr(vae_mod, "decode", lambda m, latents, **k: (seen.append(latents.clone()), real(m, latents,
                                                                                                       **k))[1])
    seconds = 2 * 36 / 30  # two sections at window 9
    assert section_count(seconds, 9) == 2
    request = GenerationRequest(image=start_image, prompt="a dot moves", steps=8, seconds=seconds, seed=7,
                                teacache_threshold=0.3, output=str(tmp_path / "eager.mp4"))  # fmt: skip
    eager = load_pipeline("tiny", device="cpu", options=RuntimeOptions(memory=memory)).generate(request)
    expected = list(seen)
    seen.clear()
    pipe = load_pipeline("tiny", device="cpu", options=RuntimeOptions(memory=memory, compile=True))
    assert is_compiled(pipe.c.transformer)
    if memory == "managed":
        assert "stream" in pipe.c.plan_job(height=8, width=8, window=9, with_text=False).plan.describe()
    after_section = []

    def on_event(event):
        if isinstance(event, SectionDone):
            after_section.append(compile_counts())

    compiled = pipe.generate(dataclasses.replace(request, output=str(tmp_path / "compiled.mp4")), on_event)
    assert compiled.status == "finished" and len(after_section) == 2
    assert after_section[0] == after_section[1] == compile_counts()  # section 2 compiled nothing
    assert len(seen) == len(expected) == 2
    for a, b in zip(expected, seen):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    reports = [json.loads(r.metadata.read_text())["step_cache"] for r in (eager, compiled)]
    assert reports[0] == reports[1] and 0 < reports[0]["computed"] < reports[0]["calls"]
    assert json.loads(compiled.metadata.read_text())["speed"] == {"fp8": None, "compile": True}
    assert json.loads(eager.metadata.read_text())["speed"] == {"fp8": None, "compile": False}
