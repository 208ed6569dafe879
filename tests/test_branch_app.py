"""Branching through the front ends: `framepack branch` (a sidecar, a video, a queue job id), the queue
(branch, pause, sections, thumbnails; a deleted parent), and the HTTP API routes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from apphelpers import FAST, png_bytes, wait_until
from conftest import assert_same_file
from fastapi.testclient import TestClient
from PIL import Image

from framepack.app.api import create_app
from framepack.app.cli import main
from framepack.config import RequestError
from framepack.jobs import JobConflict
from framepack.video import probe, read_frames

pytestmark = pytest.mark.usefixtures("app_env")  # FRAMEPACK_HOME: the app tests' shared one (conftest)


def _video(queue, job):
    return queue.jobs_dir / job.id / "video.mp4"


def test_cli_branch_from_a_sidecar_and_from_a_queue_job(tmp_path, monkeypatch, capsys, queue):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.png").write_bytes(png_bytes())
    base = ["--quiet", "--steps", "2"]
    assert main(["generate", "--model", "tiny-f1", "--image", "in.png", "--prompt", "a box", "--seconds", "3.6",
                 "--out", "p.mp4", *base]) == 0  # fmt: skip
    assert (tmp_path / ".p.sections" / "index.json").is_file()
    assert main(["branch", "p.json", "--at", "2", *base]) == 0  # no change: the parent again
    assert_same_file(tmp_path / "p-b2.mp4", tmp_path / "p.mp4")
    err = capsys.readouterr().err
    assert "branch of p.mp4 after 2 of its 3 section(s): keeps its beginning" in err and "changed: nothing" in err
    assert main(["branch", "p.mp4", "--at", "1", "--seed", "3", "--seconds", "4.8", "--out", "c.mp4", *base]) == 0
    assert probe(tmp_path / "c.mp4")["frames"] == 36 * 4 + 1
    meta = json.loads((tmp_path / "c.json").read_text())
    assert meta["branch"]["changed"] == {"seed": [31337, 3], "seconds": [3.6, 4.8]}
    assert not list(tmp_path.glob(".*.branch"))  # the temporary resume state is gone
    for args, message in ((["--at", "7"], "from 0 to 3"), (["--at", "x"], "--at takes a number"),
                          (["--at", "1", "--window", "5"], "window cannot change at a branch"),
                          (["--at", "1", "--model", "tiny"], "model cannot change at a branch"),
                          (["--at", "1", "--checkpoints", "lots"], "'all', 'none' or a number"),
                          (["--at", "1", "--out", "p.mp4"], "already exist")):  # fmt: skip
        assert main(["branch", "p.json", *args, *base]) == 2
        assert message in capsys.readouterr().err
    # a queue job by id, with --outputs
    job = queue.wait(queue.submit(png_bytes(), {**FAST, "seconds": 2.4}, model="tiny").id, 120)
    assert main(["branch", job.id, "--outputs", str(queue.outputs), "--at", "1", "--out", "q.mp4", *base]) == 0
    assert_same_file(tmp_path / "q.mp4", _video(queue, job))
    assert main(["branch", "nojob", "--outputs", str(queue.outputs), "--at", "1", *base]) == 2
    assert "no such file" in capsys.readouterr().err


def test_queue_branches_survive_their_parent_and_pause_resumes(queue):
    parent = queue.wait(queue.submit(png_bytes(), {**FAST, "seconds": 3.6}, model="tiny-f1").id, 120)
    rows = queue.sections(parent.id)
    assert [r["section"] for r in rows] == [1, 2, 3] and [r["frames"] for r in rows] == [[0, 36], [37, 72], [73, 108]]
    jpeg = Image.open(io.BytesIO(queue.section_frame(parent.id, 2, "last")))
    assert jpeg.format == "JPEG" and jpeg.size == (64, 64)
    frames = read_frames(_video(queue, parent)).astype(int)
    error = {i: np.abs(np.asarray(jpeg).astype(int) - frames[i]).mean() for i in (0, 36, 37, 72, 73, 108)}
    assert min(error, key=error.get) == 72  # section 2's last frame, not another section's
    child = queue.wait(queue.branch(parent.id, 1, {"seed": 8}).id, 120)
    assert child.state == "done" and child.parent == parent.id
    assert child.branch["at"] == 1 and child.branch["changed"] == {"seed": [31337, 8]}
    assert json.loads((queue.jobs_dir / child.id / "job.json").read_text())["branch"]["parent"] == parent.id
    kept = read_frames(_video(queue, parent))[:37 - 33]
    assert np.array_equal(read_frames(_video(queue, child))[: len(kept)], kept)
    queue.delete(parent.id)
    assert len(read_frames(_video(queue, child))) == 109  # whole without its parent
    grandchild = queue.wait(queue.branch(child.id, "last", {"seconds": 4.8}).id, 120)
    assert grandchild.state == "done" and grandchild.result["sections"] == 4 and grandchild.branch["at"] == 3
    for bad, err in (({"window": 5}, RequestError), ({"image": "x"}, RequestError)):
        with pytest.raises(err, match="cannot change at a branch"):
            queue.branch(child.id, 1, bad)
    with pytest.raises(RequestError, match="from 0 to 3"):
        queue.branch(child.id, 4)
    # pause: stops after the running section, resumable, and the resumed video is the uninterrupted one's
    job = queue.submit(png_bytes(), {**FAST, "seconds": 4.8}, model="tiny-f1")
    with pytest.raises(JobConflict, match="only a running job can be paused"):
        queue.pause(grandchild.id)
    wait_until(lambda: queue.get(job.id).state == "running", 60, "the job to start")
    queue.pause(job.id)
    paused = queue.wait(job.id, 120)
    assert paused.state == "paused" and paused.resumable and 0 < paused.result["sections_done"] < 4
    assert "resume to continue" in paused.error
    done = queue.wait(queue.resume(job.id).id, 120)
    straight = queue.wait(queue.submit(png_bytes(), {**FAST, "seconds": 4.8}, model="tiny-f1").id, 120)
    assert done.state == "done"
    assert_same_file(_video(queue, done), _video(queue, straight))


def test_api_branch_pause_and_sections(queue):
    with TestClient(create_app(queue)) as client:
        parent = queue.wait(queue.submit(png_bytes(), {**FAST, "seconds": 2.4}, model="tiny").id, 120)
        rows = client.get(f"/api/jobs/{parent.id}/sections").json()
        assert [r["section"] for r in rows] == [1, 2] and rows[0]["frames"] == [37, 72]  # back to front: the end
        r = client.get(rows[0]["last"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert client.get(f"/api/jobs/{parent.id}/sections/9/last.jpg").status_code == 404
        r = client.post(f"/api/jobs/{parent.id}/branch", json={"at": 1, "params": {"prompt": "a blue box"}})
        assert r.status_code == 201, r.text
        info = r.json()
        assert info["parent"] == parent.id and info["branch"]["changed"] == {"prompt": [FAST["prompt"], "a blue box"]}
        assert queue.wait(info["id"], 120).state == "done"
        assert client.get(f"/api/jobs/{info['id']}").json()["branch"]["at"] == 1
        r = client.post(f"/api/jobs/{parent.id}/branch", json={"at": 1, "params": {"resolution": 320}})
        assert r.status_code == 422 and "resolution cannot change at a branch" in r.json()["detail"]
        assert client.post(f"/api/jobs/{parent.id}/branch", json={"at": "first"}).status_code == 422
        assert client.post(f"/api/jobs/{parent.id}/branch", json={"at": 1, "seed": 1}).status_code == 422
        r = client.post(f"/api/jobs/{parent.id}/pause")
        assert r.status_code == 409 and "only a running job" in r.json()["detail"]


def test_a_branch_needs_the_disk_space_of_its_video(queue, monkeypatch):
    import framepack.jobs.queue as queue_mod
    from framepack.jobs import StorageFull

    parent = queue.wait(queue.submit(png_bytes(), {**FAST, "seconds": 2.4}, model="tiny").id, 120)
    folders = sorted(p.name for p in queue.jobs_dir.iterdir())
    monkeypatch.setattr(queue_mod, "disk_free", lambda path: 1000)
    with pytest.raises(StorageFull, match="out of disk space"):
        queue.branch(parent.id, 1, {"seed": 2})
    assert sorted(p.name for p in queue.jobs_dir.iterdir()) == folders  # nothing half made
