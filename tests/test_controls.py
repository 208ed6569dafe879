"""Section controls: parsing, placement tables by hand, and what the transformer actually receives."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from framepack import vae as vae_mod
from framepack.config import GenerationRequest, RequestError
from framepack.controls import ControlError, parse_prompts, place_anchors, prompts_per_section, snap
from framepack.encoders import pad_text
from framepack.pipeline import load_pipeline
from framepack.sections import make_schedule
from framepack.video import probe, read_frames

# ------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text,expected",
    [
        ("[0s: a man waves] [2.5s: he jumps]", [(0.0, "a man waves"), (2.5, "he jumps")]),
        ("[0: a] [1.2s:b]", [(0.0, "a"), (1.2, "b")]),
        ("  [0s : waves ]\n[ 3 s: jumps, then lands ]  ", [(0.0, "waves"), (3.0, "jumps, then lands")]),
        ("a plain prompt, no times", [(0.0, "a plain prompt, no times")]),
        # only a bracket group that starts with a time is a timestamp; other brackets are prompt text
        ("a man [wearing a hat] walks", [(0.0, "a man [wearing a hat] walks")]),
        ("[zero: a]", [(0.0, "[zero: a]")]),
        ("a [b [c] d", [(0.0, "a [b [c] d")]),
        (r"a man \[wearing\] walks", [(0.0, "a man [wearing] walks")]),  # escaped: the same, written out
        (r"[0s: a man \[in a hat\] waves] [2s: he jumps]", [(0.0, "a man [in a hat] waves"), (2.0, "he jumps")]),
    ],
)
def test_timestamp_parsing_valid(text, expected):
    assert parse_prompts(text) == expected


@pytest.mark.parametrize(
    "text,message",
    [
        ("[0s: a] [2s b]", "text outside brackets|malformed"),
        ("[0s: a] [2s: b", "malformed timestamped prompt"),
        ("0s: a] [2s: b]", "text outside brackets"),
        ("[0.5x: a]", "bad time '0.5x'"),
        ("[0s: a] [wearing a hat]", r"malformed.*written \\\[ or \\\]"),  # the error says how to escape
        ("[0s: a man [in a hat] waves]", "a \\[ inside a \\[TIME: prompt\\] block"),
        ("[0s: a] [2s: b", "a \\[ is not closed"),
        ("[-1s: a]", "bad time '-1s'"),
        ("[1s: a]", "the first prompt must start at 0s"),
        ("[0s: a] [3s: b] [2s: c]", "prompt times must increase: 2s comes after 3s"),
        ("[0s: a] [2s: b] [2s: c]", "prompt times must increase"),
        ("[0s: a] [2s:   ]", "the prompt at 2s is empty"),
        ("   ", "the prompt is empty"),
    ],
)
def test_timestamp_parsing_errors(text, message):
    with pytest.raises(ControlError, match=message):
        parse_prompts(text)


def test_prompts_per_section_and_snapping():
    # 4 sections of 1.2 s; 2.5 s snaps to boundary 2 (2.4 s); blending marks the section where it changes
    per, starts = prompts_per_section(parse_prompts("[0s: A] [2.5s: B]"), 4, 9, blend=True)
    assert [(p.prompt, p.blend_from) for p in per] == [("A", None), ("A", None), ("B", "A"), ("B", None)]
    assert starts == pytest.approx([0.0, 2.4])
    with pytest.raises(ControlError, match="both start section 2"):  # 1.3 and 1.5 both snap to 1.2
        prompts_per_section(parse_prompts("[0s: A] [1.3s: B] [1.5s: C]"), 4, 9)
    with pytest.raises(ControlError, match=r"at or after the end of the 4\.80s video"):
        prompts_per_section(parse_prompts("[0s: A] [5s: B]"), 4, 9)
    assert [snap(t, 4, 9) for t in (0, 0.59, 0.61, 1.2, 4.79, 9)] == [0, 0, 1, 1, 4, 4]


# (sections, schedule, keyframe times, end frame) -> [(source, boundary, video section, snapped s)], by hand:
# inverted: boundary j anchors video section j-1 (it ends there); forward: video section j (it starts there)
ANCHOR_TABLES = [
    (1, "inverted", [], True, [("end", 1, 0, 1.2)]),
    (4, "inverted", [1.0], True, [("end", 4, 3, 4.8), ("keyframe 1", 1, 0, 1.2)]),
    (6, "inverted", [3.7, 6.0], False, [("keyframe 1", 3, 2, 3.6), ("keyframe 2", 5, 4, 6.0)]),
    (4, "forward", [2.3], False, [("keyframe 1", 2, 2, 2.4)]),
    (6, "forward", [1.1, 5.9], False, [("keyframe 1", 1, 1, 1.2), ("keyframe 2", 5, 5, 6.0)]),
]


@pytest.mark.parametrize("n,schedule,keyframes,end,expected", ANCHOR_TABLES)
def test_anchor_placement_tables(n, schedule, keyframes, end, expected):
    got = place_anchors(keyframes, make_schedule(schedule, 9), n, end_frame=end)
    assert [(a.source, a.boundary, a.video_section, round(a.seconds, 6)) for a in got] == expected


@pytest.mark.parametrize(
    "args,message",
    [
        (([0.3], "inverted", 4), "start of the video: use it as the start image"),
        (([4.8], "forward", 4), r"keyframe 1 at 4\.8s \(snapped to 4\.80s\) is the end of the video: F1 has no"),
        (([9.0], "inverted", 4), "outside the 4.80s video"),
        (([1.2, 1.3], "forward", 4), "same section as another keyframe"),
    ],
)
def test_anchor_errors(args, message):
    times, kind, n = args
    with pytest.raises(ControlError, match=message):
        place_anchors(times, make_schedule(kind, 9), n, end_frame=False)
    with pytest.raises(ControlError, match="end frame needs the original"):
        place_anchors([], make_schedule("forward", 9), 4, end_frame=True)
    with pytest.raises(ControlError, match="falls on the end frame"):
        place_anchors([4.7], make_schedule("inverted", 9), 4, end_frame=True)


# ------------------------------------------------------------------- what the transformer receives
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FRAMEPACK_HOME", str(tmp_path_factory.getbasetemp() / "framepack-home-controls"))
    d = tmp_path_factory.mktemp("imgs")
    for name, color in [
        ("start", (200, 40, 40)),
        ("key", (40, 200, 40)),
        ("key2", (240, 240, 0)),
        ("end", (40, 40, 200)),
    ]:
        x = np.full((64, 64, 3), 70, np.uint8)
        x[8:40, 12:44] = color
        Image.fromarray(x).save(d / f"{name}.png")
    try:
        yield {m: load_pipeline(m, device="cpu") for m in ("tiny", "tiny-f1")}, d
    finally:
        mp.undo()


def _key(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def _run(pipe, req, monkeypatch):
    """Generate, recording every VAE encode (image -> latent), SigLIP encode, and transformer call."""
    encoded, siglips, calls = {}, {}, []
    real_encode, real_siglip = vae_mod.encode, pipe.c.image_encoder.encode
    monkeypatch.setattr(vae_mod, "encode", lambda m, img, g: encoded.setdefault(_key(img), real_encode(m, img, g)))
    monkeypatch.setattr(pipe.c.image_encoder, "encode", lambda img: siglips.setdefault(_key(img), real_siglip(img)))

    def grab(module, args, kwargs):
        calls.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})

    handle = pipe.c.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        result = pipe.generate(req)
    finally:
        handle.remove()
    return result, encoded, siglips, calls


def _fitted(path) -> np.ndarray:
    from framepack.images import load_image, resize_and_center_crop

    return resize_and_center_crop(load_image(str(path)), 64, 64)


# (model, sections) -> per generation-order section: (anchor or None, prompt); prompt change at 2.4 s
# (boundary 2), keyframe at 1.0 s (boundary 1) for the original, 2.3 s (boundary 2) for F1, by hand.
SPY_TABLES = {
    ("tiny", 1): [("end", "P0")],
    ("tiny", 4): [("end", "P1"), (None, "P1"), (None, "P0"), ("key", "P0")],
    ("tiny", 6): [("end", "P1"), (None, "P1"), (None, "P1"), (None, "P1"), (None, "P0"), ("key", "P0")],
    ("tiny-f1", 1): [(None, "P0")],
    ("tiny-f1", 4): [(None, "P0"), (None, "P0"), ("key", "P1"), (None, "P1")],
    ("tiny-f1", 6): [(None, "P0"), (None, "P0"), ("key", "P1"), (None, "P1"), (None, "P1"), (None, "P1")],
}
PROMPTS = {"P0": "a red box", "P1": "a cat runs"}


@pytest.mark.parametrize("model,n", sorted(SPY_TABLES))
def test_transformer_sees_the_right_context_and_prompt(env, tmp_path, monkeypatch, model, n):
    pipes, d = env
    inverted = model == "tiny"
    prompt = PROMPTS["P0"] if n == 1 else f"[0s: {PROMPTS['P0']}] [2.4s: {PROMPTS['P1']}]"
    keyframes = () if n == 1 else (((1.0 if inverted else 2.3), str(d / "key.png")),)
    req = GenerationRequest(image=str(d / "start.png"), prompt=prompt, steps=1, seconds=n * 1.2, teacache=False,
                            keyframes=keyframes, end_image=str(d / "end.png") if inverted else None,
                            end_strength=0.8, output=str(tmp_path))  # fmt: skip
    result, encoded, siglips, calls = _run(pipes[model], req, monkeypatch)
    assert result.status == "finished" and len(calls) == n  # one step per section
    anchors = {"end": 0.8 * encoded[_key(_fitted(d / "end.png"))]} if inverted else {}
    if n > 1:
        anchors["key"] = encoded[_key(_fitted(d / "key.png"))]
    start_siglip = siglips[_key(_fitted(d / "start.png"))]
    image_emb = 0.5 * start_siglip + 0.5 * siglips[_key(_fitted(d / "end.png"))] if inverted else start_siglip
    paddings = ([3] + [2] * (n - 3) + [1, 0]) if n > 4 else list(reversed(range(n)))
    for i, (call, (anchor, prompt_id)) in enumerate(zip(calls, SPY_TABLES[(model, n)])):
        slot = call["clean_latents"][:, :, 1:2]
        if anchor is None:
            assert not any(torch.equal(slot, a) for a in anchors.values()), i
        else:
            assert torch.equal(slot, anchors[anchor]), i
        post = 1 + paddings[i] * 9 + 9 if inverted else 19  # the anchor's frame index (spec §3 layouts)
        assert call["clean_latent_indices"].tolist() == [[0, post]]
        emb = pipes[model].c.cached_prompt(PROMPTS[prompt_id])
        text, mask = pad_text(emb.llama)
        assert torch.equal(call["encoder_hidden_states"], text) and torch.equal(call["encoder_attention_mask"], mask)
        assert torch.allclose(call["image_embeddings"], image_emb)
    assert result.frames == 36 * n + 1


def test_prompt_blend_uses_the_average_embedding(env, tmp_path, monkeypatch):
    pipes, d = env
    req = GenerationRequest(image=str(d / "start.png"), prompt="[0s: a red box] [1.2s: a cat runs]", prompt_blend=True,
                            steps=1, seconds=3 * 1.2, teacache=False, output=str(tmp_path))  # fmt: skip
    _, _, _, calls = _run(pipes["tiny-f1"], req, monkeypatch)
    a, b = (pipes["tiny-f1"].c.cached_prompt(p) for p in ("a red box", "a cat runs"))
    blended = pad_text(a.blend(b).llama)[0]
    assert torch.equal(calls[0]["encoder_hidden_states"], pad_text(a.llama)[0])
    assert torch.allclose(calls[1]["encoder_hidden_states"], blended)  # the section where it changes
    assert torch.equal(calls[2]["encoder_hidden_states"], pad_text(b.llama)[0])


# ------------------------------------------------------------------------------- text-to-video
@pytest.mark.parametrize("model,start", [("tiny", "color:#30a050"), ("tiny-f1", "generate"), ("tiny", "generate")])
def test_text_to_video_runs_without_an_image(env, tmp_path, monkeypatch, model, start):
    """The start frame every section sees: the plain colour, or the first frame of a section sampled
    first from an empty start (zero latent and image embedding), whose SigLIP states then condition."""
    from framepack.video import to_uint8_frames

    pipes, _ = env
    pipe = pipes[model]
    req = GenerationRequest(prompt="a ball bounces", steps=1, seconds=2.4, t2v_start=start, output=str(tmp_path))
    velocities = []
    hook = pipe.c.transformer.register_forward_hook(lambda m, a, out: velocities.append(out.sample.clone()))
    try:
        result, encoded, siglips, calls = _run(pipe, req, monkeypatch)
    finally:
        hook.remove()
    assert result.status == "finished" and probe(result.video)["frames"] == 73 and req.image is None
    if start.startswith("color:"):
        frame = np.full((64, 64, 3), (0x30, 0xA0, 0x50), np.uint8)  # the bucket of base 64 for a square
        start_latent, image_emb = encoded[_key(frame)], siglips[_key(frame)]
        sections = calls
    else:
        first, sections = calls[0], calls[1:]
        assert first["clean_latents"].abs().max() == 0 and first["image_embeddings"].abs().max() == 0
        # one step at sigma 1: x0 = x - v; the start latent is its first frame, decoded for SigLIP
        start_latent = (first["hidden_states"] - velocities[0])[:, :, :1]
        frame = to_uint8_frames(vae_mod.decode(pipe.c.vae, start_latent))[0]
        image_emb = siglips[_key(frame)]
    assert len(sections) == 2  # one step for each of the 2 sections
    for call in sections:
        assert torch.allclose(call["clean_latents"][:, :, :1], start_latent, atol=1e-6)
        assert torch.equal(call["image_embeddings"], image_emb)


# ---------------------------------------------------------------------------------- extension
@pytest.fixture(scope="module")
def input_video(tmp_path_factory):
    """A smooth 2.5 s clip (a square sliding over a gradient), so codec error is small and comparable."""
    from framepack.video import SectionVideoWriter

    out = tmp_path_factory.mktemp("vid") / "input.mp4"
    y, x = np.mgrid[0:64, 0:64]
    frames = []
    for t in range(75):
        f = np.stack([x * 3, y * 3, np.full_like(x, 90)], -1).astype(np.uint8)
        f[20:36, 4 + t // 2 : 20 + t // 2] = (230, 60, 40)
        frames.append(f)
    writer = SectionVideoWriter(out)
    writer.add_final(np.stack(frames))
    writer.finish()
    return out


@pytest.mark.parametrize("model,overlap", [("tiny-f1", 33), ("tiny", 1)])
def test_video_extension_frame_count_and_prefix(env, input_video, tmp_path, model, overlap):
    pipes, _ = env
    req = GenerationRequest(video=str(input_video), prompt="a red box", steps=1, seconds=2.4, output=str(tmp_path))
    result = pipes[model].generate(req)
    n_in = probe(input_video)["frames"]
    generated = 36 * 2 + overlap  # F1: the first section cross-fades over the input's last 33 frames;
    # the original's video starts at the input's last frame (re-encoded), which is dropped
    assert result.frames == n_in + generated - overlap == probe(result.video)["frames"]
    head = read_frames(result.video, 0, n_in - overlap)
    source = read_frames(input_video, 0, n_in - overlap)
    assert np.abs(head.astype(np.int16) - source).mean() < 2.0  # the input, re-encoded once


def test_video_extension_bad_inputs(env, tmp_path, monkeypatch, input_video):
    import framepack.inputs as inputs_mod

    pipes, d = env
    base = dict(prompt="x", steps=1, seconds=1.2, output=str(tmp_path / "o"))
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    cases = [
        (dict(video=str(tmp_path / "missing.mp4")), "input video not found"),
        (dict(video=str(text)), "cannot read video|not a video"),
        (dict(video=str(d / "start.png"), seconds=1.2), "has 1 frames; extending needs at least 33"),
        (dict(video=str(input_video), image=str(d / "start.png")), "either an image to animate or a video"),
    ]
    for kw, message in cases:
        with pytest.raises(RequestError, match=message):
            pipes["tiny-f1"].generate(GenerationRequest(**{**base, **kw}))
    monkeypatch.setattr(inputs_mod, "MAX_INPUT_SECONDS", 1)
    with pytest.raises(RequestError, match="longer than 1 s"):
        pipes["tiny-f1"].generate(GenerationRequest(**{**base, "video": str(input_video)}))
    monkeypatch.setattr(inputs_mod, "MAX_INPUT_SECONDS", 600)
    monkeypatch.setattr(inputs_mod, "MAX_INPUT_PIXELS", 100)
    with pytest.raises(RequestError, match="at most 100 pixels"):
        pipes["tiny-f1"].generate(GenerationRequest(**{**base, "video": str(input_video)}))
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())  # nothing half-written
