"""The Ray backend (framepack/jobs/ray_runner.py, ray_worker.py, shipping.py) on one local Ray instance
shared by this module: `ray.init(num_cpus=2, num_gpus=2)` gives two logical GPUs, so two worker actors
run the tiny model on the CPU. Every video is checked against the in-process runner's for the same
request (same seed): byte-equal MP4s."""

from __future__ import annotations

import json
import time

import pytest
import torch
from apphelpers import FAST, home, png_bytes, wait_until, write_tiny_lora

ray = pytest.importorskip("ray", reason="the [cluster] extra (Ray) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from framepack.app.api import create_app  # noqa: E402
from framepack.jobs import JobQueue  # noqa: E402
from framepack.jobs.ray_runner import RayRunner, RaySettings  # noqa: E402
from framepack.pipeline import PipelineLoader  # noqa: E402
from framepack.video import probe  # noqa: E402

LOADER = PipelineLoader(device="cpu")  # plain data: it travels to the worker actors
MODELS = ["tiny", "tiny-f1"]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray instance with 2 logical GPUs for the whole module (started once: ~3 s)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FRAMEPACK_HOME", home(tmp_path_factory))
    LOADER("tiny"), LOADER("tiny-f1")  # the tiny models' files exist before two workers look for them
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, namespace="framepack-tests", log_to_driver=False)
    yield
    ray.shutdown()
    mp.undo()


pytestmark = pytest.mark.usefixtures("app_env")  # FRAMEPACK_HOME: the app tests' shared one (conftest)


def ray_queue(folder, **settings):
    """A queue on Ray workers. Their torch uses as many threads as this process's: on the CPU the thread
    count changes how sums are split, so it is what makes their videos byte-equal to the in-process ones."""
    settings = {"threads": torch.get_num_threads(), **settings}
    queue = JobQueue(folder, loader=LOADER, models=MODELS,
                     runner=RayRunner.factory(LOADER, RaySettings(**settings)))  # fmt: skip
    assert queue.runner.pool.wait_ready(queue.runner.slots, 90), queue.runner.pool.problems
    return queue


def reference_videos(folder, jobs: list[tuple[bytes, dict, str]]) -> list[bytes]:
    """The in-process runner's MP4 for each (image, params, model)."""
    with JobQueue(folder, loader=LOADER, models=MODELS) as q:
        ids = [q.submit(image, params, model=model).id for image, params, model in jobs]
        done = [q.wait(i, 120) for i in ids]
        assert all(j.state == "done" for j in done), [(j.state, j.error) for j in done]
        return [q.job_file(i, "video").read_bytes() for i in ids]


def events(queue, job_id: str, kind: str) -> list[dict]:
    return [e for e in queue.events(job_id) if e["type"] == kind]


def test_two_workers_run_six_api_jobs_each_once_with_the_in_process_videos(ray_cluster, tmp_path):
    jobs = [(png_bytes(seed=i), {**FAST, "seed": 100 + i}, MODELS[i % 2]) for i in range(6)]
    expected = reference_videos(tmp_path / "reference", jobs)
    queue = ray_queue(tmp_path / "outputs")
    try:
        assert queue.dispatcher.slots == 2
        with TestClient(create_app(queue)) as client:
            ids = []
            for image, params, model in jobs:
                r = client.post("/api/jobs", files={"image": ("in.png", image, "image/png")},
                                data={"params": json.dumps(params), "model": model})  # fmt: skip
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            done = [queue.wait(i, 180) for i in ids]
            assert [j.state for j in done] == ["done"] * 6, [(j.state, j.error) for j in done]
            for job_id, video in zip(ids, expected):
                assert client.get(f"/api/jobs/{job_id}/video").content == video  # the in-process runner's bytes
            workers = client.get("/api/info").json()["workers"]
            assert sorted(w["name"] for w in workers) == ["worker-0", "worker-1"]
            assert all(w["job"] is None and w["model"] in MODELS and len(w["gpus"]) == 1 for w in workers), workers
        from framepack.app.ui import workers_line

        line = workers_line(queue)  # the UI's queue tab
        assert line.startswith("**Workers (2)**: worker-") and line.count("(GPU ") == 2 and ": free, tiny" in line
        ran = [events(queue, i, "worker_assigned") for i in ids]
        assert all(len(r) == 1 for r in ran)  # each exactly once: one run, one worker
        assert all(len([e for e in queue.events(i) if e.get("state") == "running"]) == 1 for i in ids)
        assert {r[0]["worker"] for r in ran} == {"worker-0", "worker-1"}  # both workers took jobs
        assert {r[0]["files"] for r in ran} == {"shared"}  # one machine: the workers see the outputs folder
    finally:
        queue.close()


def _follow(queue, job_id: str, until, timeout: float = 120) -> list[dict]:
    """The job's events until `until(event)` holds for one of them."""
    seq, seen = 0, []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = queue.wait_events(job_id, seq, timeout=5)
        seen += new
        if new:
            seq = new[-1]["seq"]
        if any(until(e) for e in new):
            return seen
    raise AssertionError(f"job {job_id}: no such event within {timeout} s; saw {[e['type'] for e in seen]}")


@pytest.mark.parametrize("files", ["ship", "shared"])
def test_a_killed_worker_s_job_resumes_on_the_other_with_the_same_video(ray_cluster, tmp_path, files):
    params = {**FAST, "seconds": 3.0, "seed": 7}  # 2 sections: the worker is killed after the first
    (expected,) = reference_videos(tmp_path / "reference", [(png_bytes(seed=3), params, "tiny-f1")])
    queue = ray_queue(tmp_path / "outputs", files=files)
    try:
        job = queue.submit(png_bytes(seed=3), params, model="tiny-f1")
        seen = _follow(queue, job.id, lambda e: e["type"] == "section")
        (first,) = [e for e in seen if e["type"] == "worker_assigned"]
        victim = next(h for h in queue.runner.pool.ready if h.name == first["worker"])
        ray.kill(victim.actor)
        done = queue.wait(job.id, 180)
        assert done.state == "done", done.error
        assert queue.job_file(job.id, "video").read_bytes() == expected  # as if it had never been interrupted
        ran = events(queue, job.id, "worker_assigned")
        assert len(ran) == 2 and ran[0]["worker"] == first["worker"]
        assert ran[1]["worker"] != first["worker"]  # the other worker (the victim's replacement was still starting)
        assert ran[1]["files"] == ("shipped" if files == "ship" else "shared")
        (back,) = [e for e in queue.events(job.id) if e.get("requeued")]
        assert back["state"] == "queued" and "was lost" in back["requeued"]
        sections = [e["section"] for e in events(queue, job.id, "section")]
        planned = events(queue, job.id, "job_planned")[0]["sections"]
        assert planned >= 2 and sections == list(range(planned))  # none made twice: it resumed after the first
        assert len(queue.list(["done"])) == 1 and not queue.list(["queued", "running"])  # nothing lost or doubled
        wait_until(lambda: len(queue.runner.pool.ready) == 2, 60, "the killed worker's replacement")
    finally:
        queue.close()


def test_cancel_reaches_the_remote_worker_within_one_step_and_keeps_a_playable_mp4(ray_cluster, tmp_path):
    queue = ray_queue(tmp_path / "outputs", workers=1)
    try:
        # 256 px: a step takes ~60 ms here, far longer than a cancel's trip to the worker (~1 ms)
        params = {**FAST, "seconds": 3.0, "steps": 10, "resolution": 256, "cache": "none"}
        job = queue.submit(png_bytes(), params, model="tiny-f1")
        _follow(queue, job.id, lambda e: e["type"] == "step" and e["section"] == 1 and e["step"] >= 3)
        asked = time.time()
        queue.cancel(job.id)
        done = queue.wait(job.id, 60)
        assert done.state == "cancelled" and done.resumable
        after = [e for e in events(queue, job.id, "step") if e["time"] > asked]
        assert len(after) <= 2, after  # the step running when the cancel arrived (+ one already on its way)
        video = queue.job_file(job.id, "video")
        assert probe(video)["frames"] == done.progress["frames"] > 0  # the finished section, playable
    finally:
        queue.close()


def test_pause_over_ray_stops_at_a_section_boundary_and_resumes_to_the_same_video(ray_cluster, tmp_path):
    params = {**FAST, "seconds": 3.0, "seed": 11}
    (expected,) = reference_videos(tmp_path / "reference", [(png_bytes(seed=5), params, "tiny")])
    queue = ray_queue(tmp_path / "outputs", workers=1, files="ship")
    try:
        job = queue.submit(png_bytes(seed=5), params, model="tiny")
        _follow(queue, job.id, lambda e: e["type"] == "step")
        queue.pause(job.id)
        paused = queue.wait(job.id, 60)
        assert paused.state == "paused", paused.error
        assert paused.progress["sections_done"] == 1  # of 2
        queue.resume(job.id)
        done = queue.wait(job.id, 120)
        assert done.state == "done", done.error
        assert queue.job_file(job.id, "video").read_bytes() == expected
    finally:
        queue.close()


def test_more_workers_than_gpus_is_a_clear_error(ray_cluster, tmp_path):
    with pytest.raises(Exception, match=r"the Ray cluster has 2 GPUs \(asked for 3 workers of 1 GPU each"):
        JobQueue(tmp_path / "o", loader=LOADER, models=MODELS,
                 runner=RayRunner.factory(LOADER, RaySettings(workers=3)))  # fmt: skip


def test_shipped_jobs_take_their_lora_along_once_per_worker(ray_cluster, tmp_path):
    loras = tmp_path / "loras"
    write_tiny_lora(loras / "style.safetensors")
    params = [{**FAST, "seed": s, "loras": [{"path": "style.safetensors", "weight": 0.7}]} for s in (1, 2)]
    with JobQueue(tmp_path / "reference", loader=LOADER, models=MODELS, lora_dir=loras) as q:
        ref = [q.wait(q.submit(png_bytes(), p).id, 120) for p in params]
        expected = [q.job_file(j.id, "video").read_bytes() for j in ref]
    settings = RaySettings(workers=1, files="ship", threads=torch.get_num_threads())
    queue = JobQueue(tmp_path / "outputs", loader=LOADER, models=MODELS, lora_dir=loras,
                     runner=RayRunner.factory(LOADER, settings))  # fmt: skip
    try:
        sent = []
        real = queue.runner._loras.missing
        queue.runner._loras.missing = lambda worker, paths: sent.append(real(worker, paths)) or sent[-1]
        ids = [queue.submit(png_bytes(), p).id for p in params]
        done = [queue.wait(i, 120) for i in ids]
        assert [j.state for j in done] == ["done", "done"], [j.error for j in done]
        assert [queue.job_file(i, "video").read_bytes() for i in ids] == expected
        assert [sorted(s) for s in sent] == [["style.safetensors"], []]  # the second job found it on the worker
        sidecar = json.loads((queue.jobs_dir / done[0].metadata).read_text())
        assert sidecar["loras"][0]["path"] == str((loras / "style.safetensors").absolute())  # the head's path
        assert str(queue.jobs_dir / ids[0]) in sidecar["request"]["image"]  # the head's job folder, not a scratch one
    finally:
        queue.close()


def test_a_worker_whose_lease_was_taken_stops_writing_the_shared_folder(ray_cluster, tmp_path):
    queue = ray_queue(tmp_path / "outputs", workers=1, files="shared")
    try:
        job = queue.submit(png_bytes(), {**FAST, "seconds": 3.0, "steps": 25}, model="tiny")
        _follow(queue, job.id, lambda e: e["type"] == "step")
        (queue.jobs_dir / job.id / ".worker-lease").write_text("another-run")  # the head gave the job away
        done = queue.wait(job.id, 60)
        assert done.state == "failed" and "gave this job to another worker" in done.error
        assert not events(queue, job.id, "section")  # it stopped within the first section
    finally:
        queue.close()


def test_serve_ray_flags_open_a_queue_on_ray_workers(ray_cluster, tmp_path, capsys):
    from framepack.app import cli

    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--model", "tiny", "--device", "cpu", "--outputs", str(tmp_path / "o"),
                              "--ray", "--workers", "1", "--ray-files", "ship"])  # fmt: skip
    queue = cli._open_queue(args)
    try:
        assert isinstance(queue.runner, RayRunner) and queue.runner.slots == 1
        assert queue.runner.settings.files == "ship" and queue.runner.settings.gpus_per_worker == 0  # --device cpu
        assert "Ray: 1 worker (attached" in capsys.readouterr().err
        job = queue.wait(queue.submit(png_bytes(), FAST).id, 120)
        assert job.state == "done", job.error
    finally:
        queue.close()
    args = parser.parse_args(["serve", "--model", "tiny", "--outputs", str(tmp_path / "p"), "--workers", "2"])
    assert cli._start_server(args, "127.0.0.1") == 2
    assert "error: --workers sets the Ray worker count: use it with --ray" in capsys.readouterr().err


def test_a_ray_worker_with_two_gpus_runs_its_jobs_on_both(ray_cluster, tmp_path):
    """`serve --ray --gpus 2`: one worker actor owns both (logical) GPUs and runs each job on a group of
    2 ranks (its follower spawned inside the actor); the latents equal the in-process runner's."""
    from safetensors.torch import load_file

    from framepack.app.cli_parallel import RankGroupLoader

    params = {**FAST, "seconds": 2.4, "seed": 3}
    with JobQueue(tmp_path / "reference", loader=LOADER, models=MODELS) as q:
        ref = q.wait(q.submit(png_bytes(), params).id, 120)
        ref_dir = q.jobs_dir / ref.id / ".video.sections"
    group = RankGroupLoader(LOADER, 2, "cpu")
    settings = RaySettings(gpus_per_worker=2, threads=torch.get_num_threads())
    queue = JobQueue(tmp_path / "outputs", loader=group, models=MODELS, runner=RayRunner.factory(group, settings))
    try:
        assert queue.runner.slots == 1 and queue.runner.pool.wait_ready(1, 90)
        job = queue.wait(queue.submit(png_bytes(), params).id, 180)
        assert job.state == "done", job.error
        (worker,) = queue.workers()
        assert len(worker["gpus"]) == 2
        sidecar = json.loads((queue.jobs_dir / job.metadata).read_text())
        assert sidecar["speed"]["parallel"]["ranks"] == 2
        mine = sorted((queue.jobs_dir / job.id / ".video.sections").glob("section-*.safetensors"))
        theirs = sorted(ref_dir.glob("section-*.safetensors"))
        assert len(mine) == len(theirs) == 2
        for a, b in zip(mine, theirs):
            assert (load_file(str(a))["generated"] - load_file(str(b))["generated"]).abs().max().item() < 1e-5
    finally:
        queue.close()
