"""The job layer: persistent queue, one worker, states, resume, reorder, and damage that is reported,
never fatal (framepack/jobs.py), on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import typing

import pytest
from apphelpers import FAST, cancel_after_first_section, png_bytes, tiny_loader

from framepack.config import GenerationRequest, RequestError
from framepack.images import ImageError
from framepack.jobs import SERVER_FIELDS, FileAccessError, JobConflict, JobError, JobNotFound, JobQueue
from framepack.video import probe

pytestmark = pytest.mark.usefixtures("app_env")  # FRAMEPACK_HOME: the app tests' shared one (conftest)


def _queue(path, worker: bool = True) -> JobQueue:
    return JobQueue(path, loader=tiny_loader, models=["tiny", "tiny-f1"], start_worker=worker)


def test_job_runs_to_done_with_files_events_and_record(tmp_path):
    with _queue(tmp_path) as q:
        job = q.submit(png_bytes(), FAST)
        assert job.state == "queued" and job.model == "tiny" and job.params()["steps"] == 2
        done = q.wait(job.id, 120)
        assert done.state == "done", done.error
        video = q.job_file(job.id, "video")
        assert probe(video)["frames"] == done.result["frames"] == 37
        sidecar = json.loads(q.job_file(job.id, "metadata").read_text())
        assert sidecar["status"] == "finished" and sidecar["request"]["steps"] == 2
        assert done.result["peak_rss_bytes"] > 0 and "peak_vram_bytes" in done.result
        events = q.events(job.id)
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        kinds = [e["type"] if e["type"] != "state" else e["state"] for e in events]
        assert kinds[:2] == ["queued", "running"] and kinds[-1] == "done"
        assert kinds.index("step") < kinds.index("section") < kinds.index("done")
        record = json.loads((q.jobs_dir / job.id / "job.json").read_text())
        assert record["state"] == "done" and record["request"]["prompt"] == FAST["prompt"]
        assert not (q.jobs_dir / job.id / "state").exists()  # resume state is removed when a job finishes


def test_queue_operations_without_a_worker(tmp_path):
    with _queue(tmp_path, worker=False) as q:
        a, b, c = (q.submit(png_bytes(seed=i), {**FAST, "seed": i}) for i in range(3))
        assert [j.id for j in q.list()] == [a.id, b.id, c.id] and q.get(c.id).position == 2
        q.move(c.id, 0)
        assert [j.id for j in q.list(["queued"])] == [c.id, a.id, b.id]
        q.move(c.id, 99)  # clamped to the end
        assert [j.id for j in q.list(["queued"])] == [a.id, b.id, c.id]
        assert q.cancel(a.id).state == "cancelled"
        with pytest.raises(JobConflict, match="only queued or running"):
            q.cancel(a.id)
        with pytest.raises(JobConflict, match="only queued jobs can be reordered"):
            q.move(a.id, 0)
        with pytest.raises(JobConflict, match=r"only .* jobs resume"):
            q.resume(b.id)  # a queued job is not resumable
        resumed = q.resume(a.id)  # a cancelled job goes back to the end of the queue
        assert resumed.state == "queued" and resumed.position == 2
        q.delete(b.id)
        assert not (q.jobs_dir / b.id).exists()
        with pytest.raises(JobNotFound):
            q.get(b.id)
        rerun = q.rerun(c.id, {"seed": 7, "steps": 3}, model="tiny-f1")
        assert rerun.parent == c.id and rerun.model == "tiny-f1"
        assert rerun.params() == {**c.params(), "seed": 7, "steps": 3}
        assert (q.jobs_dir / rerun.id / "input.png").read_bytes() == (q.jobs_dir / c.id / "input.png").read_bytes()
        assert len(q.list()) == 3


def test_bad_submissions_are_refused_with_their_reason(tmp_path):
    with _queue(tmp_path, worker=False) as q:
        with pytest.raises(RequestError, match=r"steps must be a number in 1\.\.100.*crf"):
            q.submit(png_bytes(), {**FAST, "steps": 0, "crf": 99})
        with pytest.raises(RequestError, match="unknown request fields"):
            q.submit(png_bytes(), {**FAST, "colour": "red"})
        with pytest.raises(RequestError, match="cannot be given as parameters"):
            q.submit(png_bytes(), {**FAST, "output": "/etc/cron.d/x.mp4"})
        with pytest.raises(RequestError, match="model must be one of tiny, tiny-f1"):
            q.submit(png_bytes(), FAST, model="original")
        with pytest.raises(ImageError):
            q.submit(b"not an image at all", FAST)
        with pytest.raises(ImageError):
            q.submit(png_bytes()[:60], FAST)  # truncated PNG
        with pytest.raises(JobNotFound):
            q.get("../../etc")
        assert q.list() == [] and list(q.jobs_dir.iterdir()) == []  # nothing half-created


def test_file_access_stays_inside_the_job_folders(tmp_path):
    (tmp_path / "secret.txt").write_text("x")
    with _queue(tmp_path / "out", worker=False) as q:
        job = q.submit(png_bytes(), FAST)
        assert q.file(f"{job.id}/input.png").is_file()
        (q.jobs_dir / job.id / "escape").symlink_to(tmp_path / "secret.txt")
        for bad in ("../jobs.sqlite3", "/etc/passwd", f"{job.id}/../../jobs.sqlite3", f"{job.id}/escape",
                    "a\\..\\b", ""):  # fmt: skip
            with pytest.raises(FileAccessError):
                q.file(bad)
        with pytest.raises(JobNotFound):
            q.file(f"{job.id}/nothing.mp4")


def test_cancel_running_keeps_a_playable_partial_video_then_resume_finishes(tmp_path):
    with _queue(tmp_path) as q:
        job = q.submit(png_bytes(), {**FAST, "seconds": 2 * 1.2})
        cancel_after_first_section(q, job.id)
        cancelled = q.wait(job.id, 60)
        assert cancelled.state == "cancelled" and cancelled.resumable
        assert 0 < probe(q.job_file(job.id, "video"))["frames"] < 73  # the finished section, playable
        q.resume(job.id)
        done = q.wait(job.id, 120)
        assert done.state == "done" and probe(q.job_file(job.id, "video"))["frames"] == 73


def test_restart_interrupts_running_jobs_and_reports_damage(tmp_path):
    with _queue(tmp_path, worker=False) as q:
        ids = [q.submit(png_bytes(seed=i), FAST).id for i in range(4)]
    running, damaged, gone, fine = ids
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    with db:
        db.execute("UPDATE jobs SET state = 'running' WHERE id = ?", (running,))  # the process died mid-job
        db.execute("UPDATE jobs SET request = '{not json' WHERE id = ?", (damaged,))
    db.close()
    import shutil

    shutil.rmtree(tmp_path / "jobs" / gone)
    stray = tmp_path / "jobs" / "stray_folder"
    stray.mkdir()
    (stray / "job.json").write_text("garbage")

    with _queue(tmp_path, worker=False) as q:
        states = {j.id: j for j in q.list()}
        assert states[running].state == "interrupted" and states[running].resumable
        assert states[damaged].state == "failed" and "record is damaged" in states[damaged].error
        assert states[gone].state == "failed" and "folder" in states[gone].error and "missing" in states[gone].error
        assert states[fine].state == "queued"
        assert states["stray_folder"].state == "failed" and "job.json" in states["stray_folder"].error
        text = "\n".join(q.problems)
        assert running in text or "were running" in text
        assert all(name in text for name in (damaged, gone, "stray_folder"))

    # A database that is not a database at all: moved aside, the queue rebuilt from the job.json files.
    (tmp_path / "jobs.sqlite3").write_bytes(b"this is not sqlite" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"jobs.sqlite3{suffix}").unlink(missing_ok=True)
    with _queue(tmp_path, worker=False) as q:
        assert any("damaged" in p for p in q.problems)
        rebuilt = {j.id: j.state for j in q.list()}
        assert rebuilt[fine] == "queued" and rebuilt[running] == "interrupted"
        assert list(tmp_path.glob("jobs.sqlite3.damaged-*"))


def test_queue_order_and_deletes_survive_a_database_rebuild(tmp_path):
    """A reordered queue keeps its order when the database is rebuilt from the job.json files, and a job
    whose folder is a symbolic link is really gone after a delete (the link, not what it points to)."""
    with _queue(tmp_path, worker=False) as q:
        a, b, c = (q.submit(png_bytes(seed=i), FAST).id for i in range(3))
        q.move(c, 0)
        elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
        (q.jobs_dir / b).rename(elsewhere)
        (q.jobs_dir / b).symlink_to(elsewhere, target_is_directory=True)
        q.delete(b)
        assert not (q.jobs_dir / b).exists() and (elsewhere / "input.png").is_file()
        assert [j.id for j in q.list(["queued"])] == [c, a]
    (tmp_path / "jobs.sqlite3").write_bytes(b"not a database" * 100)  # damaged: rebuilt from the records
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"jobs.sqlite3{suffix}").unlink(missing_ok=True)
    with _queue(tmp_path, worker=False) as q:
        assert [j.id for j in q.list(["queued"])] == [c, a]  # the move is kept; the deleted job stays deleted


def test_keyframes_of_the_wrong_kind_are_one_problem():
    from framepack.config import GenerationRequest

    with pytest.raises(RequestError) as err:
        GenerationRequest(prompt="x", keyframes="oops").validate()
    assert str(err.value).count("keyframes") == 1 and "must be a list of (seconds, image path) pairs" in str(err.value)


def test_one_queue_per_outputs_folder(tmp_path):
    with _queue(tmp_path, worker=False):
        with pytest.raises(JobError, match="already served"):
            _queue(tmp_path, worker=False)
    _queue(tmp_path, worker=False).close()  # released on close


def test_path_fields_are_server_owned():
    """A request field naming a file must never be settable by a client (it would read server files)."""
    hints = typing.get_type_hints(GenerationRequest)
    for f in dataclasses.fields(GenerationRequest):
        holds_text = "str" in str(hints[f.name])
        if holds_text and any(
            word in f.name for word in ("image", "video", "path", "keyframe", "output", "file", "dir")
        ):
            assert f.name in SERVER_FIELDS, f"{f.name} looks like a path: add it to framepack.jobs.SERVER_FIELDS"
