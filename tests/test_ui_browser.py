"""The Gradio UI (framepack/app/ui.py) in a real browser: headless Chromium (Debian's `chromium`,
installed by .ci/run) driven by Playwright uploads an image, types a prompt, starts a job, sees the
progress text change and a playable <video>, queues a second job and cancels it from the queue panel.
A screenshot is saved to $FRAMEPACK_TEST_ARTIFACTS (default outputs/test-artifacts/ui_browser.png).
Also: the controls keep the official defaults and ranges, and settings round-trip through a job. In the
browser, the step cache selector moves the threshold slider to the chosen cache's default, and the Frame
edit tab queues a kisekaeichi edit (start and reference image, the preset's layout) whose image the
gallery shows (screenshot: ui_edit.png)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from apphelpers import FAST, ThreadServer, png_bytes, tiny_loader, wait_until
from PIL import Image

from framepack.app import ui
from framepack.app.api import create_app
from framepack.jobs import JobQueue

# gradio's own pandas calls warn under pandas 3; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"), pytest.mark.usefixtures("app_env")]

CHROMIUM = os.environ.get("FRAMEPACK_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("FRAMEPACK_TEST_ARTIFACTS", Path(__file__).parents[1] / "outputs" / "test-artifacts"))


RETENTION = "MagCache retention: the first share of the steps always computes"


def test_controls_have_the_official_defaults_and_ranges():
    c = {x.field: x for x in ui.CONTROLS}
    official = {  # spec §7: (label, default, min, max, step, hidden)
        "cache": ("Step cache", "teacache", None, None, None, False),  # the official "Use TeaCache" checkbox
        "cache_threshold": ("Step cache threshold", 0.15, 0, 1, 0.01, False),
        "negative_prompt": ("Negative Prompt", "", None, None, None, True),
        "seed": ("Seed", 31337, None, None, None, False),
        "seconds": ("Total Video Length (Seconds)", 5, 1, 120, 0.1, False),
        "window": ("Latent Window Size", 9, 1, 33, 1, True),
        "steps": ("Steps", 25, 1, 100, 1, False),
        "cfg": ("CFG Scale", 1.0, 1, 32, 0.01, True),
        "distilled_guidance": ("Distilled CFG Scale", 10.0, 1, 32, 0.01, False),
        "cfg_rescale": ("CFG Re-Scale", 0.0, 0, 1, 0.01, True),
        "preserved_memory_gb": ("GPU Inference Preserved Memory (GB) (larger means slower)", 6, 6, 128, 0.1, False),
        "crf": ("MP4 Compression", 16, 0, 51, 1, False),  # official max 100; x264 stops at 51
        "magcache_k": ("MagCache K: most consecutive steps skipped", 3, 1, 10, 1, True),
        "magcache_retention": (RETENTION, 0.2, 0, 1, 0.01, True),
    }
    assert "teacache" not in c and c["cache"].kind == "radio"
    for field, (label, default, lo, hi, step, hidden) in official.items():
        got = c[field]
        assert (got.label, got.initial(), got.minimum, got.maximum, got.step, got.advanced) == (
            label, default, lo, hi, step, hidden), field  # fmt: skip
    assert ui.QUICK_PROMPTS[0].startswith("The girl dances gracefully")


def test_settings_round_trip_through_a_job(tmp_path):
    controls = ui.CONTROLS
    with JobQueue(tmp_path, loader=tiny_loader, models=["tiny"], start_worker=False) as q:
        values = [c.initial() for c in controls]
        values[[c.field for c in controls].index("steps")] = 7.0  # sliders send floats
        values[[c.field for c in controls].index("preserved_memory_auto")] = False
        params, options = ui.collect(controls, values, base={"shift": 3.0, "image": "/etc/passwd"})
        assert params["steps"] == 7 and isinstance(params["steps"], int) and params["shift"] == 3.0
        assert "image" not in params and options == {"preserved_memory_gb": 6.0}
        job = q.submit(png_bytes(), {**params, "prompt": "x"}, options=options)
        loaded, rest = ui.settings_of(q.get(job.id), controls)
        assert loaded == [v if not isinstance(v, float) or not v.is_integer() else type(v)(v) for v in values]
        assert rest["shift"] == 3.0
        text, bar = ui.progress_texts(q.get(job.id))
        assert text.startswith("Queued") and "<progress" in bar


def _browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]' (CI installs it from pyproject.toml)")
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium (.ci/run does this)")
    return sync_playwright


@contextmanager
def _served_page(outputs: Path, screenshot: str) -> Iterator[tuple]:
    """(page, server URL, queue): headless Chromium on the page of a server for a tiny-model queue in
    `outputs`. However the test ends, a full-page screenshot goes to ARTIFACTS / `screenshot`, then the
    browser, the server and the queue (its unfinished jobs cancelled) are closed."""
    sync_playwright = _browser()
    queue = JobQueue(outputs, loader=tiny_loader, models=["tiny", "tiny-f1"])
    app = create_app(queue)
    ui.mount(app, queue)
    server = ThreadServer(app)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1300, "height": 1700})
            try:
                yield page, server.url, queue
            finally:
                page.screenshot(path=str(ARTIFACTS / screenshot), full_page=True)
                browser.close()
    finally:
        server.stop()
        for job in queue.list(["queued", "running"]):
            queue.cancel(job.id)
        queue.close()


def test_ui_in_a_real_browser(tmp_path):
    image = tmp_path / "start.png"
    image.write_bytes(png_bytes(size=96))
    with _served_page(tmp_path / "outputs", "ui_browser.png") as (page, url, queue):
        _drive(page, url, image, queue)
    assert (ARTIFACTS / "ui_browser.png").stat().st_size > 10_000


def _video_state(page) -> dict | None:
    return page.evaluate(
        "() => { const v = document.querySelector('#fp-video video');"
        " return v && v.src ? {src: v.src, ready: v.readyState, duration: v.duration, error: v.error} : null }"
    )


def _drive(page, url: str, image: Path, queue: JobQueue) -> None:
    page.goto(url + "/")
    page.wait_for_selector("#fp-start", timeout=30_000)
    page.locator("#fp-image input[type=file]").set_input_files(str(image))
    page.locator("#fp-image img").first.wait_for(state="visible", timeout=30_000)  # uploaded (slow under load)
    page.locator("#fp-prompt textarea").fill(FAST["prompt"])
    for field, value in (("seconds", "4.8"), ("steps", "2")):  # 4 sections of 2 steps
        box = page.locator(f"#fp-{field} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.wait_for_timeout(300)
    page.click("#fp-start")

    texts: list[str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # the progress text changes as the job advances
        text = page.locator("#fp-progress-desc").inner_text().strip()
        if text and (not texts or texts[-1] != text):
            texts.append(text)
        if "Section 2/4" in text:
            break
        page.wait_for_timeout(100)
    status = page.locator("#fp-status").inner_text()
    assert any("Section 1/4" in t for t in texts) and "Section 2/4" in texts[-1], (texts, status, queue.counts())
    assert "Total generated frames" in texts[-1]
    (first,) = queue.list(["running"])

    # A growing, playable video: the finished sections so far.
    growing = wait_until(lambda: (v := _video_state(page)) and v["ready"] >= 2 and v["duration"] > 0 and v, 60,
                         "a playable <video>", interval=0.2)  # fmt: skip
    assert growing["error"] is None

    # A second job while the first runs: it is queued; cancel it from the queue panel.
    status = page.locator("#fp-status")
    page.click("#fp-start")
    second = wait_until(lambda: next((j for j in queue.list() if j.id != first.id), None), 20, "a second job")
    wait_until(lambda: second.id in status.inner_text(), 10, "the page to name the second job")
    assert "is queued" in status.inner_text() or queue.get(second.id).state != "queued"
    wait_until(lambda: second.id in page.locator("#fp-queue-table").inner_text(), 20, "the queue panel to list it")
    page.locator("#fp-queue-pick input").click()
    page.get_by_role("option", name=second.id).click()
    page.click("#fp-queue-cancel")
    wait_until(lambda: queue.get(second.id).state == "cancelled", 30, "the second job to be cancelled")
    wait_until(lambda: "cancelled" in status.inner_text(), 10, "the cancel message")

    done = queue.wait(first.id, 120)
    assert done.state == "done", done.error
    final = wait_until(lambda: (v := _video_state(page)) and v["ready"] >= 2 and v["duration"] > 3.5 and v, 30,
                       "the final video in the page", interval=0.2)  # fmt: skip
    assert final["src"] != growing["src"]  # the page followed the video as it grew
    wait_until(lambda: "Finished" in page.locator("#fp-progress-desc").inner_text(), 10, "the finished text")
    assert page.locator("#fp-end").is_disabled()
    wait_until(lambda: first.id not in page.locator("#fp-queue-table").inner_text(), 10, "an empty queue panel")

    # History: the finished job with its parameters; "Load settings" fills the form from it.
    page.get_by_role("tab", name="History").click()
    wait_until(lambda: first.id in page.locator("#fp-history-table").inner_text(), 10, "the history table")
    page.locator("#fp-history-pick input").click()
    page.get_by_role("option", name=first.id).click()
    page.locator("#fp-prompt textarea").fill("something else")
    page.click("#fp-load")
    wait_until(lambda: page.locator("#fp-prompt textarea").input_value() == FAST["prompt"], 10, "loaded settings")
    assert page.locator("#fp-seconds input[type=number]").input_value() == "4.8"
    assert page.locator("#fp-cache input[value=teacache]").is_checked()
    page.screenshot(path=str(ARTIFACTS / "ui_history.png"), full_page=True)

    # The step cache selector: the threshold follows the chosen cache's default until the user moves it.
    threshold = page.locator("#fp-cache_threshold input[type=number]")
    assert float(threshold.input_value()) == 0.15
    page.locator("#fp-cache label", has_text="MagCache").click()
    wait_until(lambda: float(threshold.input_value()) == 0.1, 10, "the MagCache default threshold")
    page.locator("#fp-cache label", has_text="TeaCache").click()
    wait_until(lambda: float(threshold.input_value()) == 0.15, 10, "the TeaCache default threshold")
    threshold.fill("0.3")
    threshold.press("Enter")
    page.wait_for_timeout(300)
    page.locator("#fp-cache label", has_text="MagCache").click()
    page.wait_for_timeout(500)
    assert float(threshold.input_value()) == 0.3 and page.locator("#fp-cache input[value=magcache]").is_checked()


# [src, alt] of each loaded picture in the Frame edit gallery
GALLERY_IMAGES = ("() => [...document.querySelectorAll('#fp-edit-gallery img')]"
                  ".filter(i => i.complete && i.naturalWidth > 0).map(i => [i.src, i.alt])")  # fmt: skip


def test_frame_edit_tab_in_a_real_browser(tmp_path):
    start, reference = tmp_path / "start.png", tmp_path / "reference.png"
    start.write_bytes(png_bytes(size=96, seed=1))
    reference.write_bytes(png_bytes(size=96, seed=2))
    with _served_page(tmp_path / "outputs", "ui_edit.png") as (page, url, queue):
        page.goto(url + "/")
        page.wait_for_selector("#fp-start", timeout=30_000)
        page.get_by_role("tab", name="Frame edit").click()
        page.wait_for_selector("#fp-edit-start", state="visible", timeout=10_000)
        _upload_picture(page, "#fp-edit-image", start)

        # The preset sets the layout: kisekaeichi edits frame 1 with the reference at RoPE index 10.
        target = page.locator("#fp-edit-target input[type=number]")
        assert target.input_value() == "9"  # the "edit" preset's: the window
        page.locator("#fp-edit-preset input").click()
        page.get_by_role("option", name="kisekaeichi").click()
        wait_until(lambda: target.input_value() == "1", 10, "the kisekaeichi target index on the slider")
        assert page.locator("#fp-edit-target input[type=range]").input_value() == "1"
        for switch in ("no_2x", "no_4x", "no_post"):
            assert page.locator(f"#fp-edit-{switch} input[type=checkbox]").is_checked(), switch
        page.locator("#fp-edit-ref-1-box > button").click()  # the reference rows start folded
        assert page.locator("#fp-edit-ref-1-index input").input_value() == "10"
        _upload_picture(page, "#fp-edit-ref-1", reference)

        page.locator("#fp-edit-prompt textarea").fill("a red dress")
        steps = page.locator("#fp-edit-steps input[type=number]")
        steps.fill("2")
        steps.press("Enter")
        page.wait_for_timeout(300)
        page.click("#fp-edit-start")
        status = page.locator("#fp-edit-status")
        job = wait_until(lambda: next(iter(queue.list()), None), 20, "the edit job to be queued")
        wait_until(lambda: f"Edit job {job.id}" in status.inner_text(), 10, "the page to name the edit job")
        done = queue.wait(job.id, 60)
        assert done.state == "done", done.error

        # What the browser sent, as stored: an edit with the preset's layout and the one reference.
        request = done.request
        assert (request["kind"], request["preset"], request["target_index"]) == ("edit", "kisekaeichi", 1)
        assert (request["prompt"], request["steps"]) == ("a red dress", 2)
        assert request["controls"] == [{"image": "control_2.png", "index": 10, "mask": None}]
        assert request["image_mask"] is None  # nothing painted: the whole pictures count
        assert (request["no_2x"], request["no_4x"], request["no_post"]) == (True, True, True)
        result = queue.job_file(job.id, "edit")
        assert result.exists() and result.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(result) as im:
            assert im.size == (done.result["width"], done.result["height"])

        # The gallery shows that very image, loaded, captioned with the job id; the status says it finished.
        shown = wait_until(lambda: page.evaluate(GALLERY_IMAGES), 20, "an image in the edit gallery", interval=0.2)
        ((src, alt),) = shown
        assert src.endswith("/edit.png") and alt.startswith(job.id), shown
        assert page.request.get(src).body() == result.read_bytes()
        wait_until(lambda: "Finished" in status.inner_text(), 10, "the finished status line")
    assert (ARTIFACTS / "ui_edit.png").stat().st_size > 10_000


def _upload_picture(page, editor: str, path: Path) -> None:
    """Upload a picture into an empty gr.ImageEditor and wait until it holds it: its Pan tool, absent or
    disabled while the editor is empty, is enabled. The editor drops a file given before its canvas is
    set up, so first wait for its toolbar (the zoom level), which it shows once it is."""
    page.locator(f"{editor} .zoom-number").wait_for(state="visible", timeout=10_000)
    pan = page.locator(f"{editor} button[aria-label=Pan]:not([disabled])")
    assert pan.count() == 0, f"{editor} already holds a picture"
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(3):  # a file the editor drops (its canvas still settling) is given again
        page.locator(f"{editor} input[type=file]").set_input_files(str(path))
        try:
            pan.wait_for(state="visible", timeout=5_000 * (attempt + 1))
            return
        except PlaywrightTimeout:
            if attempt == 2:
                raise


# [loaded, caption] of each thumbnail in the section strip
STRIP_ITEMS = ("() => [...document.querySelectorAll('#fp-sections button.thumbnail-item')].map(b => {"
               " const i = b.querySelector('img'); return [!!(i && i.complete && i.naturalWidth > 0),"
               " b.innerText.trim() || (i && (i.alt || i.title)) || ''] })")  # fmt: skip


def test_branch_from_a_section_in_a_real_browser(tmp_path):
    """A finished 3-section video (the original model's tiny twin: generated back to front): picked in the
    History, its strip shows the 3 sections; clicking section 2 and "Re-roll from here" queues a branch
    that keeps section 1 (the end of the video) with a new seed; it finishes, and the History names it a
    branch of its parent. Screenshots: ui_branch_reroll.png (the branch queued), ui_branch.png (the branch
    picked)."""
    with _served_page(tmp_path / "outputs", "ui_branch.png") as (page, url, queue):
        parent = queue.submit(png_bytes(size=96), {**FAST, "seconds": 3.6})  # 3 sections of 2 steps
        page.goto(url + "/")
        page.wait_for_selector("#fp-start", timeout=30_000)
        done = queue.wait(parent.id, 60)
        assert done.state == "done", done.error
        assert [r["section"] for r in queue.sections(parent.id)] == [1, 2, 3]

        page.get_by_role("tab", name="History").click()
        wait_until(lambda: parent.id in page.locator("#fp-history-table").inner_text(), 10, "the history table")
        page.locator("#fp-history-pick input").click()
        page.get_by_role("option", name=parent.id).click()
        items = wait_until(lambda: (i := page.evaluate(STRIP_ITEMS)) and len(i) == 3 and all(x[0] for x in i) and i,
                           20, "the strip's 3 loaded thumbnails", interval=0.2)  # fmt: skip
        frames = [r["frames"] for r in queue.sections(parent.id)]
        assert [c for _, c in items] == [f"section {k} · frames {a}–{b}" for k, (a, b) in enumerate(frames, 1)]
        assert "from its end back to its start" in page.locator("#fp-sections-note").inner_text()
        assert page.locator("#fp-reroll").is_disabled()  # nothing selected yet

        page.locator("#fp-sections button.thumbnail-item").nth(1).click()  # section 2
        selected = page.locator("#fp-section-selected")
        wait_until(lambda: "Section 2 selected" in selected.inner_text(), 10, "the selected section's text")
        assert "keeps sections 1..1" in selected.inner_text() and page.locator("#fp-reroll").is_enabled()
        wait_until(lambda: [c for _, c in page.evaluate(STRIP_ITEMS)][1].startswith(ui.SELECTED_MARK), 10,
                   "the selected thumbnail's mark")  # fmt: skip
        page.click("#fp-reroll")

        branch = wait_until(lambda: next((j for j in queue.list() if j.branch), None), 10, "the branch job")
        info = branch.branch
        assert (info["parent"], info["at"], branch.parent) == (parent.id, 1, parent.id)
        old, new = info["changed"]["seed"]
        assert old == done.request["seed"] and new != old and set(info["changed"]) == {"seed"}
        status = page.locator("#fp-branch-status")
        line = f"Branch {branch.id} queued: keeps sections 1..1 of {parent.id}"
        wait_until(lambda: line in status.inner_text(), 10, "the branch's status line")
        page.screenshot(path=str(ARTIFACTS / "ui_branch_reroll.png"), full_page=True)
        finished = queue.wait(branch.id, 60)
        assert finished.state == "done", finished.error
        assert finished.result["frames"] == done.result["frames"]
        wait_until(lambda: f"Branch of {parent.id} @1 (seed)" in page.locator("#fp-progress-desc").inner_text(), 10,
                   "the Video tab following the branch")  # fmt: skip
        table = page.locator("#fp-history-table")
        wait_until(lambda: f"branch of {parent.id} @1 (seed)" in table.inner_text(), 10, "the branch in the History")

        # Picked in the History, the branch shows its own 3 sections and says where it comes from.
        page.locator("#fp-history-pick input").click()
        page.get_by_role("option", name=branch.id).click()
        title = page.locator("#fp-sections-title")
        wait_until(lambda: f"branch of {parent.id} @1 (seed)" in title.inner_text(), 10, "the branch's strip title")
        wait_until(lambda: len(page.evaluate(STRIP_ITEMS)) == 3, 10, "the branch's 3 sections")
        details = page.locator("#fp-history-params")  # the job's details (gr.JSON puts each token on a line)
        wait_until(lambda: f'"from":"branch of {parent.id} @1 (seed)"' in details.inner_text().replace("\n", ""), 10,
                   "the branch's details")  # fmt: skip
