"""A full disk under the job queue and the HTTP API, on a real 8 MB tmpfs filled up while a job runs.

What a user must see: the running job fails with a message saying how much space is free and needed
(never stuck in `running`), queued jobs wait instead of failing one after another, submissions get a
JSON 507, reads keep working, and everything goes on by itself once space is freed (the failed job
resumes from its last section).

The filesystem is real (SQLite's WAL, the MP4 segments and the resume state all hit ENOSPC as they
would on a user's disk), so the test mounts a tmpfs: CI runs as root on this machine (.ci/run installs
chromium with apt as well).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from apphelpers import FAST, home, png_bytes, tiny_loader, wait_until

from framepack.jobs import JobQueue, StorageFull


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"this test mounts a small tmpfs (needs root, as CI has): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder, leave: int) -> None:
    st = os.statvfs(folder)
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def test_full_disk_fails_the_job_clearly_and_the_queue_recovers(small_disk, tmp_path_factory, monkeypatch):
    from fastapi.testclient import TestClient

    from framepack.app.api import create_app

    monkeypatch.setenv("FRAMEPACK_HOME", home(tmp_path_factory))
    tiny_loader("tiny")  # loaded before the disk fills (the tiny family lives elsewhere anyway)
    with JobQueue(small_disk / "out", loader=tiny_loader, models=["tiny"]) as q:
        first = q.submit(png_bytes(), {**FAST, "seconds": 4 * 1.2})  # 4 sections
        second = q.submit(png_bytes(seed=1), {**FAST, "seed": 1})
        wait_until(lambda: q.get(first.id).progress.get("sections_done"), 60, "the first section")
        _fill(small_disk, leave=60_000)  # the next section cannot be written
        failed = q.wait(first.id, 60)
        assert failed.state == "failed" and failed.error.startswith("out of disk space in "), failed.error
        assert "MB free; this job needs about" in failed.error
        # the next job is not started into a full disk, and nothing is left "running"
        wait_until(lambda: q.storage_problem, 30, "the queue to report the disk")
        assert q.get(second.id).state == "queued" and not q.list(["running"])
        assert "queued jobs wait" in q.storage_problem

        client = TestClient(create_app(q))
        r = client.post("/api/jobs", files={"image": ("a.png", png_bytes(), "image/png")},
                        data={"params": json.dumps(FAST)})  # fmt: skip
        assert r.status_code == 507 and "out of disk space" in r.json()["detail"], r.text
        assert client.get("/api/jobs").status_code == 200  # reads go on
        assert client.get(f"/api/jobs/{first.id}").json()["state"] == "failed"
        assert client.get("/api/info").json()["storage"] == q.storage_problem
        with pytest.raises(StorageFull):
            q.submit(png_bytes(), FAST)

        (small_disk / "filler").unlink()  # space returns: the waiting job runs, the failed one resumes
        assert q.wait(second.id, 120).state == "done"
        q.resume(first.id)
        done = q.wait(first.id, 120)
        assert done.state == "done" and done.result["frames"] == 4 * 36 + 1
        assert q.storage_problem is None and q.counts() == {"done": 2}
