"""HTTP API (framepack/app/api.py) on the tiny model: every route, every bad input, SSE order, token
auth, and a load test (50 concurrent clients submitting and polling while a job runs)."""

from __future__ import annotations

import json
import statistics
import threading
import time

import httpx
import pytest
from apphelpers import FAST, ThreadServer, png_bytes, sse_events, wait_until
from fastapi.testclient import TestClient

from framepack.app.api import create_app
from framepack.video import probe

pytestmark = pytest.mark.usefixtures("app_env")  # FRAMEPACK_HOME: the app tests' shared one (conftest)


@pytest.fixture
def client(queue):
    with TestClient(create_app(queue, max_upload_bytes=200_000)) as c:
        yield c


def _submit(client, params=None, image=None, **form):
    files = {"image": ("in.png", image if image is not None else png_bytes(), "image/png")}
    data = {"params": json.dumps(FAST if params is None else params), **form}
    return client.post("/api/jobs", files=files, data=data)


def _sse(client, url):
    """(type, data) of every event of a stream, in order; ends when the server closes it."""
    return sse_events(client, url)


def test_routes_end_to_end(client, queue):
    info = client.get("/api/info").json()
    assert info["models"] == ["tiny", "tiny-f1"] and info["auth"] is False and info["max_upload_bytes"] == 200_000
    assert [w["name"] for w in info["workers"]] == ["in-process"]
    defaults = client.get("/api/params").json()
    assert defaults["steps"] == 25 and defaults["seed"] == 31337 and "image" not in defaults
    schema = client.get("/api/openapi.json").json()
    for path in ("/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/events", "/api/jobs/{job_id}/video",
                 "/api/jobs/{job_id}/resume", "/api/jobs/{job_id}/rerun", "/api/files/{path}"):  # fmt: skip
        assert path in schema["paths"], path
    assert "JobParams" in schema["components"]["schemas"] and "JobInfo" in schema["components"]["schemas"]

    r = _submit(client, {**FAST, "seconds": 2.4})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and job["params"]["seconds"] == 2.4
    events = _sse(client, job["links"]["events"])
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and all(e["data"]["seq"] == e["id"] for e in events)
    types = [e["type"] for e in events]
    assert events[0]["data"] == {**events[0]["data"], "type": "state", "state": "queued"}
    assert events[-1]["type"] == "state" and events[-1]["data"]["state"] == "done"
    sections = [e["data"] for e in events if e["type"] == "section"]
    assert [s["section"] for s in sections] == [0, 1] and sections[0]["video"].endswith("/video")
    assert types.index("step") < types.index("section")
    steps = [e["data"] for e in events if e["type"] == "step"]
    assert [(s["section"], s["step"]) for s in steps] == [(0, 1), (0, 2), (1, 1), (1, 2)]

    done = client.get(f"/api/jobs/{job['id']}").json()
    assert done["state"] == "done" and done["result"]["frames"] == 73 and done["result"]["peak_rss_bytes"] > 0
    video = client.get(done["links"]["video"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4" and len(video.content) > 1000
    part = client.get(done["links"]["video"], headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and len(part.content) == 100
    sidecar = client.get(done["links"]["sidecar"]).json()
    assert sidecar["status"] == "finished" and sidecar["request"]["seconds"] == 2.4
    assert client.get(done["links"]["image"]).content[:4] == b"\x89PNG"
    assert client.get(f"/api/files/{job['id']}/video.json").json() == sidecar
    assert client.get(f"/api/jobs/{job['id']}/preview.png").status_code == 404  # only while running
    replay = _sse(client, done["links"]["events"] + "?after=" + str(events[-2]["id"]))
    assert [e["id"] for e in replay] == [events[-1]["id"]]  # resume a stream where it stopped

    # re-run with edited parameters, queue operations, cancel, resume, delete
    rerun = client.post(f"/api/jobs/{job['id']}/rerun", json={"params": {"seed": 5, "seconds": 1.2}})
    assert rerun.status_code == 201 and rerun.json()["params"] == {**done["params"], "seed": 5, "seconds": 1.2}
    assert rerun.json()["parent"] == job["id"]
    second = _submit(client).json()
    third = _submit(client).json()
    queued = [j["id"] for j in client.get("/api/jobs", params={"state": "queued"}).json()]
    assert queued[-2:] == [second["id"], third["id"]]
    moved = client.post(f"/api/jobs/{third['id']}/move", json={"position": 0}).json()
    assert moved["position"] == 0
    assert client.post(f"/api/jobs/{second['id']}/cancel").json()["state"] == "cancelled"
    resumed = client.post(f"/api/jobs/{second['id']}/resume").json()
    assert resumed["state"] == "queued" and resumed["position"] is not None
    for j in (rerun.json(), second, third):
        client.post(f"/api/jobs/{j['id']}/cancel")
    wait_until(lambda: not queue.list(["running", "queued"]), 60, "cancelled jobs to stop")
    assert client.delete(f"/api/jobs/{job['id']}").status_code == 204
    assert client.get(f"/api/jobs/{job['id']}").status_code == 404
    assert client.get(done["links"]["video"]).status_code == 404
    listed = [j["id"] for j in client.get("/api/jobs").json()]
    assert job["id"] not in listed and len(listed) == 3


def test_bad_inputs_get_precise_4xx(client, queue):
    def detail(r, status):
        assert r.status_code == status, (r.status_code, r.text)
        return r.json()["detail"]

    assert "corrupt" in detail(_submit(client, image=png_bytes()[:70]), 422)  # truncated PNG
    assert "image" in detail(_submit(client, image=b"hello, I am text"), 422).lower()
    assert "empty" in detail(_submit(client, image=b""), 422)
    assert "limit" in detail(_submit(client, image=b"\x89PNG" + b"0" * 250_000), 413)  # over the 200 kB limit
    assert "limit" in detail(_submit(client, image=png_bytes(size=300)[:100] + b"0" * 1_300_000), 413)
    text = detail(_submit(client, {**FAST, "steps": 500, "seconds": -1}), 422)
    assert "steps must be a number in 1..100, got 500" in text and "seconds must be a number" in text
    assert "crf" in detail(_submit(client, {**FAST, "crf": "high"}), 422)
    assert "colour" in detail(_submit(client, {**FAST, "colour": 1}), 422)
    assert "not valid JSON" in detail(client.post("/api/jobs", files={"image": ("a.png", png_bytes())},
                                                  data={"params": "{steps: 2"}), 422)  # fmt: skip
    assert "JSON object" in detail(_submit(client, [1, 2]), 422)
    assert "model must be one of" in detail(_submit(client, model="original"), 422)
    assert "image" in detail(_submit(client, {**FAST, "image": "/etc/passwd"}), 422)
    assert "preserved_memory_gb" in detail(_submit(client, preserved_memory_gb="-3"), 422)
    assert "image: Field required" in detail(client.post("/api/jobs", data={"params": "{}"}), 422)  # no image
    # the engine's whole check runs at submission: what the CLI refuses up front is refused here too
    assert "must increase: 2s comes after 5s" in detail(_submit(client, {**FAST, "prompt": "[0s: a] [5s: b] [2s: c]",
                                                                         "seconds": 6}), 422)  # fmt: skip
    end = {"end_image": ("end.png", png_bytes(seed=3), "image/png")}
    r = client.post("/api/jobs", files={"image": ("in.png", png_bytes(), "image/png"), **end},
                    data={"params": json.dumps(FAST), "model": "tiny-f1"})  # fmt: skip
    assert "end frame needs the original" in detail(r, 422)
    # strict types, in the CLI's words: nothing is coerced
    for bad, message in ((("seconds", True), "seconds must be a number in 0.1..3600, got True"),
                         (("steps", "25"), "steps must be a number in 1..100, got '25'"),
                         (("seed", "7"), "seed must be a number in 0.."),
                         (("seed", 7.0), "seed must be a whole number"),
                         (("teacache", "yes"), "teacache must be true or false, got 'yes'"),
                         (("prompt", 5), "prompt must be text, got 5")):  # fmt: skip
        assert message in detail(_submit(client, {**FAST, bad[0]: bad[1]}), 422), bad
    assert queue.list() == []  # none of these created a job

    for method, url in (("GET", "/api/jobs/nope"), ("POST", "/api/jobs/nope/cancel"), ("DELETE", "/api/jobs/nope"),
                        ("POST", "/api/jobs/nope/resume"), ("GET", "/api/jobs/nope/events"),
                        ("GET", "/api/jobs/nope/video"), ("GET", "/api/jobs/nope/sidecar"),
                        ("POST", "/api/jobs/nope/rerun"), ("GET", "/api/jobs/.../video")):  # fmt: skip
        assert "no job" in detail(client.request(method, url), 404), url
    assert client.get("/api/jobs/..%2F..%2Fetc/video").status_code == 404  # matches no route at all
    for path in ("..%2F..%2Fetc%2Fpasswd", "..%2Fjobs.sqlite3", "%2Fetc%2Fpasswd", "x%2F..%2F..%2Fjobs.lock"):
        assert "must stay inside the outputs" in detail(client.get(f"/api/files/{path}"), 400), path
    assert detail(client.get("/api/files/nothing/here.mp4"), 404)

    a, b = _submit(client).json(), _submit(client).json()
    wait_until(lambda: queue.get(a["id"]).state == "running", 60, "the first job to run")
    assert "cancel it first" in detail(client.delete(f"/api/jobs/{a['id']}"), 409)
    assert "only" in detail(client.post(f"/api/jobs/{b['id']}/resume"), 409)  # queued: nothing to resume
    assert client.post(f"/api/jobs/{a['id']}/move", json={"position": -1}).status_code == 422
    for j in (b, a):
        assert client.post(f"/api/jobs/{j['id']}/cancel").status_code == 200
    wait_until(lambda: queue.get(a["id"]).terminal, 60, "the cancelled job to stop")
    assert "only queued or running" in detail(client.post(f"/api/jobs/{a['id']}/cancel"), 409)
    assert "only queued jobs" in detail(client.post(f"/api/jobs/{a['id']}/move", json={"position": 0}), 409)


def test_token_auth(queue):
    with TestClient(create_app(queue, token="s3cret")) as c:
        assert c.get("/api/jobs").status_code == 401
        assert c.get("/api/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/api/jobs?token=s3cret").status_code == 200  # for <video src> and EventSource
        assert c.get("/api/info", headers={"Authorization": "Bearer s3cret"}).json()["auth"] is True


def test_load_50_concurrent_clients_while_a_job_runs(queue, capsys):
    """50 clients each submit one job and poll it and the list, while the worker runs a long job. No job
    is lost or duplicated, every request is answered, and the latency stays low."""
    server = ThreadServer(create_app(queue))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            files = {"image": ("in.png", png_bytes(), "image/png")}
            running = c.post("/api/jobs", files=files, data={"params": json.dumps({**FAST, "seconds": 6})}).json()
            wait_until(lambda: c.get(f"/api/jobs/{running['id']}").json()["state"] == "running", 60, "the long job")
        latencies: list[float] = []
        submitted: list[str] = []
        errors: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(50)

        def client_run(i: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                start.wait(30)
                t0 = time.perf_counter()
                r = c.post("/api/jobs", files={"image": ("in.png", png_bytes(seed=i), "image/png")},
                           data={"params": json.dumps({**FAST, "seed": i})})  # fmt: skip
                mine = [time.perf_counter() - t0]
                if r.status_code != 201:
                    with lock:
                        errors.append(f"submit {r.status_code} {r.text[:200]}")
                    return
                job_id = r.json()["id"]
                for n in range(10):  # bounded: 10 polls per client
                    t0 = time.perf_counter()
                    r = c.get(f"/api/jobs/{job_id}") if n % 2 else c.get("/api/jobs", params={"state": "queued"})
                    mine.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        with lock:
                            errors.append(f"poll {r.status_code}")
                    time.sleep(0.02)
                with lock:
                    submitted.append(job_id)
                    latencies.extend(mine)

        threads = [threading.Thread(target=client_run, args=(i,)) for i in range(50)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        wall = time.perf_counter() - t0
        assert not errors, errors[:5]
        assert len(submitted) == 50 and len(set(submitted)) == 50
        with httpx.Client(base_url=server.url, timeout=30) as c:
            listed = [j["id"] for j in c.get("/api/jobs").json()]
            assert sorted(listed) == sorted([*submitted, running["id"]])  # none lost, none twice
            assert c.get(f"/api/jobs/{running['id']}").json()["state"] == "running"  # it ran all along
            queued = c.get("/api/jobs", params={"state": "queued"}).json()
            assert [j["position"] for j in queued] == list(range(len(queued)))
            for j in queued:  # stop quickly: cancel the 50 small jobs and the long one
                c.post(f"/api/jobs/{j['id']}/cancel")
            c.post(f"/api/jobs/{running['id']}/cancel")
        latencies.sort()
        p50 = statistics.median(latencies)
        p99 = latencies[int(0.99 * (len(latencies) - 1))]
        with capsys.disabled():
            ms = [round(x * 1000) for x in (p50, p99, latencies[-1])]
            print(f"\nload: 50 clients, {len(latencies)} requests in {wall:.1f} s while a job ran; "
                  f"latency p50 {ms[0]} ms, p99 {ms[1]} ms, max {ms[2]} ms")  # fmt: skip
        assert p99 < 10.0  # answering at all under load; the numbers themselves are reported
        wait_until(lambda: not queue.list(["running"]), 60, "the long job to stop")
        assert probe(queue.job_file(running["id"], "video"))["frames"] > 0 or queue.get(running["id"]).video is None
    finally:
        server.stop()


def test_cli_refuses_an_exposed_bind_without_a_token(tmp_path, capsys, monkeypatch):
    from framepack.app import cli

    monkeypatch.delenv("FRAMEPACK_TOKEN", raising=False)
    for argv in (["serve", "--host", "0.0.0.0"], ["ui", "--server", "192.168.1.5"], ["ui", "--share"]):
        assert cli.main([*argv, "--model", "tiny", "--outputs", str(tmp_path)]) == 2
        assert "needs --token" in capsys.readouterr().err
    assert not (tmp_path / "jobs.sqlite3").exists()  # refused before anything was opened or bound
    parser_args = type("A", (), {"token": None, "no_auth": True, "max_upload_mb": 32})()
    assert cli._check_exposure("0.0.0.0", parser_args) is None
    assert "WITHOUT authentication" in capsys.readouterr().err
    parser_args.no_auth, parser_args.token = False, "t"
    assert cli._check_exposure("0.0.0.0", parser_args) is None and cli._check_exposure("127.0.0.1", parser_args) is None
