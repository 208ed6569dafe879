"""Resumable jobs: a crash after section k, then a resume, gives the uninterrupted run's latents and video."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_same_file
from PIL import Image

from framepack import vae as vae_mod
from framepack.config import GenerationRequest
from framepack.events import CancelToken, SectionDone
from framepack.pipeline import load_pipeline
from framepack.video import probe, read_frames


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FRAMEPACK_HOME", str(tmp_path_factory.getbasetemp() / "framepack-home-resume"))
    img = tmp_path_factory.mktemp("img") / "in.png"
    x = np.zeros((64, 64, 3), np.uint8)
    x[16:40, 10:30] = (200, 60, 60)
    Image.fromarray(x).save(img)
    try:
        yield {m: load_pipeline(m, device="cpu") for m in ("tiny", "tiny-f1")}, str(img)
    finally:
        mp.undo()


class Crash(Exception):
    pass


def _spy(monkeypatch):
    seen = []
    real = vae_mod.decode
    monkeypatch.setattr(vae_mod, "decode", lambda m, z, **kw: seen.append(z.clone()) or real(m, z, **kw))
    return seen


@pytest.mark.parametrize("model", ["tiny", "tiny-f1"])
def test_crash_then_resume_equals_uninterrupted(env, tmp_path, monkeypatch, model):
    pipes, img = env
    req = GenerationRequest(image=img, prompt="a red box", steps=3, seconds=4 * 1.2, output=str(tmp_path / "full"))
    seen = _spy(monkeypatch)
    full = pipes[model].generate(req)
    expected = list(seen)
    seen.clear()

    req2 = GenerationRequest(**{**req.to_json_dict(), "output": str(tmp_path / "resumed")})
    state = tmp_path / "state"

    def crash_after_two(e):
        if isinstance(e, SectionDone) and e.section == 1:
            raise Crash("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        pipes[model].generate(req2, crash_after_two, state_dir=state)
    assert json.loads((state / "state.json").read_text())["sections_done"] == 2
    (partial,) = (tmp_path / "resumed").glob("*.mp4")
    assert probe(partial)["frames"] > 0  # the snapshot of the finished sections is playable
    first = list(seen)
    seen.clear()
    resumed = pipes[model].generate(req2, state_dir=state)  # a new process would do the same
    assert resumed.status == "finished" and resumed.video == partial and not state.exists()
    # latents decoded: sections 1-2 before the crash, the last one again (the edge), then 3-4
    assert len(first) == 2 and len(seen) == 3 and torch.equal(seen[0], first[1])
    got = first + seen[1:]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert read_frames(full.video).shape[0] == 36 * 4 + 1
    assert_same_file(full.video, resumed.video)  # resumed after a crash: the uninterrupted run's bytes


def test_cancelled_resumable_job_keeps_its_state(env, tmp_path):
    pipes, img = env
    req = GenerationRequest(image=img, prompt="a red box", steps=2, seconds=3 * 1.2, output=str(tmp_path))
    cancel = CancelToken()
    state = tmp_path / "state"
    r = pipes["tiny-f1"].generate(
        req, lambda e: isinstance(e, SectionDone) and cancel.cancel(), cancel, state_dir=state
    )
    assert r.status == "cancelled" and r.sections_done == 1 and probe(r.video)["frames"] == 37
    done = pipes["tiny-f1"].generate(req, state_dir=state)
    assert done.status == "finished" and done.frames == 109 and probe(done.video)["frames"] == 109


def test_resume_checks_the_request(env, tmp_path):
    pipes, img = env
    req = GenerationRequest(image=img, prompt="a red box", steps=2, seconds=2 * 1.2, output=str(tmp_path))
    state = tmp_path / "state"
    with pytest.raises(RuntimeError):
        pipes["tiny"].generate(req, lambda e: isinstance(e, SectionDone) and 1 / 0, state_dir=state)
    other = GenerationRequest(**{**req.to_json_dict(), "seed": 1})
    with pytest.raises(ValueError, match="holds a different job's state"):
        pipes["tiny"].generate(other, state_dir=state)
    with pytest.raises(ValueError, match="holds a different job's state"):
        pipes["tiny-f1"].generate(req, state_dir=state)
    (state / "history.safetensors").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="saved state is missing or damaged"):
        pipes["tiny"].generate(req, state_dir=state)


def test_a_resumable_job_whose_finished_file_could_not_be_written_resumes(env, tmp_path, monkeypatch):
    """A full disk while the finished MP4 is joined: the job fails, but its state and segments stay, so
    a resume (with space again) only joins the file: the same bytes as a run that never failed."""
    import errno

    from conftest import assert_same_file

    from framepack.pipeline import GenerationFailed
    from framepack.video import SectionVideoWriter

    pipes, img = env
    req = GenerationRequest(image=img, prompt="a red box", steps=2, seconds=2 * 1.2, output=str(tmp_path / "a"))
    reference = pipes["tiny"].generate(req)
    real = SectionVideoWriter._join

    def full(self, segments, dest, *, faststart):
        if faststart:
            raise OSError(errno.ENOSPC, "No space left on device", str(dest))
        return real(self, segments, dest, faststart=faststart)

    state = tmp_path / "state"
    req2 = GenerationRequest(**{**req.to_json_dict(), "output": str(tmp_path / "b")})
    monkeypatch.setattr(SectionVideoWriter, "_join", full)
    with pytest.raises(GenerationFailed) as failed:
        pipes["tiny"].generate(req2, state_dir=state)
    assert isinstance(failed.value.__cause__, OSError) and failed.value.result.frames == probe(
        failed.value.result.video)["frames"] == 73  # fmt: skip
    monkeypatch.setattr(SectionVideoWriter, "_join", real)
    done = pipes["tiny"].generate(req2, state_dir=state)
    assert done.status == "finished" and not state.exists()
    assert_same_file(reference.video, done.video)
