"""Faults: `kill -9` of the server in the middle of a job, then a restart. The queue and history are
intact, the job is `interrupted`, resuming completes it with the same video as an uninterrupted run
(same seed), and missing or damaged job folders are reported without stopping the server."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from apphelpers import FAST, ServerProcess, home, png_bytes, wait_until
from conftest import assert_same_file

from framepack.video import read_frames


def _submit(c: httpx.Client, params: dict) -> dict:
    r = c.post("/api/jobs", files={"image": ("in.png", png_bytes(), "image/png")}, data={"params": json.dumps(params)})
    assert r.status_code == 201, r.text
    return r.json()


def _wait_state(c: httpx.Client, job_id: str, states: set[str], timeout: float = 120) -> dict:
    return wait_until(lambda: (j := c.get(f"/api/jobs/{job_id}").json())["state"] in states and j, timeout,
                      f"job {job_id} to reach {states}", interval=0.1)  # fmt: skip


@pytest.mark.slow
def test_kill9_mid_job_restart_resume_equals_uninterrupted(tmp_path, tmp_path_factory):
    outputs = tmp_path / "outputs"
    server = ServerProcess(outputs, home(tmp_path_factory))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            finished = _submit(c, FAST)
            assert _wait_state(c, finished["id"], {"done", "failed"})["state"] == "done"
            long = _submit(c, {**FAST, "seconds": 2 * 1.2})  # 2 sections: killed after the first
            waiting = _submit(c, FAST)
            doomed = _submit(c, FAST)  # its folder will vanish while the server is down

            def first_section_done():
                j = c.get(f"/api/jobs/{long['id']}").json()
                assert j["state"] == "running" or j["state"] == "queued", j  # never finished before the kill
                return (j["progress"].get("sections_done") or 0) >= 1

            wait_until(first_section_done, 120, "the first section of the long job", interval=0.02)
        server.kill9()  # no shutdown code runs: the job is left 'running' in the database
    finally:
        server.stop()

    shutil.rmtree(outputs / "jobs" / doomed["id"])
    (outputs / "jobs" / "damaged_job").mkdir()
    (outputs / "jobs" / "damaged_job" / "job.json").write_text("{ not json")

    server = ServerProcess(outputs, home(tmp_path_factory))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            jobs = {j["id"]: j for j in c.get("/api/jobs").json()}
            assert jobs[finished["id"]]["state"] == "done"  # history intact
            assert c.get(f"/api/jobs/{finished['id']}/video").status_code == 200
            interrupted = jobs[long["id"]]
            assert interrupted["state"] == "interrupted" and interrupted["resumable"], interrupted
            assert jobs[doomed["id"]]["state"] == "failed" and "missing" in jobs[doomed["id"]]["error"]
            assert jobs["damaged_job"]["state"] == "failed" and "job.json" in jobs["damaged_job"]["error"]
            assert c.get("/api/info").status_code == 200  # the server is fine
            # The queued job survived the kill (and was started first); cancelled here to save time.
            assert jobs[waiting["id"]]["state"] in ("queued", "running", "done")
            c.post(f"/api/jobs/{waiting['id']}/cancel")
            assert c.post(f"/api/jobs/{long['id']}/resume").json()["state"] == "queued"
            resumed = _wait_state(c, long["id"], {"done", "failed", "cancelled"})
            assert resumed["state"] == "done" and resumed["result"]["frames"] == 73, resumed
            # The reference: the same image, parameters and seed, never interrupted.
            reference = c.post(f"/api/jobs/{long['id']}/rerun", json={}).json()
            assert _wait_state(c, reference["id"], {"done", "failed"})["state"] == "done"
            assert _wait_state(c, waiting["id"], {"done", "cancelled"})["state"] in ("done", "cancelled")
        a, b = (outputs / "jobs" / j["id"] / "video.mp4" for j in (long, reference))
        assert read_frames(a).shape[0] == 73
        assert_same_file(a, b)  # killed, restarted and resumed: the uninterrupted run's bytes
        assert "Traceback" not in server.log.read_text()
    finally:
        server.stop()
