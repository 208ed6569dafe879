"""The UI's branching helpers (framepack/app/ui.py) without a browser: where a job comes from in words
(`lineage`, the History's "from" column), the section strip's captions and the selected section's text,
the status line of a queued branch by schedule, the re-roll seed, the prompt and continue inputs; and the
handlers' refusals (nothing to pause, nothing to branch from, no section picked) as messages, not
tracebacks. The browser flow (pick, click a thumbnail, re-roll, the branch finishing) is in
tests/test_ui_browser.py."""

from __future__ import annotations

import gradio as gr
import pytest
from apphelpers import png_bytes, tiny_loader

from framepack.app import ui
from framepack.jobs import Job, JobQueue

# gradio's own pandas calls warn under pandas 3; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"), pytest.mark.usefixtures("app_env")]


def _job(**fields) -> Job:
    base = dict(id="child", state="done", model="tiny", request={"prompt": "a cat", "seed": 7, "seconds": 3.6},
                options={}, created=0.0, started=None, finished=None, position=None, progress={}, result={},
                error=None, video=None, metadata=None, parent=None, resumable=False)  # fmt: skip
    return Job(**{**base, **fields})


BRANCH = {"parent": "mom", "parent_video": "mom/video.mp4", "at": 2, "changed": {"seed": [7, 99], "prompt": ["a", "b"]},
          "parent_branch": None}  # fmt: skip
# Three finished sections of the original model (back to front): section 1 is the end of the video.
ROWS = [{"section": 1, "video_index": 2, "frames": [73, 108], "reroll": True, "after": True},
        {"section": 2, "video_index": 1, "frames": [37, 72], "reroll": True, "after": True},
        {"section": 3, "video_index": 0, "frames": [0, 36], "reroll": False, "after": True}]  # fmt: skip


def test_lineage_names_the_parent_in_the_history_and_the_progress_text():
    branch, rerun, plain = _job(parent="mom", branch=BRANCH), _job(parent="mom"), _job()
    assert ui.lineage(branch) == "branch of mom @2 (seed, prompt)"
    assert ui.lineage(_job(parent="mom", branch={**BRANCH, "changed": {}})) == "branch of mom @2 (no changes)"
    assert (ui.lineage(rerun), ui.lineage(plain)) == ("re-run of mom", "")
    column = ui.HISTORY_HEADERS.index("from")
    assert [r[column] for r in ui.history_rows([branch, rerun, plain])] == [ui.lineage(branch), "re-run of mom", ""]
    assert len(ui.history_rows([plain])[0]) == len(ui.HISTORY_HEADERS)
    assert "Branch of mom @2 (seed, prompt)." in ui.progress_texts(branch)[0]
    paused = ui.progress_texts(_job(state="paused", progress={"sections_done": 2}))[0]
    assert paused.startswith("Paused. 2 section(s) finished.") and "Resume it from the History tab" in paused


def test_the_strip_says_where_a_section_is_and_what_a_branch_from_it_keeps():
    assert [ui.section_caption(r) for r in ROWS] == ["section 1 · frames 73–108", "section 2 · frames 37–72",
                                                     "section 3 · frames 0–36"]  # fmt: skip
    assert [ui.video_part(r, ROWS) for r in ROWS] == ["the end of the video", "part 2 of 3", "the start of the video"]
    assert ui.video_part(ROWS[0], ROWS[:1]) == "the whole video so far"
    first = ui.section_summary(ROWS[0], ROWS)
    assert first.startswith("Section 1 selected: frames 73–108 (2.43–3.63 s), the end of the video.")
    assert "keeps nothing: it makes the whole video again" in first
    second = ui.section_summary(ROWS[1], ROWS)
    assert "keeps sections 1..1 (frames 73–108) and makes section 2 on again" in second
    pruned = ui.section_summary(ROWS[2], ROWS)
    assert "cannot be re-rolled" in pruned and "pruned" in pruned and "A branch from here" not in pruned
    assert ui.schedule_of("tiny") == "inverted" and ui.schedule_of("tiny-f1") == "forward"
    assert ui.schedule_of("no-such-model") is None
    assert "section 1 is the end" in ui.SCHEDULE_NOTES["inverted"]
    assert "section 1 is the start" in ui.SCHEDULE_NOTES["forward"]


def test_branch_status_line_by_schedule():
    line = ui.branch_status(_job(id="kid", parent="mom", branch=BRANCH, state="queued", position=1))
    assert line.startswith("Branch `kid` queued: keeps sections 1..2 of `mom` (the end of the video); changes seed ")
    assert "seed 7 → 99; prompt a → b (#2 in the queue)" in line
    f1 = ui.branch_status(_job(id="kid", model="tiny-f1", branch=BRANCH, state="queued", position=0))
    assert "keeps sections 1..2 of `mom` (the start of the video)" in f1
    none = ui.branch_status(_job(id="kid", branch={**BRANCH, "at": 0}, state="queued", position=0))
    assert "keeps none of `mom`'s sections (makes the whole video again)" in none


def test_reroll_prompt_and_continue_inputs():
    assert all(ui.new_seed(7) != 7 and 0 <= ui.new_seed(7) < 2**31 for _ in range(50))
    job = _job()
    assert ui.prompt_change(job, "a dog") == {"prompt": "a dog"}
    with pytest.raises(ValueError, match="the job's own prompt"):
        ui.prompt_change(job, "a cat")
    assert ui.continue_seconds(job) == 8.6
    assert ui.continue_seconds(_job(request={"seconds": 3599.0})) == 3600.0


def _handler(demo, elem_id: str, event: str = "click"):
    ids = {b.elem_id: i for i, b in demo.blocks.items() if getattr(b, "elem_id", None)}
    found = [f for f in demo.fns.values() if (ids[elem_id], event) in [tuple(t) for t in f.targets]]
    assert len(found) == 1, elem_id
    return found[0]


def test_handlers_refuse_with_a_message(tmp_path):
    with JobQueue(tmp_path, loader=tiny_loader, models=["tiny", "tiny-f1"], start_worker=False) as q:
        job = q.submit(png_bytes(), {"prompt": "x", "steps": 2, "seconds": 1.2})  # queued: no video yet
        demo = ui.build(q)
        session = {"jobs": [job.id]}
        paused = _handler(demo, "fp-pause").fn(session)
        assert paused == f"job {job.id} is queued: only a running job can be paused"
        assert _handler(demo, "fp-pause").fn({"jobs": []}) == "No job to pause."
        text, *_ = _handler(demo, "fp-continue").fn(job.id, 6.2, session)
        assert text.startswith(f"Cannot branch job `{job.id}`: ")
        text, *_ = _handler(demo, "fp-reroll").fn(None, "", session)
        assert text == "Pick a section of the strip first."
        text, *_ = _handler(demo, "fp-branch-prompt").fn({"job": job.id, "section": 1}, "x", session)
        assert "the job's own prompt" in text  # checked before the queue is asked
        assert [j.id for j in q.list()] == [job.id]  # nothing was queued
        view = ui._strip(q, job.id, None, {})
        assert view[0] == [] and "none to branch from" in view[1] and view[-1]["rows"][2] == []
        assert ui._strip(q, job.id, None, view[-1])[:7] == [gr.skip()] * 7  # nothing changed: nothing sent


def test_pause_button_pauses_the_running_job_and_the_strip_shows_its_sections(tmp_path):
    from apphelpers import wait_until

    with JobQueue(tmp_path, loader=tiny_loader, models=["tiny", "tiny-f1"]) as q:
        demo = ui.build(q)
        job = q.submit(png_bytes(), {"prompt": "x", "steps": 2, "seconds": 4.8})  # 4 sections
        session = {"jobs": [job.id]}
        wait_until(lambda: q.get(job.id).state == "running", 60, "the job to run")
        button, session = ui._pause_button(q, session)
        assert button == gr.update(interactive=True) and ui._pause_button(q, session)[0] == gr.skip()
        assert _handler(demo, "fp-pause").fn(session).startswith(f"Pausing job `{job.id}` after its current section")
        paused = q.wait(job.id, 60)
        assert paused.state == "paused" and paused.resumable
        assert ui._pause_button(q, session)[0] == gr.update(interactive=False)
        view = ui._strip(q, job.id, None, {})
        done = len(q.sections(job.id))
        assert 1 <= done < 4 and len(view[0]) == done and f"(paused, {done} finished)" in view[1]
        assert view[6] == gr.update(interactive=True)  # Continue; Re-roll waits for a section to be picked
        assert view[4] == gr.update(interactive=False) and view[3] == "Click a section to branch from it."
        picked = ui._strip(q, job.id, {"job": job.id, "section": 1}, view[-1])
        assert picked[0] == gr.skip() and picked[3].startswith("Section 1 selected") and picked[4]["interactive"]
