"""Quality of the trained toy model on held-out toy-world scenes whose ground truth we know.

Three measurements (see issue 7 and README "Training and the toy model"):

1. Motion accuracy. For held-out scenes (seeds never used in training) the model gets the scene's
   first frame and caption and generates the clip's length; a colour tracker follows the object in
   the generated video and in the ground truth. Reported per schedule: mean centroid error in pixels
   per frame, the fraction of clips whose early motion (before the first bounce, read between the
   first and the last frame where the object is found) points within 45 degrees of the true
   direction, and the fraction of frames where the object was lost.
2. Drift over long videos (30 s and 60 s). The object's colour (median of its pixels), its size
   (square root of its area) and the background colour (pixels away from the object) are measured in
   the first and in the last section and compared with the scene's truth, for the inverted (original)
   schedule, the forward (F1) schedule, and a no-anti-drifting baseline: forward sampling with only
   the recent past as context (the start frame's latent and image embedding zeroed in every
   section, the mode the trainer samples with `no_start_probability`).
3. Cost: seconds per section and the peak RSS of section 1 vs section 50 of a 60 s video.

    python benchmarks/toy_quality.py [--scenes 24] [--drift-scenes 4] [--steps 25] [--cfg 3] [--quick]

Uses the packaged `toy` / `toy-f1` models (framepack/toy, or $FRAMEPACK_TOY_DIR). The measurements
themselves are framepack.train.quality's (tested in tests/test_toy_quality.py); this script runs the
models and prints the tables.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framepack.train.quality import SECTION_FRAMES, appearance, held_out_scenes, motion_metrics, vae_round_trip

VAE_ROW = "truth through the VAE (bound)"
TOY_CFG = 3.0  # real CFG: the toy model was trained with 10% caption dropout and reads the caption better with it


@dataclass
class Generated:
    frames: np.ndarray  # (T, H, W, 3) uint8
    section_seconds: list[float]
    section_peak_rss: list[int]


class Runner:
    """Loads each toy pipeline once and generates from a first frame + caption."""

    def __init__(self, steps: int, cfg: float = 1.0) -> None:
        self.steps, self.cfg, self.pipes = steps, cfg, {}
        self.tmp = Path(tempfile.mkdtemp(prefix="fp-toyq-"))

    def pipe(self, model: str):
        from framepack.pipeline import load_pipeline

        if model not in self.pipes:
            self.pipes[model] = load_pipeline(model, device="cpu", prompt_cache_dir=self.tmp / "prompts")
        return self.pipes[model]

    def generate(self, model: str, first: np.ndarray, caption: str, sections: int, *, seed: int,
                 no_start: bool = False) -> Generated:  # fmt: skip
        import torch

        from framepack.config import GenerationRequest
        from framepack.events import SectionDone, StageStarted
        from framepack.video import read_frames

        pipe = self.pipe(model)
        request = GenerationRequest(
            prompt=caption, seconds=sections * SECTION_FRAMES / 30, steps=self.steps, seed=seed,
            resolution=first.shape[0], output=str(self.tmp / f"{model}-{seed}-{sections}-{no_start}"),
            teacache=False, crf=0, cfg=self.cfg,
        )  # fmt: skip
        times, peaks, t = [], [], [0.0]

        def reset_hwm() -> None:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

        def on_event(e) -> None:
            if isinstance(e, StageStarted) and e.stage == "sampling":
                t[0] = time.perf_counter()
                reset_hwm()
            elif isinstance(e, SectionDone):
                times.append(time.perf_counter() - t[0])
                with open("/proc/self/status") as f:
                    peaks.append(next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM")))

        hook = None
        if no_start:  # the baseline: recent past only, no start frame in the context or the image embedding

            def strip_start(module, args, kwargs):
                kwargs = dict(kwargs)
                clean = kwargs["clean_latents"].clone()
                clean[:, :, 0] = 0
                kwargs["clean_latents"] = clean
                kwargs["image_embeddings"] = torch.zeros_like(kwargs["image_embeddings"])
                return args, kwargs

            hook = pipe.c.transformer.register_forward_pre_hook(strip_start, with_kwargs=True)
        try:
            result = pipe.generate(request, on_event, image=first)
        finally:
            if hook is not None:
                hook.remove()
        return Generated(read_frames(result.video), times, peaks)


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=24, help="held-out scenes for motion accuracy")
    ap.add_argument(
        "--first-scene",
        type=int,
        default=0,
        help="skip this many motion scenes: e.g. 24 gives a fresh set, never used to choose a model",
    )
    ap.add_argument("--motion-sections", type=int, default=2, help="length of the motion clips (sections)")
    ap.add_argument(
        "--drift-scenes",
        type=int,
        default=4,
        help="held-out scenes for the 30 s / 60 s drift runs (0: motion accuracy only)",
    )
    ap.add_argument("--lengths", type=int, nargs="+", default=[30, 60], help="drift video lengths, seconds")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=TOY_CFG, help="real CFG scale (the toy model's recommended setting)")
    ap.add_argument("--quick", action="store_true", help="4 scenes, 1 drift scene, 6 s and 12 s (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.scenes, args.drift_scenes, args.lengths = 4, 1, [6, 12]
    import torch

    from framepack.registry import packaged_dir
    from framepack.train import toyfamily

    toy_root = packaged_dir("toy")  # a clear message if it is not packaged
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    run = Runner(args.steps, args.cfg)
    print(f"# {args.steps} steps per section, real CFG {args.cfg:g}, distilled guidance 10, no TeaCache")
    t0 = time.perf_counter()

    # 1. motion accuracy
    print(f"# motion accuracy: {args.scenes} held-out scenes from no. {args.first_scene}, "
          f"{args.motion_sections} sections ({args.motion_sections * SECTION_FRAMES + 1} frames) each",
          flush=True)  # fmt: skip
    motion, scenes = {}, held_out_scenes(args.scenes, args.motion_sections, first=args.first_scene)
    vae = toyfamily.load_vae(toy_root).float().eval()
    for model in ("toy", "toy-f1", VAE_ROW):
        rows = []
        for i, clip in enumerate(scenes):
            if model == VAE_ROW:
                frames = vae_round_trip(vae, clip.frames)
            else:
                seed = args.first_scene + i  # scene k always gets seed k
                frames = run.generate(model, clip.frames[0], clip.caption, args.motion_sections, seed=seed).frames
            rows.append(motion_metrics(frames, clip))
        judged = [r["direction_ok"] for r in rows if r["direction_ok"] is not None]
        motion[model] = {"error": _mean(r["error"] for r in rows), "lost": _mean(r["lost"] for r in rows),
                         "direction": sum(judged) / max(1, len(judged)), "judged": len(judged)}  # fmt: skip
    print("| model | mean centroid error (px/frame) | direction correct | frames lost |")
    print("| --- | --- | --- | --- |")
    for model, m in motion.items():
        print(f"| {model} | {m['error']:.2f} | {m['direction']:.0%} of {m['judged']} | {m['lost']:.1%} |")
    print(flush=True)

    # 2. drift + 3. cost
    modes = (("inverted (toy)", "toy", False), ("forward (toy-f1)", "toy-f1", False),
             ("no anti-drifting baseline", "toy-f1", True))  # fmt: skip
    cost = None
    if args.drift_scenes > 0:
        print(f"# drift: {args.drift_scenes} held-out scenes; first vs last section (RGB units, size relative)")
        print("| length | mode | object colour err first -> last | size err first -> last | "
              "background err first -> last |")  # fmt: skip
        print("| --- | --- | --- | --- | --- |")
    else:
        args.lengths = []  # motion accuracy only
    for seconds in args.lengths:
        sections = round(seconds * 30 / SECTION_FRAMES)
        scenes = held_out_scenes(args.drift_scenes, sections, plain_size=True)
        for label, model, no_start in modes:
            first, last = [], []
            for i, clip in enumerate(scenes):
                gen = run.generate(model, clip.frames[0], clip.caption, sections, seed=100 + i, no_start=no_start)
                first.append(appearance(gen.frames[1 : 1 + SECTION_FRAMES], clip.scene))
                last.append(appearance(gen.frames[-SECTION_FRAMES:], clip.scene))
                if cost is None and sections >= 50 and model == "toy-f1" and not no_start:
                    cost = gen
            f = {k: _mean(d[k] for d in first) for k in first[0]}
            la = {k: _mean(d[k] for d in last) for k in last[0]}
            print(f"| {seconds} s ({sections} sections) | {label} | {f['color']:.1f} -> {la['color']:.1f} | "
                  f"{f['size']:.2f} -> {la['size']:.2f} | {f['background']:.1f} -> {la['background']:.1f} |",
                  flush=True)  # fmt: skip
    print()
    if cost is not None:
        s, p = cost.section_seconds, cost.section_peak_rss
        print("# cost (toy-f1, 60 s video, 64x64)")
        print("| section | seconds | peak RSS (MiB) |")
        print("| --- | --- | --- |")
        for k in (0, 1, len(s) - 2, len(s) - 1):
            print(f"| {k + 1} | {s[k]:.2f} | {p[k] / 2**20:.0f} |")
        print(f"section 50 / section 2: time {s[-1] / s[1]:.2f}x, peak RSS {p[-1] / p[1]:.3f}x")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
