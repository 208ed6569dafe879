"""End to end on the built-in tiny family: frame counts, MP4s, events, determinism, cancellation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_same_file
from PIL import Image

from framepack import vae as vae_mod
from framepack.config import GenerationRequest
from framepack.events import (
    Cancelled,
    CancelToken,
    Finished,
    SectionDone,
    StageStarted,
    StepProgress,
)
from framepack.pipeline import load_pipeline
from framepack.video import probe


@pytest.fixture(scope="module")
def pipes(home):  # home: conftest's FRAMEPACK_HOME of this module
    return {m: load_pipeline(m, device="cpu") for m in ("tiny", "tiny-f1")}


@pytest.fixture(scope="session")
def image_path(tmp_path_factory):
    x = np.zeros((96, 128, 3), np.uint8)
    x[..., 0] = np.linspace(0, 255, 128, dtype=np.uint8)[None]
    x[30:60, 40:80] = (40, 200, 90)
    path = tmp_path_factory.mktemp("img") / "start.png"
    Image.fromarray(x).save(path)
    return str(path)


def _request(image_path, out, **kw) -> GenerationRequest:
    base = dict(image=image_path, prompt="a green square moves right", steps=2, output=str(out), teacache=False)
    return GenerationRequest(**{**base, **kw})


def seconds_for(sections: int, window: int = 9) -> float:
    return sections * window * 4 / 30  # section_count rounds this back to `sections`


@pytest.mark.parametrize("model", ["tiny", "tiny-f1"])
@pytest.mark.parametrize("sections", [1, 3])
def test_frame_counts_events_and_files(pipes, image_path, tmp_path, model, sections):
    events = []
    result = pipes[model].generate(_request(image_path, tmp_path, seconds=seconds_for(sections)), events.append)
    assert result.status == "finished" and result.sections == result.sections_done == sections
    assert result.frames == 36 * sections + 1
    info = probe(result.video)
    assert info["frames"] == 36 * sections + 1 and info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert (info["width"], info["height"]) == (96, 64) and round(info["fps"]) == 30
    # events: text/vae/image stages, then per section: sampling stage, steps 1..n, decoding, SectionDone
    kinds = [type(e).__name__ for e in events]
    assert kinds[:4] == ["JobPlanned"] + ["StageStarted"] * 3 and kinds[-1] == "Finished"
    assert (events[0].sections, events[0].frames) == (sections, 36 * sections + 1)
    assert events[0].prompt_times == [(0.0, "a green square moves right")] and events[0].anchors == []
    assert [e.stage for e in events[1:4]] == ["text encoding", "vae encoding", "image encoding"]
    done = [e for e in events if isinstance(e, SectionDone)]
    assert [d.section for d in done] == list(range(sections))
    assert [d.frames for d in done] == sorted(d.frames for d in done) and done[-1].frames == result.frames
    steps = [(e.section, e.step) for e in events if isinstance(e, StepProgress)]
    assert steps == [(s, i) for s in range(sections) for i in (1, 2)]
    order = [i for i, e in enumerate(events) if isinstance(e, (SectionDone, StepProgress))]
    assert order == sorted(order)
    assert all(e.preview.dtype == np.uint8 and e.preview.shape[2] == 3 for e in events if isinstance(e, StepProgress))
    meta = json.loads(result.metadata.read_text())
    assert meta["status"] == "finished" and meta["frames"] == result.frames and meta["model"]["name"] == model
    assert meta["request"]["seconds"] == pytest.approx(seconds_for(sections)) and meta["video"] == result.video.name
    folder = f".{result.video.stem}.sections"  # the section checkpoints a branch starts from
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([result.video.name, result.metadata.name, folder])
    assert meta["checkpoints"]["folder"] == folder and meta["checkpoints"]["kept"] == [0, sections]


@pytest.mark.parametrize("model", ["tiny", "tiny-f1"])
def test_other_window_frame_formula(pipes, image_path, tmp_path, model):
    window, sections = 5, 2
    req = _request(image_path, tmp_path, window=window, seconds=seconds_for(sections, window))
    result = pipes[model].generate(req)
    assert result.frames == 4 * (window * sections + 1) - 3 == probe(result.video)["frames"]


def _capture_latents(monkeypatch):
    seen = []
    real = vae_mod.decode

    def spy(model, latents, **kw):
        seen.append(latents.clone())
        return real(model, latents, **kw)

    monkeypatch.setattr(vae_mod, "decode", spy)
    return seen


@pytest.mark.parametrize("model", ["tiny", "tiny-f1"])
def test_same_seed_same_latents(pipes, image_path, tmp_path, monkeypatch, model):
    seen = _capture_latents(monkeypatch)
    req = _request(image_path, tmp_path, seconds=seconds_for(2), teacache=True)
    a = pipes[model].generate(req)
    first = list(seen)
    seen.clear()
    b = pipes[model].generate(req)
    assert len(first) == len(seen) == 2
    assert all(torch.equal(x, y) for x, y in zip(first, seen))  # the promise: identical latents
    assert_same_file(a.video, b.video)  # and the same file, byte for byte
    seen.clear()
    pipes[model].generate(_request(image_path, tmp_path, seconds=seconds_for(1), teacache=True, seed=7))
    assert not torch.equal(first[0], seen[0])  # another seed: the first section already differs


@pytest.mark.parametrize("model,first_section_frames", [("tiny", 33), ("tiny-f1", 37)])
def test_cancel_mid_section_leaves_valid_shorter_video(pipes, image_path, tmp_path, model, first_section_frames):
    cancel, events = CancelToken(), []

    def on_event(e):
        events.append(e)
        if isinstance(e, StepProgress) and (e.section, e.step) == (1, 1):
            cancel.cancel()

    result = pipes[model].generate(_request(image_path, tmp_path, seconds=seconds_for(3)), on_event, cancel)
    assert result.status == "cancelled" and result.sections_done == 1
    assert isinstance(events[-1], Cancelled) and not any(isinstance(e, Finished) for e in events)
    # no further steps after the cancel request (checked at the start of every step)
    assert [(e.section, e.step) for e in events if isinstance(e, StepProgress)][-1] == (1, 1)
    assert result.frames == first_section_frames == probe(result.video)["frames"]
    assert json.loads(result.metadata.read_text())["status"] == "cancelled"


def test_cancel_before_any_section_leaves_no_video(pipes, image_path, tmp_path):
    cancel = CancelToken()
    cancel.cancel()
    result = pipes["tiny"].generate(_request(image_path, tmp_path), None, cancel)
    assert result.status == "cancelled" and result.video is None
    assert [p.suffix for p in tmp_path.iterdir()] == [".json"]


def test_prompt_cache_skips_text_encoders(home, image_path, tmp_path, monkeypatch):
    from framepack.components import Components

    loads = []
    real = Components.text_encoder
    monkeypatch.setattr(Components, "text_encoder", lambda self: loads.append(1) or real(self))
    cache = tmp_path / "prompts"
    first = load_pipeline("tiny", device="cpu", prompt_cache_dir=cache)
    one = seconds_for(1)  # one section: the text encoders are what this is about
    first.generate(_request(image_path, tmp_path / "a", seconds=one))
    assert len(loads) == 1 and first.c._text is None  # loaded for the new prompt, freed after encoding
    first.generate(_request(image_path, tmp_path / "a", seconds=one))
    second = load_pipeline("tiny", device="cpu", prompt_cache_dir=cache)  # a new process would look the same
    second.generate(_request(image_path, tmp_path / "b", seconds=one))
    assert len(loads) == 1  # the same prompt never loads the text encoders again
    assert len(list(cache.glob("*.safetensors"))) == 1


def test_real_cfg_and_rescale_run_two_passes(pipes, image_path, tmp_path):
    model = pipes["tiny"].c.transformer
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        pipes["tiny"].generate(
            _request(image_path, tmp_path, cfg=3.0, cfg_rescale=0.5, negative_prompt="blurry", steps=3, seconds=1)
        )
    finally:
        hook.remove()
    assert len(calls) == 2 * 3  # cond and uncond per step, one section


def test_teacache_and_samplers(pipes, image_path, tmp_path, monkeypatch):
    """Each sampler name runs that sampler of the registry (spied) and gives its own latents; TeaCache
    skips some steps under each, and the sidecar reports what it computed."""
    from framepack import sampling

    called = []
    for name, fn in list(sampling.SAMPLERS.items()):
        spy = lambda *a, fn=fn, name=name, **k: called.append(name) or fn(*a, **k)  # noqa: E731
        monkeypatch.setitem(sampling.SAMPLERS, name, spy)
    seen = _capture_latents(monkeypatch)
    finals = {}
    for sampler in ("unipc", "unipc-bh2", "euler"):
        r = pipes["tiny-f1"].generate(_request(image_path, tmp_path, steps=6, teacache=True, sampler=sampler,
                                               seconds=seconds_for(2)))  # fmt: skip
        meta = json.loads(r.metadata.read_text())
        assert r.status == "finished" and 0 < meta["teacache_computed_fraction"] < 1  # some steps skipped
        cache = meta["step_cache"]
        assert cache["name"] == "teacache" and cache["threshold"] == 0.15 and 0 < cache["computed"] < cache["calls"]
        assert called == [sampler] * r.sections  # one run per section
        called.clear()
        finals[sampler] = seen[-1]
    a, b, c = finals.values()
    assert not torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(b, c)


def test_stage_events_name_sections(pipes, image_path, tmp_path):
    events = []
    pipes["tiny"].generate(_request(image_path, tmp_path, seconds=seconds_for(2)), events.append)
    stages = [(e.stage, e.section) for e in events if isinstance(e, StageStarted) and e.section is not None]
    assert stages == [("sampling", 0), ("decoding", 0), ("sampling", 1), ("decoding", 1)]


# ------------------------------------------------------------------------- managed device memory
PLANS = {  # phase -> (mode, resident blocks); every mechanism on every model
    "streamed": {"transformer": ("stream", 0), "text_encoder": ("stream", 1), "vae": ("swap", 0),
                 "image_encoder": ("swap", 0)},
    "mixed": {"transformer": ("stream", 2), "text_encoder": ("swap", 0), "vae": ("resident", 0),
              "image_encoder": ("resident", 0)},
    "high_vram": None,  # what the planner decides with 64 GiB free: everything resident
}  # fmt: skip


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_managed_memory_gives_identical_latents(home, image_path, tmp_path, monkeypatch, plan_name):
    """Unmanaged vs managed runs (forced plans: streamed transformer and LLaMA, swapped and resident
    models): the decoded latents must be bitwise identical, and the weights back on the host after."""
    import framepack.components as comp
    from framepack.config import RuntimeOptions
    from framepack.memory import Mode, Placement, Plan

    seen = _capture_latents(monkeypatch)
    req = _request(image_path, tmp_path, seconds=seconds_for(2), prompt=f"managed {plan_name}")
    load_pipeline("tiny", device="cpu").generate(req)
    expected = list(seen)
    seen.clear()
    plans = []
    real_plan = comp.plan_memory

    def forced(footprints, **kw):
        plan = real_plan(footprints, **kw)
        if PLANS[plan_name] is not None:
            placed = {n: Placement(Mode(m), 1, k, 2) for n, (m, k) in PLANS[plan_name].items()}
            plan = Plan(plan.budget_bytes, {f.name: placed[f.name] for f in footprints})
        plans.append(plan)
        return plan

    monkeypatch.setattr(comp, "plan_memory", forced)
    opts = RuntimeOptions(memory="managed", device_free_bytes=64 * 2**30)
    pipe = load_pipeline("tiny", device="cpu", options=opts, prompt_cache_dir=tmp_path / "pc")  # encode anew
    result = pipe.generate(req)
    assert result.status == "finished" and len(seen) == len(expected) == 2
    assert all(torch.equal(a, b) for a, b in zip(expected, seen))
    assert {f for f in plans[0].placements} == {"transformer", "text_encoder", "vae", "image_encoder"}
    assert plans[0].high_vram == (plan_name == "high_vram")
    meta = json.loads(result.metadata.read_text())
    assert "memory plan" in meta["memory_plan"] and meta["peak_rss_bytes"] > 0
    for p in pipe.c.transformer.parameters():
        assert p.device.type == "cpu"


def test_impossible_budget_is_one_clear_error(home, image_path, tmp_path):
    from framepack.config import RuntimeOptions
    from framepack.memory import MemoryBudgetError

    pipe = load_pipeline("tiny", device="cpu", options=RuntimeOptions(memory="managed", device_free_bytes=20_000))
    with pytest.raises(MemoryBudgetError, match="cannot run even fully streamed"):
        pipe.generate(_request(image_path, tmp_path))
    assert not list(tmp_path.glob("*.mp4"))


_RSS_JOB = """
import gc, json, sys, numpy as np
from PIL import Image
from framepack.config import GenerationRequest
from framepack.memory import current_rss, release_host_memory
from framepack.pipeline import load_pipeline
img = sys.argv[1]
Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)).save(img)
pipe = load_pipeline("tiny-f1", device="cpu")
def settled():
    gc.collect(); release_host_memory(); return current_rss()
def job(prompt):
    return pipe.generate(GenerationRequest(image=img, prompt=prompt, steps=2, seconds=1.2, resolution=256,
                                           output=sys.argv[2], teacache=False))
job("warm up")  # first use maps the video codec libraries etc. once; the idle level is after that
before = settled()
r = job("a new prompt")  # a new prompt: the text encoders are loaded and freed again
after = settled()
print(json.dumps({"before": before, "after": after, "peak": r.peak_rss_bytes}))
"""


def test_host_rss_returns_to_idle_after_a_job(home, tmp_path):
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RSS_JOB, str(tmp_path / "i.png"), str(tmp_path / "o")],
                         capture_output=True, text=True, check=True, env={**os.environ})  # fmt: skip
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["peak"] - r["before"] > 100 * 2**20  # the job's temporaries were large enough to notice
    assert r["after"] <= 1.05 * r["before"], r
