"""`framepack generate` on the tiny model: output, --from re-runs, and every bad input as one clear line."""

from __future__ import annotations

import json
import re
import struct
import zlib

import numpy as np
import pytest
from conftest import assert_same_file
from PIL import Image

from framepack.app.cli import main
from framepack.video import probe


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FRAMEPACK_HOME", str(tmp_path_factory.getbasetemp() / "framepack-home-cli"))


@pytest.fixture
def image(tmp_path):
    x = np.full((80, 80, 3), 30, np.uint8)
    x[20:50, 10:40] = (220, 40, 40)
    path = tmp_path / "in.png"
    Image.fromarray(x).save(path)
    return str(path)


def _run(capsys, *args):
    code = main(["generate", "--model", "tiny", "--quiet", "--steps", "2", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_and_rerun_from_sidecar(capsys, image, tmp_path):
    code, out, _ = _run(
        capsys, "--image", image, "--prompt", "a red square", "--seconds", "2.4", "--out", str(tmp_path / "a")
    )
    assert code == 0 and "finished:" in out and "73 frames" in out
    (meta,) = (tmp_path / "a").glob("*.json")
    stored = json.loads(meta.read_text())
    assert stored["request"]["steps"] == 2 and stored["request"]["prompt"] == "a red square"
    code, out, _ = _run(capsys, "--from", str(meta), "--out", str(tmp_path / "b"))
    assert code == 0
    (first,), (second,) = (tmp_path / "a").glob("*.mp4"), (tmp_path / "b").glob("*.mp4")
    assert_same_file(first, second)  # same request + seed -> same video
    code, out, _ = _run(capsys, "--from", str(meta), "--seconds", "1", "--out", str(tmp_path / "c"))
    (third,) = (tmp_path / "c").glob("*.mp4")
    assert probe(third)["frames"] == 37  # flags override the stored request


def test_output_file_path(capsys, image, tmp_path):
    code, _, _ = _run(capsys, "--image", image, "--prompt", "x", "--seconds", "1", "--out", str(tmp_path / "v.mp4"))
    assert code == 0 and (tmp_path / "v.mp4").exists() and (tmp_path / "v.json").exists()


def _png_header_only(path, w, h):
    """A PNG whose header claims w x h pixels (no image data needed to be refused)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(data + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def _bad_inputs(tmp_path, image):
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (10, 10)).save(tmp_path / "tiny.png")
    _png_header_only(tmp_path / "huge.png", 30000, 30000)
    good = open(image, "rb").read()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "blocker").write_text("a file, not a folder")
    (tmp_path / "taken.mp4").write_bytes(b"somebody's video")
    (tmp_path / "dir.mp4").mkdir()
    (tmp_path / "latin1.json").write_bytes('{"request": {"prompt": "caf\xe9"}}'.encode("latin-1"))
    return [
        (["--image", str(tmp_path / "missing.png")], "not found"),
        (["--image", str(tmp_path / "notes.png")], "is not an image in a supported format"),
        (["--image", str(tmp_path / "cut.png")], "corrupt or truncated"),
        (["--image", str(tmp_path / "tiny.png")], "too small"),
        (["--image", str(tmp_path / "huge.png")], "too large"),
        (["--image", image, "--prompt", "   "], "prompt is empty"),
        (["--image", image, "--steps", "0"], "steps must be a number in 1..100"),
        (["--image", image, "--seconds", "0"], r"seconds must be a number in 0\.1\.\.3600"),
        (["--image", image, "--gs", "50"], "distilled_guidance must be a number in 1..32"),
        (["--image", image, "--crf", "60"], "crf must be a number in 0..51"),
        (["--image", image, "--window", "40"], "window must be a number in 1..33"),
        (["--image", image, "--rs", "2"], "cfg_rescale must be a number in 0..1"),
        (["--image", image, "--resolution", "100"], "base"),
        (["--image", image, "--out", str(tmp_path / "blocker" / "out")], "cannot write to output folder"),
        (["--image", image, "--from", str(tmp_path / "nope.json")], "cannot read"),
        (["--image", image, "--from", str(tmp_path / "latin1.json")], "is not a FramePack result"),  # not UTF-8
        (["--image", image, "--out", str(tmp_path / "taken.mp4")], "already exists; pass --overwrite"),
        (["--image", image, "--out", str(tmp_path / "dir.mp4")], "it is a folder"),
        (["--image", image, "--out", str(tmp_path / "x.webm")], "written as MP4"),  # not a folder called x.webm
        (["--image", image, "--out", "/dev/full"], "exists and is not a folder"),
    ]


def test_bad_inputs_one_clear_line_and_no_files(capsys, tmp_path, image):
    out_dir = tmp_path / "out"
    for args, message in _bad_inputs(tmp_path, image):
        full = ["--prompt", "a red square", "--out", str(out_dir), *args]
        code, _, err = _run(capsys, *full)
        assert code == 2, (args, err)
        assert err.startswith("error: ") and "Traceback" not in err, err
        assert re.search(message, err), (message, err)
        assert not out_dir.exists() or not any(out_dir.iterdir()), f"{args} left files behind"
    assert (tmp_path / "taken.mp4").read_bytes() == b"somebody's video" and not (tmp_path / "x.webm").exists()


def test_overwrite_replaces_a_video_only_once_the_new_one_is_complete(capsys, image, tmp_path):
    from framepack.config import GenerationRequest
    from framepack.events import CancelToken, StepProgress
    from framepack.pipeline import load_pipeline

    target = tmp_path / "v.mp4"
    assert _run(capsys, "--image", image, "--prompt", "x", "--seconds", "1.2", "--out", str(target))[0] == 0
    old = target.read_bytes()
    cancel = CancelToken()
    req = GenerationRequest(image=image, prompt="y", steps=2, seconds=2.4, output=str(target), overwrite=True)
    stop = lambda e: isinstance(e, StepProgress) and e.section == 1 and cancel.cancel()  # noqa: E731
    r = load_pipeline("tiny", device="cpu").generate(req, stop, cancel)
    assert r.status == "cancelled" and target.read_bytes() == old  # interrupted: the old video is untouched
    assert r.video == tmp_path / "v.partial.mp4" and probe(r.video)["frames"] == 33  # the new one's finished part
    code, out, _ = _run(capsys, "--image", image, "--prompt", "y", "--seconds", "2.4", "--out", str(target),
                        "--overwrite")  # fmt: skip
    assert code == 0 and probe(target)["frames"] == 73 and target.read_bytes() != old
    meta = json.loads((tmp_path / "v.json").read_text())
    assert meta["video"] == "v.mp4" and meta["frames"] == 73 and meta["request"]["prompt"] == "y"
    assert not (tmp_path / "v.partial.mp4").exists() and f"finished: {target}" in out


def test_an_input_is_never_the_output(capsys, image, tmp_path):
    clip = tmp_path / "clip.mp4"
    assert _run(capsys, "--image", image, "--prompt", "x", "--seconds", "1.2", "--out", str(clip))[0] == 0
    before = clip.read_bytes()
    for extra in ([], ["--overwrite"]):
        code, _, err = _run(capsys, "--model", "tiny-f1", "--video", str(clip), "--prompt", "x", "--out", str(clip),
                            *extra)  # fmt: skip
        assert code == 2 and "is this job's input (--video" in err, err
    assert clip.read_bytes() == before


def test_disk_full_is_one_line_and_the_sidecar_describes_the_file(capsys, image, tmp_path, monkeypatch):
    """ENOSPC while the finished MP4 is joined: a one-line error (how much space is free), and the sidecar
    describes what is left (the last snapshot, a playable video of the finished sections)."""
    import errno

    from framepack.video import SectionVideoWriter

    real = SectionVideoWriter._join

    def full(self, segments, dest, *, faststart):
        if faststart:  # the finished file; every snapshot before it was written
            raise OSError(errno.ENOSPC, "No space left on device", str(dest))
        return real(self, segments, dest, faststart=faststart)

    monkeypatch.setattr(SectionVideoWriter, "_join", full)
    code, _, err = _run(capsys, "--image", image, "--prompt", "x", "--seconds", "2.4", "--out", str(tmp_path / "o"))
    assert code == 1 and "Traceback" not in err
    assert re.search(r"error: generation failed: out of disk space in .*: [\d.]+ [MG]B free; this job needs about", err)
    (meta,) = (tmp_path / "o").glob("*.json")
    stored = json.loads(meta.read_text())
    video = tmp_path / "o" / stored["video"]
    assert stored["status"] == "failed" and "ENOSPC" not in stored["error"] and "No space left" in stored["error"]
    assert stored["frames"] == probe(video)["frames"] > 0 and f"{video} holds the {stored['frames']} frames" in err


def test_a_second_ctrl_c_stops_at_once_with_a_sidecar_and_one_line(capsys, image, tmp_path, monkeypatch):
    import os
    import signal

    from framepack.app import cli

    real = cli._Progress.__call__

    def presses(self, event):
        real(self, event)
        if type(event).__name__ == "StepProgress" and (event.section, event.step) == (1, 1):
            os.kill(os.getpid(), signal.SIGINT)  # cancel after this step ...
            os.kill(os.getpid(), signal.SIGINT)  # ... no: now

    monkeypatch.setattr(cli._Progress, "__call__", presses)
    code, _, err = _run(capsys, "--image", image, "--prompt", "x", "--seconds", "3.6", "--out", str(tmp_path / "o"))
    assert code == 130 and "Traceback" not in err and "interrupted: " in err, err
    (meta,) = (tmp_path / "o").glob("*.json")
    stored = json.loads(meta.read_text())
    assert stored["status"] == "cancelled" and stored["sections_done"] == 1
    assert stored["frames"] == probe(tmp_path / "o" / stored["video"])["frames"] == 33
