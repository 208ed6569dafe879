"""The job layer's seams (framepack/jobs/): a runner is a protocol the dispatcher hands claimed jobs to,
per-job options reach the engine as arguments, and the parts (store, event log) work on their own."""

from __future__ import annotations

import threading

import pytest
from apphelpers import FAST, home, png_bytes, tiny_loader

from framepack.events import StageStarted, StepProgress
from framepack.jobs import JobQueue, RunOutcome
from framepack.jobs.eventlog import EventLog
from framepack.jobs.store import JobStore


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FRAMEPACK_HOME", home(tmp_path_factory))


class ScriptedRunner:
    """A runner that reports two events and ends as told, recording what it was handed."""

    def __init__(self, outcome: RunOutcome) -> None:
        self.outcome, self.seen = outcome, []

    def run(self, job, folder, on_event, token, *, interrupting):
        self.seen.append((job.id, folder.name, job.model))
        on_event(StageStarted("sampling", 0, 2))
        on_event(StepProgress(0, 2, 1, 4, 0))
        return self.outcome


def test_a_runner_plugs_in_behind_the_protocol(tmp_path):
    runner = ScriptedRunner(RunOutcome("done", None, {"frames": 73}, files=False))
    with JobQueue(tmp_path, loader=tiny_loader, models=["tiny"], runner=runner) as q:
        job = q.wait(q.submit(png_bytes(), FAST).id, 30)
        assert job.state == "done" and job.result == {"frames": 73} and runner.seen == [(job.id, job.id, "tiny")]
        kinds = [e["type"] if e["type"] != "state" else e["state"] for e in q.events(job.id)]
        assert kinds == ["queued", "running", "stage", "step", "done"]
        assert job.progress["step"] == 1 and job.progress["steps"] == 4  # the live progress was stored
    runner = ScriptedRunner(RunOutcome("failed", "it broke", files=False))
    with JobQueue(tmp_path, loader=tiny_loader, models=["tiny"], runner=runner) as q:
        job = q.wait(q.submit(png_bytes(), FAST).id, 30)
        assert job.state == "failed" and job.error == "it broke" and job.resumable


def test_per_job_options_reach_the_engine_as_arguments(tmp_path, monkeypatch):
    pipe = tiny_loader("tiny")
    seen = []
    real = type(pipe.c).plan_job

    def spy(self, **kw):
        seen.append((kw.get("preserved_memory_gb"), self.options.preserved_memory_gb))
        return real(self, **kw)

    monkeypatch.setattr(type(pipe.c), "plan_job", spy)
    before = pipe.c.options
    with JobQueue(tmp_path, loader=tiny_loader, models=["tiny"]) as q:
        job = q.wait(q.submit(png_bytes(), FAST, options={"preserved_memory_gb": 3.5}).id, 120)
        assert job.state == "done", job.error
        other = q.wait(q.submit(png_bytes(), FAST).id, 120)
        assert other.state == "done", other.error
    assert seen == [(3.5, before.preserved_memory_gb), (None, before.preserved_memory_gb)]
    assert pipe.c.options is before  # never swapped


def test_the_store_and_the_event_log_on_their_own(tmp_path):
    lock = threading.RLock()
    log = EventLog(lock)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    store = JobStore(tmp_path, jobs, default_model="tiny", lock=lock, live=log.live)
    folders = [store.new_folder() for _ in range(3)]
    for folder in folders:
        store.insert(folder.name, "tiny", {"prompt": "x"}, {}, None)
    ids = [f.name for f in folders]
    assert store.queued_ids() == ids and [j.position for j in store.list()] == [0, 1, 2]
    store.requeue([ids[2], ids[0], ids[1]])
    assert store.queued_ids() == [ids[2], ids[0], ids[1]]
    claimed = store.claim(lambda job_id: True)
    assert claimed.id == ids[2] and claimed.state == "running"
    assert store.claim(lambda job_id: False) is None and store.queued_ids() == [ids[0], ids[1]]
    log.started(claimed.id, "video")
    log.record(claimed.id, StepProgress(0, 1, 2, 4, 0), lambda job_id, progress: None)
    assert store.get(claimed.id).progress["step"] == 2  # the live progress shows through the store
    seqs = [log.emit(ids[0], {"type": "state", "state": "queued"}) for _ in range(3)]
    assert seqs == sorted(seqs) and [e["seq"] for e in log.events(ids[0], seqs[0], lambda: None)] == seqs[1:]
    store.finish(claimed.id, {"state": "done", "finished": 1.0, "result": {"frames": 9}})
    assert store.get(claimed.id).result == {"frames": 9} and store.counts() == {"done": 1, "queued": 2}
    store.close()
