"""MagCache (framepack.models.caches) and its calibration (framepack.cachetables).

Decisions for recorded ratio sequences against tables worked out by hand from the rules (retention,
K, the 0.06 guard, per-section reset, per-pass state with real CFG); skipped calls against a
hand-computed residual reuse; threshold 0 against no cache, bit for bit; calibration round trips.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_same_file

from framepack.cachetables import calibrate, find_table, save_table
from framepack.config import GenerationRequest
from framepack.models.caches import MAGCACHE_RATIOS, BlockStack, MagCache, MagCalibrator, resample_ratios
from framepack.registry import get_spec

C, S = True, False


def _stack(step: int, seed: int = 0):
    """A fake block stack: hidden (1, 4, 3); the 'blocks' return rows 1..3 of 2 * hidden + step."""
    g = torch.Generator().manual_seed(100 * seed + step)
    hidden = torch.randn(1, 4, 3, generator=g)
    rows = slice(1, 3)
    return BlockStack(None, hidden, torch.zeros(1, 3), rows, lambda: hidden[:, rows] * 2 + step)


def _run(cache: MagCache, steps: int, passes=("cond",), sections: int = 1) -> list[list[bool]]:
    out = []
    for _ in range(sections):
        cache.reset(steps)
        for step in range(steps):
            for p in passes:
                cache.select(step, p)
                cache(_stack(step))
        out.append([c for (_, _, c) in cache.log])
    return out


GAMMAS = (1.0, 1.3, 1.02, 1.03, 0.99, 1.0, 0.9, 1.01, 1.01, 0.8)
# steps 0-1: retention (int(0.2 * 10) = 2); 2: ratio 1.02, err .02 -> skip; 3: ratio 1.0506, err .0706 ->
# skip; 4: ratio 1.0401, err .1107 > .1 -> compute (reset); 5: err 0 -> skip; 6: gamma 0.9 fails the 0.06
# guard -> compute; 7, 8: err .01, .0301 -> skip; 9: the last step computes.
EXPECTED = [C, C, S, S, C, S, C, S, S, C]


def test_decisions_follow_the_hand_computed_table():
    [got] = _run(MagCache(GAMMAS, threshold=0.1, k=2, retention=0.2), 10)
    assert got == EXPECTED


def test_k_limits_consecutive_skips_and_retention_keeps_early_steps():
    ones = (1.0,) * 10
    [k2] = _run(MagCache(ones, threshold=0.1, k=2, retention=0.2), 10)
    assert k2 == [C, C, S, S, C, S, S, C, S, C]  # err stays 0: only K stops the skipping
    [k1] = _run(MagCache(ones, threshold=0.1, k=1, retention=0.5), 10)
    assert k1 == [C, C, C, C, C, S, C, S, C, C]  # int(0.5 * 10) = 5 steps kept


def test_state_resets_per_section_and_is_kept_per_pass():
    cache = MagCache(GAMMAS, threshold=0.1, k=2, retention=0.2)
    sections = _run(cache, 10, passes=("cond", "uncond"), sections=2)
    for log in sections:  # each pass follows the table on its own (one shared counter would drift)
        assert log[0::2] == EXPECTED and log[1::2] == EXPECTED
    report = cache.report()
    assert report["sections"] == [{"computed": 10, "skipped": 10}] * 2
    assert (report["calls"], report["computed"]) == (40, 20)


def test_a_skipped_call_reuses_the_last_computed_residual():
    cache = MagCache((1.0,) * 6, threshold=0.5, k=5, retention=0.0)
    cache.reset(6)
    last_residual = None
    for step in range(6):
        cache.select(step, "cond")
        stack = _stack(step)
        out = cache(stack)
        rows = stack.hidden[:, stack.rows]
        if step in (0, 5):  # computed: the blocks' own output
            assert torch.equal(out, rows * 2 + step)
            last_residual = out - rows
        else:  # skipped: this call's input rows + the residual of step 0
            assert torch.equal(out, rows + last_residual)
    assert [c for _, _, c in cache.log] == [C, S, S, S, S, C]


def test_resampling_by_nearest_index():
    table = tuple(float(i) for i in range(25))
    assert resample_ratios(table, 25) == table
    # i * 24 / 9 rounded: 0, 2.67, 5.33, 8, 10.67, 13.33, 16, 18.67, 21.33, 24
    assert resample_ratios(table, 10) == (0.0, 3.0, 5.0, 8.0, 11.0, 13.0, 16.0, 19.0, 21.0, 24.0)
    assert resample_ratios(table, 1) == (0.0,)
    assert len(MAGCACHE_RATIOS["inverted"]) == len(MAGCACHE_RATIOS["forward"]) == 25


def _image() -> np.ndarray:
    x = np.zeros((64, 96, 3), np.uint8)
    x[..., 1] = np.linspace(0, 255, 96, dtype=np.uint8)[None]
    x[20:40, 30:60] = (200, 40, 90)
    return x


def _req(out, **kw) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a square moves", "steps": 8, "seconds": 2.4, "output": str(out), **kw})


def test_threshold_zero_is_no_cache_bitwise(pipe, tmp_path):
    none = pipe.generate(_req(tmp_path / "none.mp4", cache="none"), image=_image())
    zero = pipe.generate(_req(tmp_path / "zero.mp4", cache="magcache", cache_threshold=0.0), image=_image())
    assert_same_file(none.video, zero.video)
    cache = json.loads(zero.metadata.read_text())["step_cache"]
    assert cache["name"] == "magcache" and cache["computed"] == cache["calls"] == 16
    assert cache["sections"] == [{"computed": 8, "skipped": 0}] * 2


def test_magcache_skips_and_reports_per_section(pipe, tmp_path):
    r = pipe.generate(_req(tmp_path / "m.mp4", cache="magcache", cache_threshold=0.3, cfg=3.0), image=_image())
    cache = json.loads(r.metadata.read_text())["step_cache"]
    assert cache["table"].startswith("official original table")  # tiny has no calibrated table
    sections = cache["sections"]
    assert len(sections) == 2 and sum(s["computed"] for s in sections) == cache["computed"]
    assert sum(s["computed"] + s["skipped"] for s in sections) == cache["calls"] == 32  # cfg 3: 2 calls a step
    assert 0 < cache["computed"] < cache["calls"]
    tea = pipe.generate(_req(tmp_path / "t.mp4", cache="teacache"), image=_image())
    tcache = json.loads(tea.metadata.read_text())["step_cache"]
    assert tcache["name"] == "teacache" and tcache["threshold"] == 0.15
    assert sum(s["computed"] for s in tcache["sections"]) == tcache["computed"]
    off = pipe.generate(_req(tmp_path / "o.mp4", cache="magcache", teacache=False), image=_image())
    assert json.loads(off.metadata.read_text())["step_cache"] is None  # the old switch still turns it off


def test_calibration_round_trip(pipe, tmp_path):
    path, ratios = calibrate(pipe, image=_image(), steps=8, folder=tmp_path, prompt="a square moves")
    assert len(ratios) == 8 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    record = json.loads(path.read_text())
    assert (record["model"], record["steps"], record["width"], record["height"]) == ("tiny", 8, 96, 64)
    found, source = find_table(get_spec("tiny"), 64, 96, 8, folders=[tmp_path])
    assert found == ratios and source == f"calibrated {path.name}"
    # measured again on a run of the same section, the ratios are the table's (and a second calibration
    # writes the same table)
    calibrator = MagCalibrator()
    again = _req(tmp_path / "again.mp4", seconds=1.2, cache="none", seed=0)
    pipe.generate(again, image=_image(), step_cache=calibrator)
    assert calibrator.table() == ratios
    a, _ = calibrate(pipe, image=_image(), steps=8, folder=tmp_path / "b", prompt="a square moves")
    assert json.loads(a.read_text())["ratios"] == list(ratios)


def test_find_table_takes_the_nearest_then_the_official(tmp_path):
    spec = get_spec("tiny")
    save_table(tmp_path, "tiny", "inverted", 64, 64, 25, (1.0, 0.5))
    save_table(tmp_path, "tiny", "inverted", 256, 256, 25, (1.0, 0.7))
    save_table(tmp_path, "other", "inverted", 96, 96, 10, (1.0, 0.9))
    (tmp_path / "broken.json").write_text("{not json")
    assert find_table(spec, 64, 64, 25, folders=[tmp_path]) == ((1.0, 0.5), "calibrated tiny-64x64-25steps.json")
    ratios, source = find_table(spec, 224, 224, 10, folders=[tmp_path])
    assert ratios == (1.0, 0.7) and "nearest to 224x224, 10 steps" in source
    ratios, source = find_table(get_spec("f1"), 640, 640, 25, folders=[tmp_path])
    assert ratios == MAGCACHE_RATIOS["forward"] and source.startswith("official F1 table")


def test_shipped_toy_tables_are_found():
    for model in ("toy", "toy-f1"):
        ratios, source = find_table(get_spec(model), 64, 64, 25)
        assert len(ratios) == 25 and source.startswith("calibrated") and ratios[0] == 1.0


def test_cli_reports_the_cache(home, tmp_path, capsys):
    from framepack.app.cli import main

    assert main(["generate", "--model", "tiny", "--prompt", "x", "--steps", "6", "--seconds", "2.4", "--cache",
                 "magcache", "--cache-threshold", "0.3", "--out", str(tmp_path), "--quiet"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "step cache magcache (threshold 0.3, K 3, retention 0.2, table: official original table" in err
    assert "per section computed+skipped:" in err
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--model", "tiny", "--prompt", "x", "--cache", "mag", "--out", str(tmp_path)])
    assert stop.value.code == 2 and "invalid choice: 'mag'" in capsys.readouterr().err
