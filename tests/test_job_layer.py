"""The job layer's seams (framepack/jobs/): a runner is a protocol the dispatcher hands claimed jobs to,
per-job options reach the engine as arguments, and the parts (store, event log) work on their own."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest
from apphelpers import FAST, cancel_after_first_section, home, png_bytes, tiny_loader, wait_until

from framepack.events import StageStarted, StepProgress
from framepack.jobs import DB_NAME, JobQueue, RunOutcome, shipping
from framepack.jobs.eventlog import EventLog
from framepack.jobs.store import JobStore

pytestmark = pytest.mark.usefixtures("app_env")  # FRAMEPACK_HOME: the app tests' shared one (conftest)


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
        from framepack.app.ui import workers_line

        assert workers_line(q) == "**Workers (1)**: this server: free"
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


class SlowRunner:
    """Holds each job until its gate opens (`open(job_id)`, or `open_all()`); records how many ran at
    once. `lose` job ids: the first run of each ends as if its worker died (RunOutcome "queued")."""

    slots = 2

    def __init__(self, lose=()):
        self.lock, self.running, self.most, self.order = threading.Lock(), 0, 0, []
        self.gates, self.all = {}, threading.Event()
        self.lose = set(lose)

    def gate(self, job_id):
        with self.lock:
            return self.gates.setdefault(job_id, threading.Event())

    def open_all(self):
        self.all.set()
        for g in list(self.gates.values()):
            g.set()

    def run(self, job, folder, on_event, token, *, interrupting):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.order.append(job.id)
        gate = self.gate(job.id)
        while not (gate.is_set() or self.all.is_set()):
            gate.wait(0.05)
        gate.clear()
        with self.lock:
            self.running -= 1
        if job.id in self.lose:
            self.lose.discard(job.id)
            return RunOutcome("queued", "worker w1 was lost")
        return RunOutcome("done", None, {}, files=False)


def test_a_runner_with_two_slots_runs_two_jobs_at_once_and_a_lost_run_goes_back_first(tmp_path):
    runner = SlowRunner()
    with JobQueue(tmp_path, loader=tiny_loader, models=["tiny"], runner=runner) as q:
        assert q.dispatcher.slots == 2
        ids = [q.submit(png_bytes(), FAST).id for _ in range(4)]
        wait_until(lambda: runner.running == 2, 20, "two jobs running")
        assert [j.state for j in map(q.get, ids)] == ["running", "running", "queued", "queued"]
        runner.lose = {ids[0]}
        runner.gate(ids[0]).set()  # the first job's worker is lost; the second still runs
        wait_until(lambda: len(runner.order) == 3, 20, "the next run")
        assert runner.order == [ids[0], ids[1], ids[0]]  # back at the front: it runs again before the others
        (back,) = [e for e in q.events(ids[0]) if e.get("requeued")]
        assert back["state"] == "queued" and back["requeued"] == "worker w1 was lost"
        runner.open_all()
        done = [q.wait(i, 30) for i in ids]
        assert [j.state for j in done] == ["done"] * 4 and runner.most == 2


@pytest.fixture(scope="module")
def two_sections(tmp_path_factory):
    """The tiny model's uninterrupted 2-section video for REQUEST, made once for the module."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    mp = pytest.MonkeyPatch()
    mp.setenv("FRAMEPACK_HOME", home(tmp_path_factory))
    with JobQueue(folder, loader=tiny_loader, models=["tiny"]) as q:
        job = q.wait(q.submit(png_bytes(seed=4), REQUEST).id, 120)
        assert job.state == "done", job.error
        video = q.job_file(job.id, "video").read_bytes()
    mp.undo()
    return video


REQUEST = {**FAST, "seconds": 3.0, "seed": 21}  # two sections


def _stopped_after_one_section(folder):
    with JobQueue(folder, loader=tiny_loader, models=["tiny"]) as q:
        job = q.submit(png_bytes(seed=4), REQUEST)
        cancel_after_first_section(q, job.id)
        assert q.wait(job.id, 60).state == "cancelled"
    return job.id


def test_a_head_restart_puts_the_jobs_that_were_running_back_in_the_queue(tmp_path, two_sections):
    job_id = _stopped_after_one_section(tmp_path)
    with sqlite3.connect(tmp_path / DB_NAME) as db:  # as a head killed mid-run leaves it
        db.execute("UPDATE jobs SET state = 'running', finished = NULL WHERE id = ?", (job_id,))
    with JobQueue(tmp_path, loader=tiny_loader, models=["tiny"], requeue_running=True) as q:
        assert any("back in the queue" in p for p in q.problems)
        done = q.wait(job_id, 120)
        assert done.state == "done", done.error
        assert q.job_file(job_id, "video").read_bytes() == two_sections
        assert [e["section"] for e in q.events(job_id) if e["type"] == "section"] == [1]  # only the second was made


def test_a_moved_outputs_folder_keeps_its_jobs_resumable(tmp_path, two_sections):
    job_id = _stopped_after_one_section(tmp_path / "before")
    (tmp_path / "before").rename(tmp_path / "after")
    with JobQueue(tmp_path / "after", loader=tiny_loader, models=["tiny"]) as q:
        q.resume(job_id)
        done = q.wait(job_id, 120)
        assert done.state == "done", done.error
        assert q.job_file(job_id, "video").read_bytes() == two_sections
        sidecar = json.loads((q.jobs_dir / done.metadata).read_text())
        assert str(tmp_path / "before") not in json.dumps(sidecar)  # the paths moved with the folder


def test_shipping_a_job_folder_and_its_changes_back(tmp_path):
    head, scratch = tmp_path / "head" / "jobs" / "J", tmp_path / "worker" / "J"
    (head / "state").mkdir(parents=True)
    (head / "input.png").write_bytes(b"png")
    (head / "job.json").write_text("{}")
    (head / "state" / "state.json").write_text(json.dumps({"video": str(head / "video.mp4"), "n": 1}))
    files = shipping.bundle(head)
    assert sorted(files) == ["input.png", "state/state.json"]  # the head's own record stays home
    scratch.mkdir(parents=True)
    shipping.unpack(scratch, files, [(head, scratch)])
    assert json.loads((scratch / "state" / "state.json").read_text())["video"] == str(scratch / "video.mp4")
    sync = shipping.FolderSync(scratch)
    assert not sync.changes()
    (scratch / "video.mp4").write_bytes(b"mp4")
    (scratch / "state" / "state.json").write_text(json.dumps({"video": str(scratch / "video.mp4"), "n": 2}))
    (scratch / "input.png").unlink()
    changes = sync.changes()
    assert sorted(changes.files) == ["state/state.json", "video.mp4"] and changes.deleted == ["input.png"]
    shipping.apply_changes(head, changes)
    assert json.loads((head / "state" / "state.json").read_text()) == {"video": str(head / "video.mp4"), "n": 2}
    assert (head / "video.mp4").read_bytes() == b"mp4" and not (head / "input.png").exists()
    assert (head / "job.json").read_text() == "{}"
    for bad in ("../x", "/etc/passwd", "a/../../x", "a\\b", ""):
        with pytest.raises(shipping.ShippingError, match="not a plain path inside the job folder"):
            shipping.apply_changes(head, shipping.Changes(str(scratch), files={bad: b"x"}))
    assert not (tmp_path / "head" / "x").exists()


def test_ray_missing_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import sys

    from framepack.app import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as it does without the [cluster] extra
    args = cli.build_parser().parse_args(["serve", "--model", "tiny", "--outputs", str(tmp_path), "--ray"])
    assert cli._start_server(args, "127.0.0.1") == 2
    err = capsys.readouterr().err
    assert 'error: --ray needs Ray, which is not installed: pip install -e ".[cluster]"  (Ray 2.60.0)' in err
    with JobQueue(tmp_path, loader=tiny_loader, models=["tiny"], start_worker=False):
        pass  # the refused start left the outputs folder free for the next server


@pytest.mark.parametrize("flags,message", [
    (["--gpus", "0"], "error: --gpus must be at least 1, got 0"),
    (["--gpus", "2", "--device", "cuda"], "error: --gpus 2 but this machine has 0 CUDA devices"),
])  # fmt: skip
def test_serve_gpu_flags_that_cannot_run_are_one_line_errors(tmp_path, capsys, flags, message):
    import torch

    from framepack.app import cli

    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has CUDA devices")

    args = cli.build_parser().parse_args(["serve", "--model", "tiny", "--outputs", str(tmp_path), *flags])
    assert cli._start_server(args, "127.0.0.1") == 2
    assert message in capsys.readouterr().err
