"""Scale-out on Ray: jobs/hour for 1 vs 2 workers, and what the Ray path costs per job and per section.

Side by side in one run, the same tiny-model jobs (64 px bucket, 2 sections each, distinct seeds):

1. in-process: the embedded queue's own runner (one worker thread, torch on all `--threads`);
2. Ray, 1 worker: one actor with all `--threads`;
3. Ray, 2 workers: two actors (two logical GPUs of a local `ray.init(num_gpus=2)`), the threads split
   between them.

Each configuration first runs one warm-up job per worker (actor start and model load are not timed),
then `--jobs` jobs submitted at once; wall time from the first submit to the last job's end. On this
2-core machine the two workers share the same two cores, so 2 workers cannot give 2x: what they gain
is that the single-threaded parts of a tiny job (Python between the small tensor ops, x264 with one
thread, the MP4 muxing) of one job overlap with the other job's; a job whose time is all in torch's
multi-threaded kernels would give ~1x. On a cluster each worker has its own GPU, so the jobs/hour add
up (minus the per-job overhead below).

4. The event round trip: a Ray actor streams `--events` StepProgress events (with a 64 x 64 RGB
   preview, as the engine's) through the same streaming-generator path the worker uses; ms per event,
   times the events one 25-step section sends (stage + 25 steps + decoding + section = 28).

    python benchmarks/scale_out.py [--jobs 6] [--steps 4] [--threads 2] [--events 500]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import ray
from apphelpers import png_bytes

from framepack.events import StepProgress
from framepack.jobs import JobQueue
from framepack.jobs.ray_runner import RayRunner, RaySettings
from framepack.pipeline import PipelineLoader

LOADER = PipelineLoader(device="cpu")


def run_jobs(folder: Path, runner, jobs: int, params: dict, warmups: int) -> tuple[float, float]:
    """(wall seconds for `jobs` jobs, sections made) on a queue with `runner` (None: in-process)."""
    q = JobQueue(folder, loader=LOADER, models=["tiny"], runner=runner)
    try:
        if runner is not None:
            assert q.runner.pool.wait_ready(q.runner.slots, 120), q.runner.pool.problems
        warm = [q.submit(png_bytes(seed=99 + i), {**params, "seed": 99 + i}).id for i in range(warmups)]
        assert all(q.wait(i, 300).state == "done" for i in warm)
        t0 = time.perf_counter()
        ids = [q.submit(png_bytes(seed=i), {**params, "seed": i}).id for i in range(jobs)]
        done = [q.wait(i, 600) for i in ids]
        wall = time.perf_counter() - t0
        assert all(j.state == "done" for j in done), [j.error for j in done]
        sections = sum(j.progress.get("sections_done", 0) for j in done)
        return wall, sections
    finally:
        q.close()


@ray.remote(num_cpus=0)
class Streamer:
    def stream(self, n: int):
        preview = np.zeros((64, 64, 3), np.uint8)
        for i in range(n):
            yield ("event", StepProgress(0, 1, i, n, 0, preview))


def event_round_trip(n: int) -> float:
    """ms per event over a Ray streaming generator (after one warm-up stream)."""
    actor = Streamer.remote()
    for ref in actor.stream.options(num_returns="streaming").remote(10):
        ray.get(ref)
    t0 = time.perf_counter()
    for ref in actor.stream.options(num_returns="streaming").remote(n):
        ray.get(ref)
    ms = (time.perf_counter() - t0) / n * 1000
    ray.kill(actor)
    return ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--events", type=int, default=500)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    home = tempfile.mkdtemp(prefix="framepack-scale-")
    os.environ["FRAMEPACK_HOME"] = home
    LOADER("tiny")  # the tiny model's files, before the workers look for them
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    params = {"prompt": "a red square slides", "steps": args.steps, "seconds": 3.0}
    rows = []
    try:
        for name, workers in (("in-process", None), ("Ray, 1 worker", 1), ("Ray, 2 workers", 2)):
            runner = None
            if workers:
                threads = max(1, args.threads // workers)
                runner = RayRunner.factory(LOADER, RaySettings(workers=workers, threads=threads))
            folder = Path(home) / f"out-{workers or 0}"
            wall, sections = run_jobs(folder, runner, args.jobs, params, warmups=workers or 1)
            rows.append((name, workers or 1, wall, sections))
            shutil.rmtree(folder, ignore_errors=True)
        per_event = event_round_trip(args.events)
    finally:
        ray.shutdown()
        shutil.rmtree(home, ignore_errors=True)
    base = rows[0][2]
    print(f"\n{args.jobs} tiny-model jobs (2 sections x {args.steps} steps, 64 px), {args.threads} torch threads "
          f"in all, on {os.cpu_count()} CPU cores")  # fmt: skip
    print(f"{'backend':<16} {'workers':>7} {'wall s':>8} {'jobs/hour':>10} {'s/section':>10} {'vs in-process':>14}")
    for name, workers, wall, sections in rows:
        print(f"{name:<16} {workers:>7} {wall:>8.2f} {args.jobs / wall * 3600:>10.0f} {wall / sections:>10.3f} "
              f"{base / wall:>13.2f}x")  # fmt: skip
    one, two = rows[1][2], rows[2][2]
    overhead = (one - base) / args.jobs * 1000
    print(f"2 workers vs 1: {one / two:.2f}x jobs/hour (both share these {os.cpu_count()} cores: only the "
          "single-threaded parts of the jobs overlap; with a GPU each they would add up)")  # fmt: skip
    print(f"Ray path overhead vs in-process, 1 worker: {overhead:+.0f} ms per job "
          f"({overhead / (rows[1][3] / args.jobs):+.0f} ms per section)")  # fmt: skip
    print(f"event round trip over a Ray streaming generator: {per_event:.2f} ms per event; a 25-step section "
          f"sends 28 events = {28 * per_event:.0f} ms per section")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
