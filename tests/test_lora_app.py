"""LoRAs through the app layers, on the tiny model: the HTTP API (a job's `loras` reach the engine and
its sidecar, bad values and files are refused at submission with the engine's words, the LoRA listing
route), the job queue's check (only files in the LoRA folder), and the UI's LoRA picker (rows ->
`loras`, rescan, load settings, the applied-LoRA lines in the progress text) without a browser."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from apphelpers import FAST, cancel_after_first_section, png_bytes, sse_events, tiny_loader
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from framepack.app.api import create_app
from framepack.config import LoraRef, RequestError
from framepack.jobs import JobQueue

# gradio's own pandas calls warn under pandas 3; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"), pytest.mark.usefixtures("app_env")]

TARGET = "transformer_blocks.0.attn.to_q"  # a (32, 32) Linear of the tiny transformer


def write_lora(path, seed: int = 0, rank: int = 4):
    """A kohya LoRA for the tiny model's first double block's to_q."""
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    key = "lora_unet_" + TARGET.replace(".", "_")
    save_file({f"{key}.lora_down.weight": torch.randn(rank, 32, generator=g),
               f"{key}.lora_up.weight": torch.randn(32, rank, generator=g),
               f"{key}.alpha": torch.tensor(float(rank))}, str(path))  # fmt: skip
    return path


@pytest.fixture
def loras(tmp_path):
    folder = tmp_path / "loras"
    write_lora(folder / "my_style.safetensors")
    return folder


def _queue(tmp_path, loras, worker: bool) -> JobQueue:
    return JobQueue(tmp_path / "outputs", loader=tiny_loader, models=["tiny"], start_worker=worker, lora_dir=loras)


def _submit(client, params):
    files = {"image": ("in.png", png_bytes(), "image/png")}
    return client.post("/api/jobs", files=files, data={"params": json.dumps(params)})




# ------------------------------------------------------------------------------------- API
def test_api_job_with_a_lora_reaches_the_engine_and_its_sidecar(tmp_path, loras):
    q = _queue(tmp_path, loras, worker=True)
    try:
        with TestClient(create_app(q)) as client:
            params = {**FAST, "loras": [{"path": "my_style.safetensors", "weight": 0.8}],
                      "lora_include": "transformer_blocks"}  # fmt: skip
            r = _submit(client, params)
            assert r.status_code == 201, r.text
            job = r.json()
            assert job["params"]["loras"] == [{"path": "my_style.safetensors", "weight": 0.8, "sha256": None}]
            events = sse_events(client, job["links"]["events"])
            assert events[-1]["data"]["state"] == "done", events[-1]
            applied = [e["data"] for e in events if e["type"] == "loras_applied"]
            assert len(applied) == 1 and applied[0]["lines"][0].startswith("LoRA my_style.safetensors x0.8: kohya")
            assert applied[0]["loras"][0]["matched_modules"] == 1
            types = [e["type"] for e in events]
            assert types.index("loras_applied") < types.index("step")  # merged before sampling
            sidecar = client.get(f"/api/jobs/{job['id']}/sidecar").json()
            (entry,) = sidecar["loras"]
            assert entry["file"] == "my_style.safetensors" and entry["weight"] == 0.8
            assert entry["matched_modules"] == 1 and entry["unmatched_keys"] == 0
            assert entry["path"] == str((loras / "my_style.safetensors").absolute())
            (ref,) = sidecar["request"]["loras"]
            assert ref["weight"] == 0.8 and len(ref["sha256"]) == 64 and sidecar["request"]["lora_include"]
            # a re-run keeps the LoRAs, and may change their weight
            again = client.post(f"/api/jobs/{job['id']}/rerun", json={"params": {"loras": [
                {"path": "my_style.safetensors", "weight": -0.5}]}})  # fmt: skip
            assert again.status_code == 201, again.text
            assert again.json()["params"]["loras"][0]["weight"] == -0.5
            client.post(f"/api/jobs/{again.json()['id']}/cancel")
    finally:
        q.close()


def test_api_refuses_bad_loras_at_submission(tmp_path, loras):
    outside = write_lora(tmp_path / "elsewhere" / "outside.safetensors")
    (loras / "notes.safetensors").write_text("I am not a safetensors file")
    torch.save({"x": torch.zeros(1)}, loras / "old.ckpt")
    q = _queue(tmp_path, loras, worker=False)
    try:
        with TestClient(create_app(q)) as client:

            def detail(loras_value, status=422, **extra):
                r = _submit(client, {**FAST, "loras": loras_value, **extra})
                assert r.status_code == status, (loras_value, r.status_code, r.text)
                return r.json()["detail"]

            ok = {"path": "my_style.safetensors"}
            assert "LoRA file not found: gone.safetensors" in detail([{"path": "gone.safetensors"}])
            assert "LoRA folder" in detail(["gone.safetensors"])  # a bare name is a path too
            assert "not a usable safetensors file" in detail([{"path": "notes.safetensors"}])
            assert "pickle" in detail([{"path": "old.ckpt"}])
            assert "weight must be a number in -20..20, got 'x'" in detail([{**ok, "weight": "x"}])
            assert "weight must be a number in -20..20, got 50" in detail([{**ok, "weight": 50}])
            assert "weight must be a number" in detail([{**ok, "weight": True}])
            assert "a LoRA is {'path': FILE, 'weight': number}" in detail([1, 2])
            assert "a LoRA is" in detail([{**ok, "scale": 1}])
            assert "a LoRA is" in detail([{"weight": 1}])
            assert "loras must be a list" in detail("my_style.safetensors")
            assert "loras must be a list" in detail({"path": "my_style.safetensors"})
            assert "needs a file path" in detail([{"path": ""}])
            assert "sha256 must be 64 lowercase hex digits" in detail([{**ok, "sha256": "abc"}])
            assert "not a valid regular expression" in detail([ok], lora_include="(")
            assert "need at least one LoRA" in detail([], lora_exclude="norm")
            # only files in the LoRA folder: a client must not make the server open files of its choosing
            for bad in (str(outside), "../elsewhere/outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"):
                assert "is not a file in the LoRA folder" in detail([{"path": bad}]), bad
            assert q.list() == [] and list(q.jobs_dir.iterdir()) == []  # nothing queued, nothing left behind

            # what is accepted: a name, a subfolder name, the absolute path of a folder file (a sidecar's)
            write_lora(loras / "sub" / "b.safetensors", seed=1)
            for good in ("my_style.safetensors", "sub/b.safetensors", str(loras / "my_style.safetensors")):
                r = _submit(client, {**FAST, "loras": [{"path": good, "weight": 1}]})
                assert r.status_code == 201, (good, r.text)
                assert q.get(r.json()["id"]).request["loras"] == [{"path": good, "weight": 1, "sha256": None}]
    finally:
        q.close()


def test_lora_listing_route(tmp_path, loras):
    write_lora(loras / "sub" / "b.safetensors", seed=1)
    (loras / "readme.txt").write_text("not listed")
    write_lora(loras / ".hidden.safetensors")
    q = _queue(tmp_path, loras, worker=False)
    try:
        with TestClient(create_app(q)) as client:
            listing = client.get("/api/loras").json()
            assert listing["folder"] == str(loras) and listing["exists"] is True
            assert [f["name"] for f in listing["files"]] == ["my_style.safetensors", "sub/b.safetensors"]
            assert listing["files"][1]["size"] == (loras / "sub" / "b.safetensors").stat().st_size
            assert abs(listing["files"][0]["modified"] - (loras / "my_style.safetensors").stat().st_mtime) < 1e-3
            write_lora(loras / "new.safetensors", seed=2)  # read afresh on every call
            assert "new.safetensors" in [f["name"] for f in client.get("/api/loras").json()["files"]]
            schema = client.get("/api/openapi.json").json()
            assert "/api/loras" in schema["paths"]
            lora_param = schema["components"]["schemas"]["LoraParam"]
            assert lora_param["properties"]["weight"]["minimum"] == -20 and lora_param["required"] == ["path"]
            assert client.get("/api/params").json()["loras"] == []
    finally:
        q.close()
    with JobQueue(tmp_path / "out2", loader=tiny_loader, models=["tiny"], start_worker=False,
                  lora_dir=tmp_path / "no-such-folder") as q2, TestClient(create_app(q2)) as client:  # fmt: skip
        assert client.get("/api/loras").json() == {"folder": str(tmp_path / "no-such-folder"), "exists": False,
                                                   "files": []}  # fmt: skip


def test_queue_checks_lora_files_at_submission(tmp_path, loras):
    from framepack.models.lora import LoraError

    with _queue(tmp_path, loras, worker=False) as q:
        with pytest.raises(LoraError, match=r"LoRA file not found: nope\.safetensors \(not in the LoRA folder"):
            q.submit(png_bytes(), {**FAST, "loras": [{"path": "nope.safetensors"}]})
        with pytest.raises(RequestError, match="is not a file in the LoRA folder"):
            q.submit(png_bytes(), {**FAST, "loras": [{"path": "/etc/passwd"}]})
        assert list(q.jobs_dir.iterdir()) == []
        job = q.submit(png_bytes(), {**FAST, "loras": [LoraRef("my_style.safetensors", 0.5)]})  # LoraRefs too
        assert job.request["loras"] == [{"path": "my_style.safetensors", "weight": 0.5, "sha256": None}]
        (loras / "my_style.safetensors").unlink()  # gone before the job runs: the run says so (not here)
        assert q.get(job.id).state == "queued"


# ------------------------------------------------------------------------------------- UI
def test_picker_rows_become_the_request_loras():
    from framepack.app import ui

    rows = ["my_style.safetensors", 0.8, ui.LORA_NONE, 1.0, "sub/b.safetensors", -1.25, None, 1.0]
    got = ui.collect_loras(rows, "single_transformer_blocks", "  ")
    assert got == {"loras": (LoraRef("my_style.safetensors", 0.8), LoraRef("sub/b.safetensors", -1.25)),
                   "lora_include": "single_transformer_blocks", "lora_exclude": None}  # fmt: skip
    none = ui.collect_loras([ui.LORA_NONE, 1.0] * ui.LORA_ROWS, "blocks", "norm")
    assert none == {"loras": (), "lora_include": None, "lora_exclude": None}  # filters need a LoRA
    params = {"loras": [{"path": "a.safetensors", "weight": 0.5, "sha256": None}], "lora_exclude": "norm"}
    assert ui.lora_settings(params) == (["a.safetensors", 0.5] + [ui.LORA_NONE, 1.0] * 3, "", "norm", [])
    many = {"loras": [{"path": f"{i}.safetensors"} for i in range(6)]}
    assert ui.lora_settings(many)[3] == ["4.safetensors", "5.safetensors"]


def _handler(demo, elem_id: str, event: str = "click"):
    ids = {b.elem_id: i for i, b in demo.blocks.items() if getattr(b, "elem_id", None)}
    found = [f for f in demo.fns.values() if (ids[elem_id], event) in [tuple(t) for t in f.targets]]
    assert len(found) == 1, elem_id
    return found[0]


def _inputs(fn, **values):
    """The handler's arguments: each input widget's initial value, `values` by elem_id."""
    return [values.get(getattr(c, "elem_id", None) or "", getattr(c, "value", None)) for c in fn.inputs]


def test_page_picker_rescan_start_load_and_progress(tmp_path, loras):
    import gradio as gr

    from framepack.app import ui

    q = _queue(tmp_path, loras, worker=False)
    try:
        demo = ui.build(q)
        dropdown = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "fp-lora-0")
        assert [c[0] for c in dropdown.choices] == [ui.LORA_NONE, "my_style.safetensors"]

        rescan = _handler(demo, "fp-lora-rescan")
        write_lora(loras / "sub" / "late_one.safetensors", seed=3)  # added while the page is up
        *updates, note = rescan.fn()
        assert len(updates) == ui.LORA_ROWS
        assert all(u["choices"] == [ui.LORA_NONE, "my_style.safetensors", "sub/late_one.safetensors"]
                   for u in updates)  # fmt: skip
        assert str(loras) in note and "2 file(s)" in note

        start = _handler(demo, "fp-start")
        image = np.full((64, 64, 3), 90, np.uint8)
        args = _inputs(start, **{"fp-image": image, "fp-prompt": FAST["prompt"], "fp-steps": 2, "fp-seconds": 1.2,
                                 "fp-lora-0": "sub/late_one.safetensors", "fp-lora-weight-0": 0.65,
                                 "fp-lora-2": "my_style.safetensors", "fp-lora-weight-2": -1.0,
                                 "fp-lora-include": "attn"})  # fmt: skip
        session, _, message = start.fn(*args)
        assert "queued" in message or "starts now" in message
        (job_id,) = session["jobs"]
        stored = q.get(job_id).request
        assert stored["loras"] == [{"path": "sub/late_one.safetensors", "weight": 0.65, "sha256": None},
                                   {"path": "my_style.safetensors", "weight": -1.0, "sha256": None}]  # fmt: skip
        assert stored["lora_include"] == "attn" and stored["lora_exclude"] is None

        load = _handler(demo, "fp-load")
        out = load.fn(job_id)
        names = [getattr(c, "elem_id", None) for c in load.outputs]
        got = dict(zip(names, out))
        rows = [got[f"fp-lora{kind}-{i}"] for i in range(ui.LORA_ROWS) for kind in ("", "-weight")]
        assert rows == ["sub/late_one.safetensors", 0.65, "my_style.safetensors", -1.0, ui.LORA_NONE, 1.0,
                        ui.LORA_NONE, 1.0]  # the job's LoRAs in order, in the first rows  # fmt: skip
        assert (got["fp-lora-include"], got["fp-lora-exclude"]) == ("attn", "")
        assert "loras" not in out[-2]  # not carried as a hidden parameter: the picker holds them

        bad = _inputs(start, **{"fp-image": image, "fp-prompt": "x", "fp-lora-1": "missing.safetensors"})
        with pytest.raises(gr.Error, match=r"LoRA file not found: missing\.safetensors"):
            start.fn(*bad)
    finally:
        q.close()


def test_progress_text_shows_the_applied_loras(tmp_path, loras):
    """...after a cancel and a resume (the resumed run gets the same LoRA request as the first)."""
    from framepack.app import ui

    with _queue(tmp_path, loras, worker=True) as q:
        params = {**FAST, "seconds": 2.4, "loras": [{"path": "my_style.safetensors", "weight": 0.8}]}
        job = q.submit(png_bytes(), params)
        cancel_after_first_section(q, job.id)
        assert q.wait(job.id, 60).state == "cancelled"
        q.resume(job.id)
        done = q.wait(job.id, 120)
        assert any(e["type"] == "loras_applied" for e in q.events(job.id))  # the resumed run merged it again
        assert done.state == "done", done.error
        *_, desc, _bar, _end, session = ui._follow(q, {"jobs": [job.id]})
        assert desc.startswith("Finished:")
        assert "LoRA my\\_style.safetensors x0.8: kohya" in desc and "1 modules" in desc
        again = ui._follow(q, session)  # nothing changed: nothing re-sent, the lines are remembered
        assert again[2] is not None and session["shown"]["loras"]
        assert "LoRA" not in ui.progress_texts(done)[0]  # the lines come from the job's loras_applied event


def test_lora_paths_stay_inside_the_folder_when_the_job_runs(tmp_path, loras):
    """A record edited (or restored from an older version) to name a file outside the LoRA folder fails
    when it runs, with the reason; the server opens nothing outside the folder."""
    with _queue(tmp_path, loras, worker=False) as q:
        job = q.submit(png_bytes(), {**FAST, "loras": [{"path": "my_style.safetensors"}]})
    record = tmp_path / "outputs" / "jobs.sqlite3"
    import sqlite3

    db = sqlite3.connect(record)
    with db:
        request = json.loads(db.execute("SELECT request FROM jobs WHERE id = ?", (job.id,)).fetchone()[0])
        request["loras"] = [{"path": os.devnull, "weight": 1, "sha256": None}]
        db.execute("UPDATE jobs SET request = ? WHERE id = ?", (json.dumps(request), job.id))
    db.close()
    with _queue(tmp_path, loras, worker=True) as q:
        deadline = time.monotonic() + 120
        while not q.get(job.id).terminal and time.monotonic() < deadline:
            time.sleep(0.05)
        failed = q.get(job.id)
        assert failed.state == "failed" and "is not a file in the LoRA folder" in failed.error
