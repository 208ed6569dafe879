"""The step cache choice in the app layers, on the tiny model and without a browser: the UI's cache
selector and threshold slider (each choice -> the request fields and the engine's cache, the default
threshold following the selector, old records loading as "none" or TeaCache, a finished job's
computed / skipped line), and the HTTP API (the new fields in /api/params and the schema, a bad cache
refused with the engine's words)."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from apphelpers import FAST, cancel_after_first_section, png_bytes, tiny_loader
from fastapi.testclient import TestClient

from framepack.app import ui
from framepack.app.api import create_app
from framepack.config import CACHE_NAMES, GenerationRequest
from framepack.jobs import JobQueue, build_request
from framepack.models.caches import MagCache, TeaCache, make_step_cache

# gradio's own pandas calls warn under pandas 3; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"), pytest.mark.usefixtures("app_env")]

CACHE_KEYS = ("cache", "cache_threshold", "magcache_k", "magcache_retention")  # absent from older records


def _values(**changes):
    """The page's widget values (CONTROLS order): initial values, `changes` by field."""
    return [changes.get(c.field, c.initial()) for c in ui.CONTROLS]


def _handler(demo, elem_id: str, event: str = "click"):
    ids = {b.elem_id: i for i, b in demo.blocks.items() if getattr(b, "elem_id", None)}
    return [f for f in demo.fns.values() if (ids[elem_id], event) in [tuple(t) for t in f.targets]]


def _inputs(fn, **values):
    """The handler's arguments: each input widget's initial value, `values` by elem_id."""
    return [values.get(getattr(c, "elem_id", None) or "", getattr(c, "value", None)) for c in fn.inputs]


# ------------------------------------------------------------------------------------- the controls
def test_selector_and_sliders_come_from_the_request_fields():
    c = {x.field: x for x in ui.CONTROLS}
    assert "teacache" not in c and "teacache_threshold" not in c  # replaced by the selector and its threshold
    assert c["cache"].kind == "radio" and not c["cache"].advanced and c["cache"].initial() == "teacache"
    assert c["cache"].shown_choices() == [("TeaCache", "teacache"), ("MagCache", "magcache"), ("none", "none")]
    assert [v for _, v in c["cache"].shown_choices()] == list(CACHE_NAMES)
    got = {f: (c[f].minimum, c[f].maximum, c[f].step, c[f].initial(), c[f].advanced)
           for f in ("cache_threshold", "magcache_k", "magcache_retention")}  # fmt: skip
    assert got == {"cache_threshold": (0, 1, 0.01, 0.15, False), "magcache_k": (1, 10, 1, 3, True),
                   "magcache_retention": (0, 1, 0.01, 0.2, True)}  # fmt: skip
    # the slider's defaults are what the engine does with cache_threshold None
    for name, cls in (("teacache", TeaCache), ("magcache", MagCache)):
        engine = make_step_cache(GenerationRequest(cache=name))
        assert isinstance(engine, cls) and engine.threshold == ui.CACHE_THRESHOLDS[name], name


@pytest.mark.parametrize("choice", ["teacache", "magcache", "none"])
@pytest.mark.parametrize("loaded", [{}, {"teacache": False}, {"teacache": True, "cache": "magcache"}])
def test_each_choice_becomes_the_request_fields(choice, loaded):
    """...whatever a loaded job's hidden parameters said (`base`)."""
    values = _values(cache=choice, cache_threshold=0.27, magcache_k=5.0, magcache_retention=0.3)
    params, _ = ui.collect(ui.CONTROLS, values, base=loaded)
    assert params["cache"] == choice and params["teacache"] is (choice != "none")
    assert params["cache_threshold"] == 0.27 and params["magcache_k"] == 5 and isinstance(params["magcache_k"], int)
    assert params["magcache_retention"] == 0.3
    engine = make_step_cache(build_request({**params, "prompt": "x"}))  # what the job will run with
    if choice == "none":
        assert engine is None
    else:
        assert engine.name == choice and engine.threshold == 0.27
    if choice == "magcache":
        assert (engine.k, engine.retention) == (5, 0.3)


def test_threshold_follows_the_selector_until_the_user_moves_it():
    assert ui.switched_threshold("magcache", 0.15) == 0.10
    assert ui.switched_threshold("teacache", 0.10) == 0.15
    assert ui.switched_threshold("teacache", 0.15) == 0.15
    assert ui.switched_threshold("magcache", 0.3) == 0.3  # moved: kept
    assert ui.switched_threshold("none", 0.15) == 0.15  # nothing to default to


def test_the_page_wires_the_switch_to_user_picks_only(tmp_path):
    """On `.input` (a user's pick), not `.change`: Load settings sets the selector too, and must keep the
    loaded threshold."""
    with JobQueue(tmp_path, loader=tiny_loader, models=["tiny"], start_worker=False) as q:
        demo = ui.build(q)
        (picked,) = _handler(demo, "fp-cache", "input")
        assert not _handler(demo, "fp-cache", "change")
        assert [w.elem_id for w in picked.inputs] == ["fp-cache", "fp-cache_threshold"]
        assert [w.elem_id for w in picked.outputs] == ["fp-cache_threshold"]
        assert picked.fn("magcache", 0.15) == 0.10
        radio = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "fp-cache")
        assert radio.value == "teacache" and [v for _, v in radio.choices] == list(CACHE_NAMES)


# ------------------------------------------------------------------------------------- load settings
def test_cache_settings_of_old_and_new_requests():
    assert ui.cache_settings({"teacache": False, "teacache_threshold": 0.1}) == ("none", 0.1)
    assert ui.cache_settings({"teacache": False, "cache": "magcache", "cache_threshold": 0.2}) == ("none", 0.2)
    assert ui.cache_settings({"teacache": True, "teacache_threshold": 0.1}) == ("teacache", 0.1)  # before `cache`
    assert ui.cache_settings({}) == ("teacache", 0.15)
    assert ui.cache_settings({"cache": "magcache", "cache_threshold": None}) == ("magcache", 0.10)
    assert ui.cache_settings({"cache": "magcache", "cache_threshold": 0.05}) == ("magcache", 0.05)
    assert ui.cache_settings({"cache": "teacache", "cache_threshold": None, "teacache_threshold": 0.2}) == (
        "teacache", 0.2)  # fmt: skip
    assert ui.cache_settings({"cache": "none"}) == ("none", 0.15)


def _old_record(q_dir, job_id: str, **fields) -> None:
    """Rewrite a stored job as a version before the cache selector wrote it (no `cache` fields)."""
    db = sqlite3.connect(q_dir / "jobs.sqlite3")
    with db:
        request = json.loads(db.execute("SELECT request FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
        request = {k: v for k, v in request.items() if k not in CACHE_KEYS} | fields
        db.execute("UPDATE jobs SET request = ? WHERE id = ?", (json.dumps(request), job_id))
    db.close()


def test_load_settings_of_old_jobs_and_start_again(tmp_path):
    out = tmp_path / "outputs"
    with JobQueue(out, loader=tiny_loader, models=["tiny"], start_worker=False) as q:
        off = q.submit(png_bytes(), {**FAST, "teacache": False}).id
        tea = q.submit(png_bytes(), {**FAST, "teacache_threshold": 0.1}).id
        mag = q.submit(png_bytes(), {**FAST, "cache": "magcache", "magcache_k": 2}).id
    _old_record(out, off, teacache=False)
    _old_record(out, tea, teacache=True, teacache_threshold=0.1)
    with JobQueue(out, loader=tiny_loader, models=["tiny"], start_worker=False) as q:
        demo = ui.build(q)
        (load,) = _handler(demo, "fp-load")
        (start,) = _handler(demo, "fp-start")
        names = [getattr(c, "elem_id", None) for c in load.outputs]
        expected = {off: ("none", 0.15, False), tea: ("teacache", 0.1, True), mag: ("magcache", 0.10, True)}
        for job_id, (choice, threshold, teacache) in expected.items():
            loaded = load.fn(job_id)
            got, rest = dict(zip(names, loaded)), loaded[-2]
            assert (got["fp-cache"], got["fp-cache_threshold"]) == (choice, threshold), job_id
            assert not set(rest) & {"teacache", "teacache_threshold", *CACHE_KEYS}  # the cache widgets hold them
            # Start Generation with the loaded form: the same cache as the loaded job
            form = {k: v for k, v in got.items() if k and k.startswith("fp-") and k != "fp-image"}
            args = _inputs(start, **form, **{"fp-image": np.full((64, 64, 3), 90, np.uint8)})
            args[-1] = rest  # base_params: the loaded job's parameters without a widget
            session, _, _ = start.fn(*args)
            stored = q.get(session["jobs"][-1]).request
            assert (stored["cache"], stored["cache_threshold"], stored["teacache"]) == (choice, threshold, teacache)
            assert stored["magcache_k"] == (2 if job_id == mag else 3)
            if job_id == off:
                assert make_step_cache(GenerationRequest.from_json_dict(stored)) is None


# ------------------------------------------------------------------------------------- the result
def test_finished_job_shows_what_the_cache_computed_and_skipped(tmp_path):
    with JobQueue(tmp_path, loader=tiny_loader, models=["tiny-f1"], start_worker=True) as q:
        job = q.submit(png_bytes(), {**FAST, "steps": 6, "cache": "teacache", "cache_threshold": 0.15})
        done = q.wait(job.id, 120)
        assert done.state == "done", done.error
        sidecar = json.loads(q.job_file(job.id, "metadata").read_text())
        cache = sidecar["step_cache"]
        (section,) = cache["sections"]
        assert section["computed"] + section["skipped"] == cache["calls"] and section["skipped"] > 0
        line = ui.cache_summary(sidecar)
        assert line == (f"Step cache TeaCache (threshold 0.15): {cache['computed']}/{cache['calls']} forward calls "
                        f"computed, {section['skipped']} skipped; per section computed+skipped: "
                        f"{section['computed']}+{section['skipped']}")  # fmt: skip
        *_, desc, _bar, _end, _ = ui._follow(q, {"jobs": [job.id]})
        assert desc.startswith("Finished:") and desc.endswith(ui._md_escape(line))
        demo = ui.build(q)
        (pick,) = _handler(demo, "fp-history-pick", "change")
        _video, info, _files = pick.fn(job.id)
        assert info["step_cache"] == cache

        off = q.wait(q.submit(png_bytes(), {**FAST, "cache": "none"}).id, 120)
        assert off.state == "done" and ui.cache_summary(json.loads(q.job_file(off.id, "metadata").read_text())) is None
        *_, desc, _bar, _end, _ = ui._follow(q, {"jobs": [off.id]})
        assert "Step cache" not in desc
    mag = {"name": "magcache", "threshold": 0.1, "k": 3, "retention": 0.2, "calls": 8, "computed": 6,
           "sections": [{"computed": 4, "skipped": 1}, {"computed": 2, "skipped": 1}]}  # fmt: skip
    assert ui.cache_summary({"step_cache": mag}) == (
        "Step cache MagCache (threshold 0.1, K 3, retention 0.2): 6/8 forward calls computed, 2 skipped; "
        "per section computed+skipped: 4+1, 2+1")  # fmt: skip
    assert ui.cache_summary(None) is None and ui.cache_summary({"step_cache": None}) is None


def test_the_line_follows_a_resumed_job_to_its_new_end(tmp_path):
    """Cancelled after section 1 of 3, then resumed: the page shows the new end's sidecar (the resumed
    run's sections), not the line it read at the cancel."""
    with JobQueue(tmp_path, loader=tiny_loader, models=["tiny"], start_worker=True) as q:
        job = q.submit(png_bytes(), {**FAST, "seconds": 3.6, "cache": "magcache"})
        cancel_after_first_section(q, job.id)
        assert q.wait(job.id, 60).state == "cancelled"
        *_, first, _bar, _end, session = ui._follow(q, {"jobs": [job.id]})
        assert first.startswith("Cancelled.") and "Step cache MagCache" in first
        q.resume(job.id)
        assert q.wait(job.id, 120).state == "done"
        *_, desc, _bar, _end, session = ui._follow(q, session)
        line = ui.cache_summary(json.loads(q.job_file(job.id, "metadata").read_text()))
        assert desc.startswith("Finished:") and desc.endswith(ui._md_escape(line))
        assert not first.endswith(ui._md_escape(line))  # a different run: other sections


# ------------------------------------------------------------------------------------- API
def test_api_offers_the_cache_fields_and_refuses_a_bad_cache(tmp_path):
    with JobQueue(tmp_path, loader=tiny_loader, models=["tiny"], start_worker=False) as q, \
            TestClient(create_app(q)) as client:  # fmt: skip
        defaults = client.get("/api/params").json()
        assert {k: defaults[k] for k in CACHE_KEYS + ("teacache", "teacache_threshold")} == {
            "cache": "teacache", "cache_threshold": None, "magcache_k": 3, "magcache_retention": 0.2,
            "teacache": True, "teacache_threshold": 0.15}  # fmt: skip
        props = client.get("/api/openapi.json").json()["components"]["schemas"]["JobParams"]["properties"]
        assert props["cache"]["enum"] == list(CACHE_NAMES) and props["cache"]["default"] == "teacache"
        assert (props["cache_threshold"]["minimum"], props["cache_threshold"]["maximum"]) == (0, 1)
        assert (props["magcache_k"]["minimum"], props["magcache_k"]["maximum"]) == (1, 25)
        assert (props["magcache_retention"]["minimum"], props["magcache_retention"]["maximum"]) == (0, 1)

        def submit(**params):
            files = {"image": ("in.png", png_bytes(), "image/png")}
            return client.post("/api/jobs", files=files, data={"params": json.dumps({**FAST, **params})})

        for bad, message in ((dict(cache="mag"), "cache must be one of teacache, magcache, none, got 'mag'"),
                             (dict(cache=None), "cache must be text, got None"),
                             (dict(cache_threshold=1.5), "cache_threshold must be a number in 0..1, got 1.5"),
                             (dict(magcache_k=0), "magcache_k must be a number in 1..25, got 0"),
                             (dict(magcache_k=2.5), "magcache_k must be a whole number, got 2.5"),
                             (dict(magcache_retention=-0.1), "magcache_retention must be a number in 0..1"),
                             ):  # fmt: skip
            r = submit(**bad)
            assert r.status_code == 422 and message in r.json()["detail"], (bad, r.status_code, r.text)
        assert q.list() == []
        r = submit(cache="magcache", cache_threshold=0.2, magcache_k=4, magcache_retention=0.1)
        assert r.status_code == 201, r.text
        stored = {k: r.json()["params"][k] for k in CACHE_KEYS}
        assert stored == {"cache": "magcache", "cache_threshold": 0.2, "magcache_k": 4, "magcache_retention": 0.1}
