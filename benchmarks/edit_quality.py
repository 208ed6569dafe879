"""Does a one-frame edit move the toy object the way the prompt says, and by how much?

One-frame inference (framepack.oneframe) asks the original-schedule model for a single latent frame
at RoPE time index `target_index` = k with the start image as clean context at index 0. Latent k
stands for about 4k pixel frames after the start (the VAE is 4x in time), so on toy-world scenes,
whose truth we know, the edited frame can be compared with the true frame 4k.

Scenes: held-out toy-world clips (framepack.train.quality.held_out_scenes, never used in training)
whose object moves (the caption names a direction), starts in the left half of the frame (x < 32)
and does not bounce before frame 37, so the displacement over frames 0..36 is a straight line.

Per scene and k (3, 6, 9) the edit's displacement is the colour tracker's centroid in the edited
frame minus its centroid in the start frame (framepack.train.toyworld.track); the truth's is
truth.centers[4k] - truth.centers[0]. Reported per method and k:

  * mean |true| and mean |pred| displacement (px)
  * mean error |pred - true| (px)
  * along: mean of pred . true / |true|^2 (1 = exactly right, 0 = did not move, < 0 = backwards)
  * dir ok: the share of scenes whose displacement points within 45 degrees of the true one (an
    object that is lost, or does not move, counts as wrong)
  * lost: the share of scenes where the object is not found in the output (error and along are over
    the others)

`--side right` takes scenes starting in the right half instead (their motion is mostly leftward: a
check that a method is not simply biased to the right). `--lora FILE` adds the same edits with a LoRA
(e.g. framepack/toy/loras/one-frame.safetensors, trained on one-frame samples); `--lora-only` leaves
out the plain edits.

Methods: the edit with the default layout (post + 2x + 4x zero context) and with --no-2x --no-4x, at
each --cfgs value; two references on the same scenes: "no motion" (pred = 0, error = |true|), and the
model's ordinary video (one 37-frame section, same seed, CFG 3, as benchmarks/toy_quality.py makes it)
read at frame 4k and tracked the same way. No step cache anywhere; scene no. n gets seed n.

    python benchmarks/edit_quality.py [--scenes 24] [--cfgs 3 1] [--steps 25] [--threads 1]
                                      [--png benchmarks/edit_quality.png] [--quick] [--side left|right]
                                      [--lora FILE [--lora-only]]

The figure shows a few scenes: start frame, the default-layout edits at k = 3, 6, 9 (first CFG), the
truth at frames 12, 24, 36 and the video at the same frames.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_quality import TOY_CFG, Runner  # the toy-quality code path: pipelines, video request, reading back

from framepack.train.quality import SECTION_FRAMES, held_out_scenes
from framepack.train.toyworld import track

TARGETS = (3, 6, 9)
MODEL = "toy"  # the original (inverted) schedule: one-frame inference is an original-model feature
COS45 = math.cos(math.radians(45))


@dataclass(frozen=True)
class Method:
    label: str
    kind: str  # "edit" | "video" | "still"
    cfg: float = TOY_CFG
    no_extra: bool = False  # edit with no_2x=True, no_4x=True
    lora: str | None = None  # edit with this LoRA at weight 1 (e.g. one trained on one-frame samples)


@dataclass
class Scene:
    number: int  # position in held_out_scenes(): also the seed
    clip: object

    @property
    def rgb(self):
        return self.clip.scene.objects[0].rgb

    def true_shift(self, k: int) -> np.ndarray:
        c = self.clip.truth.centers[:, 0]
        return c[4 * k] - c[0]


@dataclass
class Tally:
    true: list[float] = field(default_factory=list)
    pred: list[float] = field(default_factory=list)
    error: list[float] = field(default_factory=list)
    along: list[float] = field(default_factory=list)
    direction: list[bool] = field(default_factory=list)
    lost: list[bool] = field(default_factory=list)

    def add(self, true: np.ndarray, pred: np.ndarray | None) -> None:
        """One scene: the true and the measured displacement (None: the object was not found)."""
        self.true.append(float(np.linalg.norm(true)))
        self.lost.append(pred is None)
        if pred is None:
            self.direction.append(False)
            return
        n = float(np.linalg.norm(pred))
        self.pred.append(n)
        self.error.append(float(np.linalg.norm(pred - true)))
        self.along.append(float(pred @ true / (true @ true)))
        self.direction.append(n > 1e-9 and float(pred @ true) / (n * float(np.linalg.norm(true))) > COS45)


def pick_scenes(count: int, side: str = "left") -> list[Scene]:
    """The first `count` held-out scenes that start in the `side` half and do not bounce before frame 37."""
    out, offset, batch = [], 0, 64
    while len(out) < count:
        for i, clip in enumerate(held_out_scenes(batch, 1, first=offset)):
            o = clip.scene.objects[0]
            on_side = o.x < clip.scene.size / 2 if side == "left" else o.x >= clip.scene.size / 2
            if on_side and not clip.truth.bounced[: SECTION_FRAMES + 1, 0].any():
                out.append(Scene(offset + i, clip))
                if len(out) == count:
                    break
        offset += batch
    return out


def centroid(frame: np.ndarray, rgb) -> np.ndarray | None:
    c = track(frame[None], rgb)[0][0]
    return None if np.isnan(c).any() else c


def edit_frame(run: Runner, scene: Scene, k: int, method: Method) -> np.ndarray:
    """The one-frame edit of the scene's start frame at target index k, as a (H, W, 3) uint8 array."""
    from PIL import Image

    from framepack.config import EditRequest, LoraRef

    first = scene.clip.frames[0]
    out = run.tmp / f"edit-{scene.number}-{k}-{method.cfg:g}-{int(method.no_extra)}-{int(bool(method.lora))}.png"
    request = EditRequest(
        prompt=scene.clip.caption, output=str(out), overwrite=True, target_index=k, cfg=method.cfg,
        seed=scene.number, steps=run.steps, resolution=first.shape[0], teacache=False, cache="none",
        no_2x=method.no_extra, no_4x=method.no_extra, loras=(LoraRef(method.lora),) if method.lora else (),
    )  # fmt: skip
    result = run.pipe(MODEL).edit(request, image=first)
    with Image.open(result.image) as im:
        frame = np.asarray(im.convert("RGB")).copy()
    for p in (result.image, result.metadata):
        if p is not None:
            Path(p).unlink(missing_ok=True)
    return frame


def _mean(xs) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def save_figure(path: Path, shown: list[tuple[Scene, dict]], method: str) -> None:
    """Rows = scenes; columns: start, edits k = 3/6/9, truth 12/24/36, video 12/24/36 (PIL, 3x nearest)."""
    from PIL import Image, ImageDraw, ImageFont

    titles = ["start"] + [f"edit k={k}" for k in TARGETS] + [f"truth f{4 * k}" for k in TARGETS]
    titles += [f"video f{4 * k}" for k in TARGETS]
    cell, gap, head, label = 192, 6, 44, 16
    width = len(titles) * (cell + gap) + gap
    img = Image.new("RGB", (width, head + len(shown) * (cell + label + gap)), "white")
    d = ImageDraw.Draw(img)
    font, small = ImageFont.load_default(14), ImageFont.load_default(12)
    d.text((gap, 4), f"one-frame edits ({MODEL}: {method}) vs truth vs the model's own video "
           f"(cfg {TOY_CFG:g}); latent k ~ pixel frame 4k", fill="black", font=font)  # fmt: skip
    for c, title in enumerate(titles):
        d.text((gap + c * (cell + gap) + 4, head - 18), title, fill="black", font=font)
    for r, (scene, images) in enumerate(shown):
        frames = [scene.clip.frames[0]] + [images["edit", k] for k in TARGETS]
        frames += [scene.clip.frames[4 * k] for k in TARGETS] + [images["video", k] for k in TARGETS]
        y = head + r * (cell + label + gap)
        d.text((gap, y), f"#{scene.number}: {scene.clip.caption}", fill="black", font=small)
        for c, frame in enumerate(frames):
            tile = Image.fromarray(frame).resize((cell, cell), Image.NEAREST)
            img.paste(tile, (gap + c * (cell + gap), y + label))
    img.save(path)


# ------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=24, help="held-out scenes (left half, no bounce before frame 37)")
    ap.add_argument("--cfgs", type=float, nargs="+", default=[TOY_CFG, 1.0], help="real CFG scales of the edits")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared CPU)")
    ap.add_argument("--png", default=None, help="save a figure of the first --figure-scenes scenes here")
    ap.add_argument("--figure-scenes", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="4 scenes, CFG 3 only (a smoke run)")
    ap.add_argument("--side", choices=["left", "right"], default="left",
                    help="scenes whose object starts in this half (right: mostly leftward motion, a bias check)")
    ap.add_argument("--lora", help="also edit with this LoRA (e.g. trained with --schedules one-frame)")
    ap.add_argument("--lora-only", action="store_true", help="with --lora: only the LoRA edits and the references")
    args = ap.parse_args()
    if args.quick:
        args.scenes, args.cfgs = 4, [TOY_CFG]
    import torch

    from framepack.registry import packaged_dir

    packaged_dir(MODEL)  # a clear message if it is not packaged
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    methods = [Method(f"edit, {'no 2x/4x' if extra else 'post+2x+4x'}, cfg {cfg:g}", "edit", cfg, extra)
               for cfg in args.cfgs for extra in (False, True)]  # fmt: skip
    if args.lora and args.lora_only:
        methods = []
    if args.lora:
        lora = str(Path(args.lora).resolve())
        methods = [Method(f"edit + one-frame LoRA, {'no 2x/4x' if extra else 'post+2x+4x'}, cfg {cfg:g}", "edit", cfg,
                          extra, lora) for cfg in args.cfgs for extra in (False, True)] + methods  # fmt: skip
    methods += [Method(f"video frame 4k, cfg {TOY_CFG:g}", "video"), Method("no motion (pred = 0)", "still")]
    run = Runner(args.steps, TOY_CFG)
    t0 = time.perf_counter()
    scenes = pick_scenes(args.scenes, args.side)
    print(f"# {MODEL}, {args.steps} steps, distilled guidance 10, no step cache, {args.threads} torch thread(s); "
          f"{len(scenes)} held-out scenes (nos. {', '.join(str(s.number) for s in scenes)})", flush=True)  # fmt: skip

    tallies = {(m.label, k): Tally() for m in methods for k in TARGETS}
    shown: list[tuple[Scene, dict]] = []
    edit_s: list[float] = []
    video_s: list[float] = []
    for n, scene in enumerate(scenes):
        start = centroid(scene.clip.frames[0], scene.rgb)
        images = {}
        for m in methods:
            if m.kind == "video":
                t = time.perf_counter()
                video = run.generate(MODEL, scene.clip.frames[0], scene.clip.caption, 1, seed=scene.number).frames
                video_s.append(time.perf_counter() - t)
            for k in TARGETS:
                true = scene.true_shift(k)
                if m.kind == "still":
                    tallies[m.label, k].add(true, np.zeros(2))
                    continue
                if m.kind == "video":
                    frame = video[4 * k]
                else:
                    t = time.perf_counter()
                    frame = edit_frame(run, scene, k, m)
                    edit_s.append(time.perf_counter() - t)
                c = centroid(frame, scene.rgb)
                tallies[m.label, k].add(true, None if c is None or start is None else c - start)
                if m.kind == "video" or (m.kind == "edit" and m is methods[0]):
                    images[m.kind, k] = frame
        if n < args.figure_scenes:
            shown.append((scene, images))
        print(f"# scene {n + 1}/{len(scenes)} (no. {scene.number}) done, {time.perf_counter() - t0:.0f} s", flush=True)

    print()
    print("| method | k (frame 4k) | true shift px | pred shift px | error px | along (1 = right) | "
          "dir within 45° | lost |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in methods:
        for k in TARGETS:
            t = tallies[m.label, k]
            print(f"| {m.label} | {k} ({4 * k}) | {_mean(t.true):.1f} | {_mean(t.pred):.1f} | {_mean(t.error):.1f} | "
                  f"{_mean(t.along):.2f} | {sum(t.direction) / len(t.direction):.0%} | "
                  f"{sum(t.lost)}/{len(t.lost)} |")  # fmt: skip
    print(
        f"\nmeans over the scenes; error, pred shift and along over the scenes where the object is found. "
        f"median seconds: edit {statistics.median(edit_s):.2f}, video section {statistics.median(video_s):.2f}"
    )
    if args.png and shown:
        save_figure(Path(args.png), shown, methods[0].label)
        print(f"figure: {args.png}")
    shutil.rmtree(run.tmp, ignore_errors=True)
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
