"""One-frame inference (frame edits) on the tiny family: the transformer's inputs against hand-written
tables for every preset and a custom layout, masks at latent size, checks before sampling, the PNG's
settings re-running the edit, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from framepack import vae as vae_mod
from framepack.app.cli import main
from framepack.app.cli_edit import parse_control
from framepack.config import EditControl, EditRequest, GenerationRequest, RequestError, request_from_json
from framepack.events import CancelToken, JobPlanned, StepProgress
from framepack.oneframe import PNG_KEY
from framepack.pipeline import load_pipeline
from framepack.sections import FrameLayout, OneFrameSchedule, ScheduleError

# Hand-written from the layout rules at window W: target [W] unless set; controls at the
# preset's indices; zero post at W+1; 2x zeros at W+2, W+3; 4x zeros at W+4..W+19.
TABLES = {
    "edit": dict(window=9, target=[9], clean=[0, 10], post=True, x2=[11, 12], x4=list(range(13, 29))),
    "edit-no-2x-4x": dict(window=9, target=[9], clean=[0, 10], post=True, x2=None, x4=None),
    "kisekaeichi": dict(window=9, target=[1], clean=[0, 10], post=False, x2=None, x4=None),
    "multi-control": dict(window=9, target=[9], clean=[0, 1, 10], post=True, x2=None, x4=None),
    # window 5, start image at 2, reference at 4, target 30, no 4x: post at 6, 2x at 7, 8
    "custom": dict(window=5, target=[30], clean=[2, 4, 6], post=True, x2=[7, 8], x4=None),
}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    start = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    ref = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(start).save(d / "start.png")
    Image.fromarray(ref).save(d / "ref.png")
    left = np.zeros((64, 64), np.uint8)
    left[:, :32] = 255  # keep the left half: latent columns 0..3 of 8
    Image.fromarray(left).save(d / "left.png")
    top = np.zeros((64, 64), np.uint8)
    top[:16] = 255  # keep the top quarter: latent rows 0..1 of 8
    Image.fromarray(top).save(d / "top.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(d / "black.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(d / "small-white.png")
    rgba = np.dstack([ref, np.where(np.arange(64)[None, :] < 48, 255, 0).repeat(64, 0).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "ref-alpha.png")
    return d


def _spy(monkeypatch, pipe):
    """(transformer kwargs of every call, VAE encodes in order)."""
    calls, encodes = [], []
    hook = pipe.c.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append({k: v.detach().clone() if torch.is_tensor(v) else v
                                                for k, v in kwargs.items()}), with_kwargs=True)  # fmt: skip
    real = vae_mod.encode

    def encode(model, image, generator):
        out = real(model, image, generator)
        encodes.append(out.clone())
        return out

    monkeypatch.setattr(vae_mod, "encode", encode)
    return calls, encodes, hook


def _request(pictures, tmp_path, case: str, **kw) -> EditRequest:
    base = dict(image=str(pictures / "start.png"), prompt="the object moves right", steps=2, seed=5,
                output=str(tmp_path / f"{case}.png"))  # fmt: skip
    extra = {
        "edit": dict(image_mask=str(pictures / "left.png")),
        "edit-no-2x-4x": dict(no_2x=True, no_4x=True),
        "kisekaeichi": dict(preset="kisekaeichi", image_mask=str(pictures / "left.png"),
                            controls=(EditControl(str(pictures / "ref.png"), mask=str(pictures / "top.png")),)),
        "multi-control": dict(preset="multi-control", controls=(EditControl(str(pictures / "ref.png")),)),
        "custom": dict(window=5, target_index=30, image_index=2, no_4x=True,
                       controls=(EditControl(str(pictures / "ref.png"), index=4),)),
    }[case]  # fmt: skip
    return EditRequest(**{**base, **extra, **kw})


def _latent_mask(rows: slice, cols: slice) -> torch.Tensor:
    m = torch.zeros(8, 8)
    m[rows, cols] = 1.0
    return m


MASKS = {"left.png": _latent_mask(slice(None), slice(0, 4)), "top.png": _latent_mask(slice(0, 2), slice(None))}


@pytest.mark.parametrize("case", list(TABLES))
def test_transformer_inputs_equal_the_hand_written_table(pipe, pictures, tmp_path, monkeypatch, case):
    table = TABLES[case]
    request = _request(pictures, tmp_path, case)
    calls, encodes, hook = _spy(monkeypatch, pipe)
    try:
        result = pipe.edit(request)
    finally:
        hook.remove()
    assert result.status == "finished" and result.image.is_file()
    assert len(calls) == 2  # two steps, cfg 1: one pass each
    kw = calls[0]
    assert kw["hidden_states"].shape == (1, 16, 1, 8, 8)  # one target frame
    assert kw["latent_indices"].tolist() == [table["target"]]
    assert kw["clean_latent_indices"].tolist() == [table["clean"]]
    masks = {"edit": ["left.png"], "kisekaeichi": ["left.png", "top.png"]}.get(case, [])
    controls = len(table["clean"]) - int(table["post"])
    assert len(encodes) == controls  # the start image once (it is control 1), then each reference
    expected = [encodes[i] * (MASKS[masks[i]] if i < len(masks) else 1.0) for i in range(controls)]
    if table["post"]:
        expected.append(torch.zeros_like(encodes[0]))
    torch.testing.assert_close(kw["clean_latents"], torch.cat(expected, dim=2), rtol=0, atol=0)
    for part, n in (("x2", 2), ("x4", 16)):
        name = {"x2": "clean_latents_2x", "x4": "clean_latents_4x"}[part]
        idx = {"x2": "clean_latent_2x_indices", "x4": "clean_latent_4x_indices"}[part]
        if table[part] is None:
            assert name not in kw and idx not in kw  # not passed at all
        else:
            assert kw[idx].tolist() == [table[part]]
            assert kw[name].shape == (1, 16, n, 8, 8) and not kw[name].any()
    # the SigLIP states are the start image's
    start = np.array(Image.open(pictures / "start.png"))
    torch.testing.assert_close(kw["image_embeddings"], pipe.c.image_encoder.encode(start).to(kw["image_embeddings"]))


def test_the_png_settings_rerun_the_edit_exactly(pipe, pictures, tmp_path, capsys):
    first = tmp_path / "first.png"
    args = ["edit", "--model", "tiny", "--image", str(pictures / "start.png"), "--prompt", "a cat", "--steps", "2",
            "--preset", "kisekaeichi", "--control", f"{pictures / 'ref.png'}:{pictures / 'top.png'}",
            "--image-mask", str(pictures / "left.png"), "--seed", "9", "--quiet", "--out", str(first)]  # fmt: skip
    assert main(args) == 0
    stored = json.loads(Image.open(first).text[PNG_KEY])
    assert stored["model"] == "tiny" and stored["request"]["kind"] == "edit"
    assert stored["request"]["controls"][0]["mask"] == str(pictures / "top.png")
    sidecar = json.loads(first.with_suffix(".json").read_text())
    assert sidecar["request"] == stored["request"] and sidecar["model"]["schedule"] == "one-frame"
    assert sidecar["layout"]["target"] == [1] and sidecar["layout"]["control 2"] == [10]
    for source in (first, first.with_suffix(".json")):
        again = tmp_path / f"again-{source.suffix[1:]}.png"
        assert main(["edit", "--from", str(source), "--quiet", "--out", str(again)]) == 0
        np.testing.assert_array_equal(np.array(Image.open(again)), np.array(Image.open(first)))
    other = tmp_path / "other-seed.png"
    assert main(["edit", "--from", str(first), "--seed", "10", "--quiet", "--out", str(other)]) == 0
    assert not np.array_equal(np.array(Image.open(other)), np.array(Image.open(first)))
    capsys.readouterr()
    assert main(["generate", "--from", str(first.with_suffix(".json"))]) == 2
    assert "holds the settings of a frame edit: re-run it with `framepack edit --from" in capsys.readouterr().err


def test_save_controls_writes_each_control_as_the_model_saw_it(pipe, pictures, tmp_path, monkeypatch):
    from framepack.video import to_uint8_frames

    _, encodes, hook = _spy(monkeypatch, pipe)
    try:
        result = pipe.edit(_request(pictures, tmp_path, "kisekaeichi", save_controls=True))
    finally:
        hook.remove()
    assert [p.name for p in result.controls] == ["kisekaeichi.control-1.png", "kisekaeichi.control-2.png"]
    for i, (latent, mask) in enumerate(zip(encodes, ("left.png", "top.png"))):
        expected = to_uint8_frames(vae_mod.decode(pipe.c.vae, latent * MASKS[mask]))[0]
        np.testing.assert_array_equal(np.array(Image.open(result.controls[i])), expected)
        unmasked = to_uint8_frames(vae_mod.decode(pipe.c.vae, latent))[0]
        assert not np.array_equal(expected, unmasked)


def test_alpha_masks_and_resized_masks_are_reported(pipe, pictures, tmp_path, monkeypatch):
    request = _request(pictures, tmp_path, "multi-control", image_mask=str(pictures / "small-white.png"),
                       controls=(EditControl(str(pictures / "ref-alpha.png")),))  # fmt: skip
    events, (calls, encodes, hook) = [], _spy(monkeypatch, pipe)
    try:
        result = pipe.edit(request, on_event=events.append)
    finally:
        hook.remove()
    planned = next(e for e in events if isinstance(e, JobPlanned))
    assert planned.notes == result.notes
    assert any("mask of the start image is 32x32, its image 64x64: resized" in n for n in planned.notes)
    assert any("control 2 has transparency: its alpha channel is its mask" in n for n in planned.notes)
    alpha = _latent_mask(slice(None), slice(0, 6))  # 48 of 64 columns opaque
    torch.testing.assert_close(calls[0]["clean_latents"][:, :, 1], (encodes[1] * alpha)[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(calls[0]["clean_latents"][:, :, 0], encodes[0][:, :, 0], rtol=0, atol=0)


@pytest.mark.parametrize("change, message", [
    (dict(image_mask="black.png"), r"the mask of the start image \(.*black.png\) is all black"),
    (dict(target_index=10), r"zero post latent and target are both at index 10; move one of them \(or pass --no-post"),
    (dict(target_index=0), "control 1 and target are both at index 0"),
    (dict(target_index=101), "target_index must be a whole number in 0..100"),
    (dict(seconds=3.0), "seconds does not apply to a frame edit"),
    (dict(prompt="[0s: a] [1s: b]"), "a frame edit takes one prompt"),
    (dict(preset="outfit"), "preset must be one of edit, kisekaeichi, multi-control"),
    (dict(image_index=12), "2x context and control 1 are both at index 12; move one of them \\(or pass --no-2x\\)"),
])  # fmt: skip
def test_bad_edits_fail_before_sampling(pipe, pictures, tmp_path, monkeypatch, change, message):
    if "image_mask" in change:
        change = {"image_mask": str(pictures / change["image_mask"])}
    calls, _, hook = _spy(monkeypatch, pipe)
    try:
        with pytest.raises(RequestError, match=message):
            pipe.edit(_request(pictures, tmp_path, "edit", **change))
    finally:
        hook.remove()
    assert calls == [] and not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_f1_is_refused_and_far_indices_warn(home, pictures, tmp_path):
    f1 = load_pipeline("tiny-f1", device="cpu")
    with pytest.raises(RequestError, match=r"frame edits need the original .* 'tiny-f1' is trained forward"):
        f1.edit(_request(pictures, tmp_path, "edit"))
    from framepack.oneframe import check_edit

    plan = check_edit(_request(pictures, tmp_path, "edit-no-2x-4x", target_index=45), f1.spec.__class__(
        **{**f1.spec.__dict__, "schedule": "inverted"}))  # fmt: skip
    assert any("target at index 45: beyond ~40" in n for n in plan.notes)


def test_cancel_writes_nothing_and_overwrite_waits_for_the_new_image(pipe, pictures, tmp_path):
    cancel = CancelToken()

    def stop(event):
        if isinstance(event, StepProgress):
            cancel.cancel()

    result = pipe.edit(_request(pictures, tmp_path, "edit", steps=3), on_event=stop, cancel=cancel)
    assert result.status == "cancelled" and result.image is None and not list(tmp_path.iterdir())
    done = pipe.edit(_request(pictures, tmp_path, "edit"))
    before = done.image.read_bytes()
    with pytest.raises(RequestError, match=r"already exist.*--overwrite.*new image is complete"):
        pipe.edit(_request(pictures, tmp_path, "edit", seed=6))
    cancel = CancelToken()
    pipe.edit(_request(pictures, tmp_path, "edit", seed=6, overwrite=True), on_event=stop, cancel=cancel)
    assert done.image.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["edit.json",
                                                                                                "edit.png"]
    again = pipe.edit(_request(pictures, tmp_path, "edit", seed=6, overwrite=True))
    assert again.image == done.image and again.image.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.json", "edit.png"]


def test_requests_round_trip_and_refuse_video_fields():
    r = EditRequest(image="a.png", prompt="x", preset="kisekaeichi", controls=(EditControl("b.png", 10, "m.png"),))
    d = r.to_json_dict()
    assert d["kind"] == "edit" and "seconds" not in d and d["controls"] == [{"image": "b.png", "index": 10,
                                                                              "mask": "m.png"}]
    assert request_from_json(json.loads(json.dumps(d))) == r
    assert isinstance(request_from_json(GenerationRequest(prompt="x").to_json_dict()), GenerationRequest)
    with pytest.raises(RequestError, match=r"\['crf', 'seconds'\] do not apply to a frame edit"):
        request_from_json({**d, "seconds": 3, "crf": 20})
    with pytest.raises(RequestError, match="unknown job kind 'song'"):
        request_from_json({"kind": "song"})
    assert r.layout() == FrameLayout(1, (0, 10), post=False, x2=False, x4=False)
    assert EditRequest(image="a", prompt="x", no_2x=True).layout() == FrameLayout(9, (0,), x2=False)
    assert EditRequest(image="a", prompt="x", window=5).layout().target == 5
    # controls beyond the preset's indices follow the last one
    many = EditRequest(image="a", prompt="x", preset="multi-control", controls=(EditControl("b"), EditControl("c")))
    assert many.layout().controls == (0, 1, 2)


def test_control_flag_parsing():
    assert parse_control("ref.png") == EditControl("ref.png")
    assert parse_control("ref.png@10") == EditControl("ref.png", 10)
    assert parse_control("/tmp/ref.png@10:/tmp/mask.png") == EditControl("/tmp/ref.png", 10, "/tmp/mask.png")
    assert parse_control("/tmp/ref.png:/tmp/mask.png") == EditControl("/tmp/ref.png", None, "/tmp/mask.png")
    assert parse_control(r"C:\in\ref.png@3:D:\m.png") == EditControl(r"C:\in\ref.png", 3, r"D:\m.png")
    with pytest.raises(RequestError, match="--control takes IMG"):
        parse_control("x.png:y.png:z.png")


def test_one_frame_schedule_contract():
    s = OneFrameSchedule(9)
    assert s.section_latents == 1 and s.frames(1) == 1 and s.overlap() == 0 and len(s.sections_for(30)) == 1
    with pytest.raises(ScheduleError):
        s.sections(2)
    for call in (lambda: s.end_frame_section(1), lambda: s.anchor_section(1, 1), lambda: s.extend(0, [0], 1)):
        with pytest.raises(ScheduleError):
            call()
    errors, warnings = FrameLayout(9, (0, 0)).problems(9)
    assert errors == ["control 2 and control 1 are both at index 0; move one of them"] and not warnings


def test_cli_switches_override_the_preset(pipe, pictures, tmp_path):
    out = tmp_path / "mc.png"
    args = ["edit", "--model", "tiny", "--image", str(pictures / "start.png"), "--prompt", "x", "--steps", "1",
            "--preset", "multi-control", "--control", str(pictures / "ref.png"), "--with-2x", "--quiet",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    layout = json.loads(out.with_suffix(".json").read_text())["layout"]
    assert layout["2x context"] == [11, 12] and "4x context" not in layout and layout["control 2"] == [1]
