"""Frame edits (one-frame inference) through the app layers, on the tiny model: the job queue (an edit job
ends `done` with the same pixels as a direct `Pipeline.edit`, a resumed edit runs again, a re-run copies
its uploads), the HTTP API (multipart with a reference image and masks, the image route, the schema),
bad input refused at submission with the engine's words and nothing left behind, and the UI's Frame
edit tab (preset -> layout, painted masks, the gallery) without a browser."""

from __future__ import annotations

import dataclasses
import io
import json
import typing

import numpy as np
import pytest
from apphelpers import png_bytes, sse_events, tiny_loader
from fastapi.testclient import TestClient
from PIL import Image

from framepack.app.api import create_app
from framepack.app.progress import describe_progress
from framepack.config import EDIT_PRESETS, EditControl, EditRequest, RequestError, request_from_json
from framepack.images import ImageError
from framepack.jobs import CONTROL_UPLOADS, SERVER_FIELDS, JobQueue, upload_fields
from framepack.oneframe import read_settings

# gradio's own pandas calls warn under pandas 3; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"), pytest.mark.usefixtures("app_env")]

EDIT = {"kind": "edit", "prompt": "a red dress", "steps": 2}


def _queue(path, worker: bool = True) -> JobQueue:
    return JobQueue(path, loader=tiny_loader, models=["tiny", "tiny-f1"], start_worker=worker)


def _mask(size: int = 64, box: tuple[int, int, int, int] = (8, 8, 48, 40)) -> np.ndarray:
    """A grey mask: white (keep) inside `box` (top, left, bottom, right), black elsewhere."""
    m = np.zeros((size, size), np.uint8)
    top, left, bottom, right = box
    m[top:bottom, left:right] = 255
    return m


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ------------------------------------------------------------------------------------- the queue
def test_edit_job_equals_a_direct_edit_and_a_resumed_edit_runs_again(tmp_path):
    start, ref = png_bytes(seed=1), png_bytes(seed=2)
    params = {**EDIT, "preset": "kisekaeichi", "seed": 7, "controls": [{"index": 12}]}
    uploads = {"control_2": ref, "control_2_mask": _png(_mask()), "image_mask": _png(_mask(box=(0, 0, 64, 32)))}
    with _queue(tmp_path / "out") as q:
        job = q.submit(start, params, uploads=uploads)
        assert job.kind == "edit" and job.params() == {**job.params(), **params}  # what a client can send again
        assert job.request["controls"] == [{"image": "control_2.png", "index": 12, "mask": "control_2_mask.png"}]
        assert job.request["image_mask"] == "image_mask.png" and job.request["output"] == "edit.png"
        done = q.wait(job.id, 60)
        assert done.state == "done", done.error
        assert done.video is None and done.metadata == f"{job.id}/edit.json"
        assert done.result["kind"] == "edit" and done.result["image"] == f"{job.id}/edit.png" == done.output
        assert (done.result["width"], done.result["height"], done.result["seed"]) == (64, 64, 7)
        kinds = [e["type"] if e["type"] != "state" else e["state"] for e in q.events(job.id)]
        assert kinds[:2] == ["queued", "running"] and "step" in kinds and kinds[-1] == "done"
        assert describe_progress(done.progress).startswith("Frame edit")  # the front ends' wording
        image = q.job_file(job.id, "edit")
        stored, model = read_settings(image)  # the PNG carries its request, as the CLI writes it
        assert model == "tiny" and stored["kind"] == "edit" and stored["controls"][0]["index"] == 12
        sidecar = json.loads(q.job_file(job.id, "metadata").read_text())
        assert sidecar["image"] == "edit.png" and sidecar["request"]["preset"] == "kisekaeichi"
        record = json.loads((q.jobs_dir / job.id / "job.json").read_text())
        assert record["result"]["image"] == f"{job.id}/edit.png"

        # the same request, run directly on the same pipeline from the same files: the same pixels
        files = {name: tmp_path / f"{name}.png" for name in ("start", "ref", "ref_mask", "start_mask")}
        for name, data in zip(files, (start, ref, uploads["control_2_mask"], uploads["image_mask"])):
            files[name].write_bytes(data)
        direct = EditRequest(image=str(files["start"]), prompt=EDIT["prompt"], steps=2, seed=7, preset="kisekaeichi",
                             image_mask=str(files["start_mask"]), output=str(tmp_path / "direct.png"),
                             controls=(EditControl(str(files["ref"]), 12, str(files["ref_mask"])),))  # fmt: skip
        result = tiny_loader("tiny").edit(direct)
        assert np.array_equal(_pixels(result.image), _pixels(image))

    # An edit cancelled in the queue and resumed later simply runs again (stale files are replaced).
    with _queue(tmp_path / "out2", worker=False) as q:
        again = q.submit(start, params, uploads=uploads)
        q.cancel(again.id)
        (q.jobs_dir / again.id / "edit.png").write_bytes(b"left by an earlier attempt")
    with _queue(tmp_path / "out2") as q:
        assert q.get(again.id).resumable
        q.resume(again.id)
        done = q.wait(again.id, 60)
        assert done.state == "done", done.error
        assert np.array_equal(_pixels(q.job_file(again.id, "edit")), _pixels(result.image))


def test_rerun_of_an_edit_copies_its_uploads(tmp_path):
    uploads = {"control_2": png_bytes(seed=2), "control_2_mask": _png(_mask()), "image_mask": _png(_mask())}
    with _queue(tmp_path, worker=False) as q:
        first = q.submit(png_bytes(), {**EDIT, "preset": "kisekaeichi"}, uploads=uploads)
        rerun = q.rerun(first.id, {"seed": 5, "controls": [{"index": 20}]})
        assert rerun.parent == first.id and rerun.kind == "edit"
        assert rerun.params() == {**first.params(), "seed": 5, "controls": [{"index": 20}]}
        for name in ("input", "control_2", "control_2_mask", "image_mask"):
            a, b = (q.jobs_dir / j.id / f"{name}.png" for j in (first, rerun))
            assert a.read_bytes() == b.read_bytes(), name
        with pytest.raises(RequestError, match=r"controls lists 0 reference image\(s\) but 1 were uploaded"):
            q.rerun(first.id, {"controls": []})  # the reference is uploaded again: one index for it
        q.cancel(first.id)
    with _queue(tmp_path) as q:
        done = q.wait(rerun.id, 60)
        assert done.state == "done" and done.result["seed"] == 5 and q.job_file(rerun.id, "edit").is_file()


def test_bad_edits_are_refused_with_their_reason_and_leave_nothing(tmp_path):
    black = _png(np.zeros((64, 64), np.uint8))
    ref = {"control_2": png_bytes(seed=2)}
    with _queue(tmp_path, worker=False) as q:
        cases = [
            (EDIT, ref, {"model": "tiny-f1"}, RequestError, r"frame edits need the original \(inverted\) model"),
            ({**EDIT, "controls": [{"index": 9}]}, ref, {}, RequestError, "control 2 and target are both at index 9"),
            (EDIT, {**ref, "control_2_mask": black}, {}, RequestError,
             r"the mask of control 2 \(the uploaded control_2_mask\) is all black"),
            (EDIT, {"image_mask": black}, {}, RequestError, "the mask of the start image .* is all black"),
            ({**EDIT, "controls": [{"index": 10}]}, {}, {}, RequestError,
             r"controls lists 1 reference image\(s\) but 0 were uploaded"),
            (EDIT, {"control_3": png_bytes()}, {}, RequestError, "control_2, control_3, ... in order, without gaps"),
            (EDIT, {"control_2_mask": _png(_mask())}, {}, RequestError, "control_2_mask was uploaded without"),
            ({**EDIT, "controls": [{"index": 10, "image": "/etc/passwd"}]}, ref, {}, RequestError,
             r"\['image'\] cannot be given as parameters: upload the image as control_2"),
            ({**EDIT, "image_mask": "/etc/passwd"}, {}, {}, RequestError, "cannot be given as parameters"),
            ({**EDIT, "controls": [5]}, ref, {}, RequestError, r"controls\[0\] must be \{'index': N or null\}"),
            ({**EDIT, "seconds": 3}, {}, {}, RequestError, "do not apply to a frame edit"),
            ({**EDIT, "kind": "gif"}, {}, {}, RequestError, "unknown job kind 'gif'"),
            ({"prompt": "x"}, ref, {}, RequestError, r"unknown image uploads \['control_2'\] for a video job"),
            (EDIT, {"end_image": png_bytes()}, {}, RequestError, r"unknown image uploads \['end_image'\]"),
            (EDIT, {"control_2": b"not an image"}, {}, ImageError, "control_2: "),
        ]  # fmt: skip
        for params, uploads, kw, error, message in cases:
            with pytest.raises(error, match=message):
                q.submit(png_bytes(), params, uploads=uploads, **kw)
        assert q.list() == [] and list(q.jobs_dir.iterdir()) == []  # nothing queued, no folder left


def test_edit_path_fields_are_server_owned():
    """Every EditRequest field naming a file is the server's (uploads), and so is every path inside a
    control: a client gives a control's index only."""
    hints = typing.get_type_hints(EditRequest)
    for f in dataclasses.fields(EditRequest):
        if "str" in str(hints[f.name]) and any(w in f.name for w in ("image", "mask", "video", "path", "output")):
            assert f.name in SERVER_FIELDS, f.name
    control = typing.get_type_hints(EditControl)
    assert {f.name for f in dataclasses.fields(EditControl) if "str" in str(control[f.name])} == set(CONTROL_UPLOADS)
    assert "image_mask" in upload_fields("edit") and "control_2_mask" in upload_fields("edit")
    assert upload_fields() == ["end_image"]


# ------------------------------------------------------------------------------------- the API
def test_api_edit_with_a_reference_and_masks_returns_the_image(tmp_path):
    q = _queue(tmp_path / "outputs")
    try:
        with TestClient(create_app(q)) as client:
            files = {"image": ("start.png", png_bytes(seed=1), "image/png"),
                     "control_2": ("dress.png", png_bytes(seed=2), "image/png"),
                     "control_2_mask": ("dress-mask.png", _png(_mask()), "image/png"),
                     "image_mask": ("body-mask.png", _png(_mask(box=(0, 0, 64, 40))), "image/png")}  # fmt: skip
            params = {**EDIT, "preset": "kisekaeichi", "save_controls": True}
            r = client.post("/api/jobs", files=files, data={"params": json.dumps(params)})
            assert r.status_code == 201, r.text
            job = r.json()
            assert job["kind"] == "edit" and job["params"]["controls"] == [{"index": None}]  # the preset's index
            assert "image_mask" not in job["params"]
            events = sse_events(client, job["links"]["events"])
            assert events[-1]["data"]["state"] == "done", events[-1]
            done = client.get(f"/api/jobs/{job['id']}").json()
            assert done["links"]["video"] is None and done["links"]["result_png"] == f"/api/jobs/{job['id']}/result.png"
            assert done["result"]["image"] == f"{job['id']}/edit.png" and done["result"]["width"] == 64
            png = client.get(done["links"]["result_png"])
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            assert png.content == q.job_file(job["id"], "edit").read_bytes()
            assert client.get(f"/api/files/{done['result']['image']}").content == png.content
            assert len(done["result"]["controls"]) == 2  # save_controls: start image and reference as seen
            for rel in done["result"]["controls"]:
                assert client.get(f"/api/files/{rel}").content[:4] == b"\x89PNG"
            sidecar = client.get(done["links"]["sidecar"]).json()
            assert sidecar["request"]["kind"] == "edit" and sidecar["request"]["controls"][0]["index"] is None
            assert sidecar["layout"]["control 2"] == [10] and sidecar["layout"]["target"] == [1]  # kisekaeichi
            assert "is a frame edit" in client.get(f"/api/jobs/{job['id']}/video").json()["detail"]

            again = client.post(f"/api/jobs/{job['id']}/rerun", json={"params": {"controls": [{"index": 15}]}})
            assert again.status_code == 201, again.text
            assert again.json()["params"]["controls"] == [{"index": 15}]
            assert sse_events(client, again.json()["links"]["events"])[-1]["data"]["state"] == "done"

            video_params = json.dumps({"prompt": "x", "steps": 1, "seconds": 1})
            video = client.post("/api/jobs", files={"image": files["image"]}, data={"params": video_params}).json()
            r = client.get(f"/api/jobs/{video['id']}/result.png")
            assert r.status_code == 404 and "video job: it has no edited image" in r.json()["detail"]
            client.post(f"/api/jobs/{video['id']}/cancel")

            edit_params = client.get("/api/params", params={"kind": "edit"}).json()
            assert edit_params["kind"] == "edit" and edit_params["preset"] == "edit" and "seconds" not in edit_params
            assert "preset" not in client.get("/api/params").json()
            schema = client.get("/api/openapi.json").json()
            props = schema["components"]["schemas"]["EditParams"]["properties"]
            assert props["preset"]["enum"] == list(EDIT_PRESETS) and props["target_index"]["maximum"] == 100
            assert "image_mask" not in props and "/api/jobs/{job_id}/result.png" in schema["paths"]
            body = schema["paths"]["/api/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
            form = schema["components"]["schemas"][body["$ref"].split("/")[-1]]["properties"]
            assert {"end_image", "image_mask", "control_2", "control_2_mask", "control_5_mask"} <= set(form)
    finally:
        q.close()


def test_api_refuses_bad_edits_with_4xx(tmp_path):
    with _queue(tmp_path / "outputs", worker=False) as q, TestClient(create_app(q)) as client:

        def detail(params, model=None, **uploads):
            files = {"image": ("in.png", png_bytes(), "image/png"),
                     **{k: (f"{k}.png", v, "image/png") for k, v in uploads.items()}}  # fmt: skip
            data = {"params": json.dumps(params), **({"model": model} if model else {})}
            r = client.post("/api/jobs", files=files, data=data)
            assert r.status_code == 422, (params, r.status_code, r.text)
            return r.json()["detail"]

        ref = png_bytes(seed=2)
        assert "need the original (inverted) model" in detail(EDIT, "tiny-f1", control_2=ref)
        assert "control 2 and target are both at index 9" in detail({**EDIT, "controls": [{"index": 9}]}, control_2=ref)
        text = detail(EDIT, control_2=ref, control_2_mask=_png(np.zeros((64, 64), np.uint8)))
        assert "the uploaded control_2_mask) is all black" in text and str(q.jobs_dir) not in text
        assert "but 0 were uploaded" in detail({**EDIT, "controls": [{"index": 10}]})
        assert q.list() == [] and list(q.jobs_dir.iterdir()) == []


# ------------------------------------------------------------------------------------- the UI
def _handler(demo, elem_id: str, event: str = "click"):
    ids = {b.elem_id: i for i, b in demo.blocks.items() if getattr(b, "elem_id", None)}
    found = [f for f in demo.fns.values() if (ids[elem_id], event) in [tuple(t) for t in f.targets]]
    assert len(found) == 1, elem_id
    return found[0]


def _inputs(fn, values: dict) -> list:
    """The handler's arguments: each input widget's initial value, `values` by elem_id."""
    return [values.get(getattr(c, "elem_id", None) or "", getattr(c, "value", None)) for c in fn.inputs]


def test_ui_tab_queues_an_edit_with_the_presets_layout(tmp_path):
    import gradio as gr

    from framepack.app import ui

    with _queue(tmp_path, worker=False) as q:
        demo = ui.build(q)
        preset = _handler(demo, "fp-edit-preset", "input")
        names = [c.elem_id for c in preset.outputs]
        chosen = dict(zip(names, preset.fn("kisekaeichi")))
        assert chosen == {"fp-edit-target": 1, "fp-edit-no_2x": True, "fp-edit-no_4x": True, "fp-edit-no_post": True,
                          "fp-edit-ref-1-index": 10, "fp-edit-ref-2-index": None}  # fmt: skip
        assert dict(zip(names, preset.fn("edit")))["fp-edit-target"] == 9  # the window

        picture = np.full((64, 64, 3), 90, np.uint8)
        stroke = np.zeros((64, 64, 4), np.uint8)
        stroke[16:48, 8:40] = (255, 51, 102, 255)  # painted: what to keep
        start = _handler(demo, "fp-edit-start")
        values = {**chosen, "fp-edit-image": {"background": picture, "layers": [stroke], "composite": picture},
                  "fp-edit-ref-1": {"background": picture[::-1].copy(), "layers": [], "composite": None},
                  "fp-edit-prompt": "a red dress", "fp-edit-preset": "kisekaeichi", "fp-edit-steps": 2.0,
                  "fp-edit-seed": 11.0}  # fmt: skip
        args = _inputs(start, values)
        args[-1] = {"jobs": []}  # the tab's session state
        session, message = start.fn(*args)
        assert "Edit job" in message
        (job_id,) = session["jobs"]
        job = q.get(job_id)
        request = request_from_json(job.request)
        assert isinstance(request, EditRequest) and (request.seed, request.steps) == (11, 2)
        expected = EditRequest(image="x", prompt="x", preset="kisekaeichi", controls=(EditControl("r"),))
        assert request.layout() == expected.layout()  # the preset's target, indices and context switches
        mask = np.asarray(Image.open(q.jobs_dir / job_id / "image_mask.png"))
        assert mask.shape == (64, 64) and mask[16:48, 8:40].min() == 255 and mask.sum() == 255 * 32 * 32
        assert job.request["controls"][0]["mask"] is None  # nothing painted on the reference: no mask

        assert ui.queue_rows([job])[0][1] == "edit"
        assert "queue" in ui.edit_status(q, session) and ui.edit_gallery(q) == []
        with pytest.raises(gr.Error, match="painted mask and an uploaded one"):
            start.fn(*_inputs(start, {**values, "fp-edit-image-mask": str(tmp_path / "m.png")})[:-1], {"jobs": []})
        with pytest.raises(gr.Error, match="Upload a start image first"):
            start.fn(*_inputs(start, {**values, "fp-edit-image": None})[:-1], {"jobs": []})
        with pytest.raises(gr.Error, match="need the original"):
            start.fn(*_inputs(start, {**values, "fp-edit-model": "tiny-f1"})[:-1], {"jobs": []})
        with pytest.raises(gr.Error, match="is a frame edit"):
            _handler(demo, "fp-load").fn(job_id)  # the video form does not load an edit's settings
        assert len(q.list()) == 1
        q.cancel(job_id)
    with _queue(tmp_path) as q:  # run it: the gallery shows the finished edit, the status says so
        q.resume(job_id)
        assert q.wait(job_id, 60).state == "done"
        ((path, caption),) = ui.edit_gallery(q)
        assert path.endswith(f"{job_id}/edit.png") and caption.startswith(job_id)
        line = ui.edit_status(q, session)  # it replaces the submission's line, so it names the job the same way
        assert line.startswith(f"Edit job `{job_id}`") and "Finished: edited image 64x64" in line, line
        row = ui.history_rows(q.list())[0]
        assert row[:3] == [job_id, "edit", "done"] and row[9] == "64x64"
