"""Branching (framepack.branching, framepack.checkpoints): a video started from another's state after K
sections. Checked against the parent itself (same seed and settings -> the same file), against a
spy on what the transformer receives, and against the histories the parent's run really had."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_same_file
from PIL import Image

from framepack import pipeline as pipeline_mod
from framepack.branching import find_parent, plan_branch, prepare, section_table
from framepack.checkpoints import CheckpointError, KeepPolicy, SectionStore, sections_dir
from framepack.config import GenerationRequest, RequestError
from framepack.events import StageStarted, StepProgress
from framepack.pipeline import load_pipeline
from framepack.sections import overlap_frames
from framepack.video import probe, read_frames

SECTION_S = 1.2  # window 9: 36 frames


@pytest.fixture(scope="module")
def env(tmp_path_factory, home):
    img = tmp_path_factory.mktemp("img") / "in.png"
    x = np.zeros((64, 64, 3), np.uint8)
    x[16:40, 10:30] = (200, 60, 60)
    Image.fromarray(x).save(img)
    return {m: load_pipeline(m, device="cpu") for m in ("tiny", "tiny-f1")}, str(img)


def _request(img, out, sections=4, **kw) -> GenerationRequest:
    return GenerationRequest(image=img, prompt="a red box", steps=2, seconds=sections * SECTION_S, output=str(out),
                             **kw)  # fmt: skip


def _branch(pipe, parent_video, at, changes, out, *, keep="all", events=None):
    """What `framepack branch` does: plan, prepare a resume state, generate from it."""
    parent = find_parent(parent_video)
    plan = plan_branch(parent, at, {**changes, "output": str(out)}, pipe.spec)
    state = out.parent / f".{out.stem}.state"
    prepare(plan, state, out, keep=KeepPolicy.parse(keep))
    return pipe.generate(plan.request, events.append if events is not None else None, state_dir=state,
                         checkpoints=keep), plan  # fmt: skip


@pytest.fixture(scope="module")
def parents(env, tmp_path_factory):
    """One 5-section parent per schedule (the original needs 5 for its [3, 2, 2, 1, 0] padding)."""
    pipes, img = env
    folder = tmp_path_factory.mktemp("parents")
    return {m: pipes[m].generate(_request(img, folder / f"{m}.mp4", sections=5)) for m in pipes}


@pytest.mark.parametrize("model", ["tiny", "tiny-f1"])
def test_a_branch_with_the_parents_settings_remakes_the_parent_file(env, parents, tmp_path, model):
    pipes, _ = env
    parent = parents[model]
    for at in (0, 2, 4):
        events: list = []
        result, plan = _branch(pipes[model], parent.video, at, {}, tmp_path / f"b{at}.mp4", events=events)
        assert plan.changed == {} and result.status == "finished"
        assert_same_file(result.video, parent.video)  # byte for byte, its copied packets and the new ones
        sampled = sorted({e.section for e in events if isinstance(e, StepProgress)})
        assert sampled == list(range(at, 5))  # no step of sections 1..K is computed again


@pytest.mark.parametrize("model", ["tiny", "tiny-f1"])
def test_a_new_seed_keeps_the_shared_frames_and_changes_the_rest(env, parents, tmp_path, model):
    pipes, _ = env
    parent, at = parents[model], 2
    result, _ = _branch(pipes[model], parent.video, at, {"seed": 99}, tmp_path / "b.mp4")
    a, b = read_frames(parent.video), read_frames(result.video)
    assert a.shape == b.shape
    kept = 36 * at + (1 if model == "tiny-f1" else 0) - overlap_frames(9)  # final after K sections, minus the edge
    # F1 keeps the beginning; the original (back to front) keeps the end: the mirror statement.
    shared = slice(0, kept) if model == "tiny-f1" else slice(len(a) - kept, len(a))
    rest = slice(kept + overlap_frames(9), len(a)) if model == "tiny-f1" else slice(0, len(a) - kept - 33)
    assert np.array_equal(a[shared], b[shared])
    assert np.abs(a[rest].astype(int) - b[rest].astype(int)).mean() > 1.0  # remade with other noise
    meta = json.loads(result.metadata.read_text())
    assert meta["branch"]["at"] == at and meta["branch"]["changed"] == {"seed": [31337, 99]}
    assert meta["branch"]["parent"] == str(parent.video) and meta["request"]["seed"] == 99
    assert meta["branch"]["reseed"] == {"2": 99}  # the noise restarts from the new seed at the branch point


def test_a_prompt_change_reaches_the_transformer_from_section_k_plus_1_on(env, parents, tmp_path, monkeypatch):
    pipes, _ = env
    pipe, parent, at = pipes["tiny-f1"], parents["tiny-f1"], 3
    new = "a blue ball bounces"
    old_emb, new_emb = (pipe.c.encode_prompt(p).llama.to(pipe.c.transformer.dtype).float() for p in ("a red box", new))
    seen: list[tuple[int, torch.Tensor]] = []
    section = {"now": None}
    real = pipe.c.transformer.forward

    def spy(*args, **kw):
        seen.append((section["now"], kw["encoder_hidden_states"].float().clone()))
        return real(*args, **kw)

    def events(e):
        if isinstance(e, StageStarted) and e.stage == "sampling":
            section["now"] = e.section

    monkeypatch.setattr(pipe.c.transformer, "forward", spy)
    out = tmp_path / "b.mp4"
    plan = plan_branch(find_parent(parent.video), at, {"prompt": new, "output": str(out)}, pipe.spec)
    prepare(plan, tmp_path / "state", out)
    result = pipe.generate(plan.request, events, state_dir=tmp_path / "state")
    assert {s for s, _ in seen} == {3, 4}  # only the sections after K run the transformer
    n = new_emb.shape[1]
    for _, states in seen:
        assert torch.equal(states[:, :n], new_emb) and not torch.equal(states[:, : old_emb.shape[1]], old_emb)
    kept = 36 * at + 1 - 33
    assert np.array_equal(read_frames(parent.video)[:kept], read_frames(result.video)[:kept])


def test_checkpoints_hold_the_histories_the_run_had_and_prune_by_policy(env, tmp_path, monkeypatch):
    pipes, img = env
    pipe = pipes["tiny"]
    histories = []
    real = pipeline_mod.JobRun.section

    def record(self, section):
        real(self, section)
        histories.append((self.history, self.rng.get_state()))

    monkeypatch.setattr(pipeline_mod.JobRun, "section", record)
    full = pipe.generate(_request(img, tmp_path / "all.mp4", sections=5))
    store = SectionStore.open(sections_dir(full.video))
    assert list(store.kept) == [0, 1, 2, 3, 4, 5]
    for k, (history, rng) in enumerate(histories, 1):
        cp = store.load(k)
        assert torch.equal(cp.history.latents, history.latents) and torch.equal(cp.history.start, history.start)
        assert cp.history.total == history.total and torch.equal(cp.rng_state, rng)
    delta = (store.folder / "section-0003.safetensors").stat().st_size
    assert delta < 4 * 16 * 9 * 8 * 8 + 10_000  # one section's latents (fp32, window 9, 8x8) and the RNG state
    histories.clear()
    last2 = pipe.generate(_request(img, tmp_path / "last2.mp4", sections=5), checkpoints=2)
    store = SectionStore.open(sections_dir(last2.video))
    assert list(store.kept) == [4, 5] and sorted(p.name for p in store.folder.glob("section-*")) == [
        "section-0005.safetensors"]  # fmt: skip
    assert torch.equal(store.load(4).history.latents, histories[3][0].latents)
    with pytest.raises(CheckpointError, match="pruned: this job keeps the last 2"):
        store.load(2)
    none = pipe.generate(_request(img, tmp_path / "none.mp4", sections=2), checkpoints="none")
    assert not sections_dir(none.video).exists()
    with pytest.raises(CheckpointError, match="has no section checkpoints"):
        find_parent(none.metadata)
    for bad in ("some", -1, 1.5):
        with pytest.raises(RequestError, match="'all', 'none' or a number"):
            KeepPolicy.parse(bad)


def test_continue_f1_grows_forward_and_the_original_keeps_its_end(env, parents, tmp_path):
    pipes, _ = env
    # F1: the whole parent is kept; the video is longer and begins with the parent's frames
    result, plan = _branch(pipes["tiny-f1"], parents["tiny-f1"].video, "last", {"seconds": 7 * SECTION_S},
                           tmp_path / "f1.mp4")  # fmt: skip
    assert plan.at == 5 and result.sections == 7 and probe(result.video)["frames"] == 36 * 7 + 1
    a, b = read_frames(parents["tiny-f1"].video), read_frames(result.video)
    assert np.array_equal(a[: len(a) - 33], b[: len(a) - 33])
    # original: back to front, and the RoPE padding of the last two sections depends on the length,
    # so a longer video keeps the parent's first 3 generated sections: the end of the video
    result, plan = _branch(pipes["tiny"], parents["tiny"].video, "last", {"seconds": 7 * SECTION_S},
                           tmp_path / "orig.mp4")  # fmt: skip
    assert plan.at == 3 and result.sections == 7
    a, b = read_frames(parents["tiny"].video), read_frames(result.video)
    tail = 36 * 3 - 33
    assert len(b) == 36 * 7 + 1 and np.array_equal(a[-tail:], b[-tail:])
    with pytest.raises(RequestError, match=r"back to front.*at most 3"):
        plan_branch(find_parent(parents["tiny"].video), 4, {"seconds": 7 * SECTION_S}, pipes["tiny"].spec)


def test_a_branch_of_a_branch_and_a_deleted_parent(env, parents, tmp_path):
    pipes, _ = env
    pipe = pipes["tiny-f1"]
    first_dir = tmp_path / "p"
    first_dir.mkdir()
    parent = first_dir / "p.mp4"
    shutil.copy(parents["tiny-f1"].video, parent)
    shutil.copytree(sections_dir(parents["tiny-f1"].video), sections_dir(parent))
    child, _ = _branch(pipe, parent, 2, {"seed": 5}, tmp_path / "child.mp4")
    grandchild, _ = _branch(pipe, child.video, 3, {"prompt": "a red box turns"}, tmp_path / "grand.mp4")
    meta = json.loads(grandchild.metadata.read_text())
    assert meta["branch"]["at"] == 3 and meta["branch"]["parent_branch"]["changed"] == {"seed": [31337, 5]}
    a, c = read_frames(child.video), read_frames(grandchild.video)
    assert np.array_equal(a[: 36 * 3 + 1 - 33], c[: 36 * 3 + 1 - 33])
    shutil.rmtree(first_dir)  # the parent and its checkpoints are gone: the children are whole
    for video in (child.video, grandchild.video):
        assert probe(video)["frames"] == 36 * 5 + 1 and len(read_frames(video)) == 36 * 5 + 1
    again, _ = _branch(pipe, child.video, 1, {}, tmp_path / "again.mp4")  # the child's own checkpoints 0..2
    assert_same_file(again.video, child.video)


def test_bad_branches_get_clear_errors(env, parents, tmp_path):
    pipes, _ = env
    spec = pipes["tiny-f1"].spec
    parent = find_parent(parents["tiny-f1"].metadata)  # a sidecar names its video
    with pytest.raises(RequestError, match="--at must be a number of finished sections from 0 to 5"):
        plan_branch(parent, 6, {}, spec)
    with pytest.raises(RequestError, match="must make at least one more"):
        plan_branch(parent, 5, {}, spec)
    for field, value in (("window", 5), ("resolution", 320), ("image", "x.png"), ("crf", 20)):
        with pytest.raises(RequestError, match=rf"{field} cannot change at a branch.*can change: seed, prompt"):
            plan_branch(parent, 1, {field: value}, spec)
    with pytest.raises(RequestError, match="made with model 'tiny-f1'"):
        plan_branch(parent, 1, {}, pipes["tiny"].spec)
    with pytest.raises(RequestError, match="steps must be a number"):
        plan_branch(parent, 1, {"steps": 0}, spec)
    copy = tmp_path / "gone.mp4"
    shutil.copy(parents["tiny-f1"].video, copy)
    with pytest.raises(CheckpointError, match="has no section checkpoints"):
        find_parent(copy)
    shutil.copytree(sections_dir(parents["tiny-f1"].video), sections_dir(copy))
    with open(copy, "ab") as f:  # edited since: the checkpoints no longer describe it
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="not the file its checkpoints describe"):
        find_parent(copy)
    copy.unlink()
    with pytest.raises(RequestError, match="no such file"):
        find_parent(copy)


def test_section_table_locates_each_section_in_the_video(parents):
    for model, parent in parents.items():
        rows = section_table(SectionStore.open(sections_dir(parent.video)), probe(parent.video)["frames"])
        assert [r["section"] for r in rows] == [1, 2, 3, 4, 5] and all(r["reroll"] and r["after"] for r in rows)
        spans = sorted(r["frames"] for r in rows)
        assert spans == [[0, 36], [37, 72], [73, 108], [109, 144], [145, 180]]  # 36N+1 frames, hand-computed
        first = rows[0]["frames"]  # generation section 1: F1's start, the original's end
        assert first == ([0, 36] if model == "tiny-f1" else [145, 180])


@pytest.mark.parametrize("case", ["f1-extend", "original-extend", "t2v-f1", "t2v-original", "end-and-keyframe"])
def test_branches_of_every_kind_of_input_remake_their_parent(env, tmp_path, case):
    """Input videos (F1 continues one: its first section cross-fades with the input's tail, which a
    branch after section 1 must replay), text-to-video (a generated start frame) and anchors."""
    pipes, img = env
    end = tmp_path / "end.png"
    y = np.zeros((64, 64, 3), np.uint8)
    y[30:50, 30:50] = (60, 200, 60)
    Image.fromarray(y).save(end)
    model = "tiny-f1" if case in ("f1-extend", "t2v-f1") else "tiny"
    fields = {"image": img}
    if case.endswith("extend"):
        source = pipes["tiny-f1"].generate(_request(img, tmp_path / "src.mp4", sections=2))
        fields = {"image": None, "video": str(source.video), "video_context_frames": 19}
    elif case.startswith("t2v"):
        fields = {"image": None}
    elif case == "end-and-keyframe":
        fields = {"image": img, "end_image": str(end), "keyframes": ((1.2, str(end)),)}
    request = GenerationRequest(**{**_request(img, tmp_path / "p.mp4", sections=2).__dict__, **fields})
    parent = pipes[model].generate(request)
    result, _ = _branch(pipes[model], parent.video, 1, {}, tmp_path / "b1.mp4")
    assert_same_file(result.video, parent.video)
