"""`framepack generate` on the tiny model: output, --from re-runs, and every bad input as one clear line."""

from __future__ import annotations

import json
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
    ]


def test_bad_inputs_one_clear_line_and_no_files(capsys, tmp_path, image):
    out_dir = tmp_path / "out"
    for args, message in _bad_inputs(tmp_path, image):
        full = ["--prompt", "a red square", "--out", str(out_dir), *args]
        code, _, err = _run(capsys, *full)
        assert code == 2, (args, err)
        assert err.startswith("error: ") and "Traceback" not in err, err
        assert __import__("re").search(message, err), (message, err)
        assert not out_dir.exists() or not any(out_dir.iterdir()), f"{args} left files behind"
