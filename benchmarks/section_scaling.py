"""Constant cost per section: per-section wall time and peak RSS for videos of 2, 10 and 50 sections.

FramePack's promise is that section 50 costs what section 2 cost, in time and in memory: the context
is a fixed size, decoding touches only the newest latents, and the MP4 writer encodes each frame once
(the official re-encodes the whole video after every section and keeps every frame in RAM).

Runs the built-in tiny family (random weights) at 256x256 pixels - large enough that keeping every
frame would show (50 sections = 1801 frames = 354 MB as uint8, 1.4 GB as float) - each video length
in its own process so peak RSS is that run's own.

    python benchmarks/section_scaling.py [--model tiny-f1] [--lengths 2 10 50] [--steps 25]

The first section of either schedule decodes fewer latents (33 or 37 frames instead of 69), and the
original schedule's last section adds the start frame, so "early" is the mean of sections 2-4 and
"late" the mean of the last three regular sections; raw first/last times are printed too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def worker(model: str, sections: int, steps: int, resolution: int, out: str) -> None:
    import numpy as np
    from PIL import Image

    from framepack.config import GenerationRequest
    from framepack.events import SectionDone, StageStarted
    from framepack.pipeline import load_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="fp-scaling-"))
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((resolution, resolution, 3)) * 255).astype(np.uint8)).save(tmp / "start.png")
    pipe = load_pipeline(model, device="cpu")
    seconds = sections * 36 / 30
    request = GenerationRequest(image=str(tmp / "start.png"), prompt="a ball bounces", steps=steps, seconds=seconds,
                                resolution=resolution, output=str(tmp / "out"), teacache=False)  # fmt: skip
    marks: list[float] = []

    def on_event(e) -> None:
        if isinstance(e, StageStarted) and e.stage == "sampling" and e.section == 0:
            marks.append(time.perf_counter())
        elif isinstance(e, SectionDone):
            marks.append(time.perf_counter())

    base = _hwm()
    result = pipe.generate(request, on_event)
    times = [b - a for a, b in itertools.pairwise(marks)]
    Path(out).write_text(json.dumps({"times": times, "peak_rss": _hwm(), "rss_after_load": base,
                                     "frames": result.frames, "video_bytes": result.video.stat().st_size}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-f1", choices=["tiny", "tiny-f1"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2, 10, 50])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--worker", nargs=2, metavar=("SECTIONS", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.model, int(a.worker[0]), a.steps, a.resolution, a.worker[1])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = {}
    for n in a.lengths:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--model", a.model, "--steps", str(a.steps),
                   "--resolution", str(a.resolution), "--worker", str(n), f.name]  # fmt: skip
            subprocess.run(cmd, check=True)
            runs[n] = json.loads(Path(f.name).read_text())
        t = runs[n]["times"]
        print(f"  {n:3d} sections: {runs[n]['frames']} frames, {sum(t):.1f} s, peak RSS "
              f"{runs[n]['peak_rss'] / 2**20:.0f} MiB", flush=True)  # fmt: skip

    regular_end = -1 if a.model == "tiny" else None  # the original schedule's last section adds a frame
    print(f"\nsection scaling, {a.model} at {a.resolution}x{a.resolution}, {a.steps} steps, CPU")
    print(f"{'sections':>8s} {'frames':>7s} {'first s':>8s} {'early s':>8s} {'late s':>8s} {'last s':>8s} "
          f"{'late/early':>10s} {'peak RSS MiB':>13s} {'MP4 KiB':>8s}")  # fmt: skip
    for n, r in runs.items():
        t = r["times"]
        regular = t[1:regular_end] if len(t) > 2 else t
        early = statistics.mean(regular[:3])
        late = statistics.mean(regular[-3:])
        print(f"{n:8d} {r['frames']:7d} {t[0]:8.2f} {early:8.2f} {late:8.2f} {t[-1]:8.2f} {late / early:10.3f} "
              f"{r['peak_rss'] / 2**20:13.0f} {r['video_bytes'] / 1024:8.0f}")  # fmt: skip
    lo, hi = min(runs), max(runs)
    print(f"peak RSS({hi})/peak RSS({lo}) = {runs[hi]['peak_rss'] / runs[lo]['peak_rss']:.3f}")


if __name__ == "__main__":
    main()
