"""Step caches you can trust: what TeaCache and MagCache skip on the toy model, and what that costs.

For both toy schedules (`toy`: the original, inverted one; `toy-f1`: forward) at real CFG 1 (one
model call per step) and 3 (two), every held-out scene is generated once without a cache (the
reference) and once per cache setting, with the same first frame, caption and seed. Per setting:

  * computed fraction: forward calls that ran the blocks (the sidecar's `step_cache`), and its
    inverse, the block-run speed-up; the per-section counts are checked against the totals
  * sampling wall time per section (`timings.sections[].sample_s`) and its ratio to the uncached
    runs of the same scenes (noisy on a shared CPU: the settings run interleaved, scene by scene)
  * pixel PSNR (mean and worst over the scenes) and max abs error of the decoded MP4 against the
    uncached video of the same scene and seed (crf 0; all frames)
  * the toy-quality judge (framepack.train.quality.motion_metrics, as benchmarks/toy_quality.py):
    early direction within 45 degrees, mean centroid error; "changed" counts the scenes whose
    direction verdict differs from the uncached one

    python benchmarks/cache_quality.py [--scenes 20] [--sections 1] [--steps 25] [--quick]
                                       [--png benchmarks/cache_quality.png]

MagCache uses the calibrated toy tables (framepack/toy/magcache, found by the pipeline); the row
"official table" forces the official 640 px table instead, to show what an uncalibrated table does.
Plot (PIL): block-run speed-up (1 / computed fraction) vs PSNR and vs direction accuracy, one
curve per cache, one column per schedule and CFG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_quality import TOY_CFG, Runner  # the toy-quality code path: pipelines, request, reading back

from framepack.train.quality import SECTION_FRAMES, held_out_scenes, motion_metrics


@dataclass(frozen=True)
class Setting:
    cache: str  # "none" | "teacache" | "magcache"
    threshold: float | None = None
    k: int = 3
    retention: float = 0.2
    official_table: bool = False  # MagCache with the official 640 px table instead of the calibrated toy one

    @property
    def label(self) -> str:
        if self.cache == "none":
            return "none"
        if self.cache == "teacache":
            return f"TeaCache {self.threshold:g}"
        extra = " official table" if self.official_table else ""
        return f"MagCache {self.threshold:g}/K{self.k}{extra}"

    @property
    def family(self) -> str:
        if self.official_table:
            return "MagCache (official table)"
        return {"teacache": "TeaCache", "magcache": "MagCache"}.get(self.cache, "none")


SETTINGS = (
    Setting("none"),
    Setting("teacache", 0.08),
    Setting("teacache", 0.15),
    Setting("teacache", 0.25),
    Setting("magcache", 0.06, 2),
    Setting("magcache", 0.10, 3),
    Setting("magcache", 0.20, 4),
    Setting("magcache", 0.30, 5),
    Setting("magcache", 0.10, 3, official_table=True),
)


@dataclass
class Run:
    frames: np.ndarray
    sample_s: list[float]
    step_cache: dict | None


@dataclass
class Row:
    schedule: str
    cfg: float
    setting: Setting
    fractions: list[float] = field(default_factory=list)
    sample_s: list[float] = field(default_factory=list)  # per section, all scenes
    psnr: list[float] = field(default_factory=list)
    max_err: list[int] = field(default_factory=list)
    motion: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def generate(run: Runner, model: str, clip, sections: int, seed: int, cfg: float, setting: Setting) -> Run:
    """One toy video as toy_quality.Runner.generate makes it, with the setting's step cache."""
    from framepack.config import GenerationRequest
    from framepack.models.caches import MAGCACHE_RATIOS, MagCache
    from framepack.video import read_frames

    pipe = run.pipe(model)
    out = run.tmp / f"cq-{model}-{seed}-{cfg:g}-{setting.label.replace(' ', '_').replace('/', '_')}"
    request = GenerationRequest(
        prompt=clip.caption, seconds=sections * SECTION_FRAMES / 30, steps=run.steps, seed=seed,
        resolution=clip.frames[0].shape[0], output=str(out), crf=0, cfg=cfg, cache=setting.cache,
        cache_threshold=setting.threshold, magcache_k=setting.k, magcache_retention=setting.retention,
    )  # fmt: skip
    forced = None
    if setting.official_table:
        ratios = MAGCACHE_RATIOS[pipe.spec.schedule if pipe.spec.schedule in MAGCACHE_RATIOS else "inverted"]
        forced = MagCache(ratios, setting.threshold, setting.k, setting.retention, "official 640 px (forced)")
    result = pipe.generate(request, image=clip.frames[0], step_cache=forced)
    frames = read_frames(result.video)
    meta = json.loads(Path(result.metadata).read_text())
    for p in (Path(result.video), Path(result.metadata)):
        p.unlink(missing_ok=True)
    return Run(frames, [s["sample_s"] for s in result.timings["sections"]], meta.get("step_cache"))


def check_report(report: dict | None, setting: Setting, sections: int, steps: int, cfg: float) -> list[str]:
    """Disagreements between a sidecar's step_cache and what the run must have done."""
    if setting.cache == "none":
        return [] if report is None else [f"uncached run has a step_cache entry: {report}"]
    if report is None:
        return [f"{setting.label}: no step_cache in the sidecar"]
    problems, calls = [], sections * steps * (1 if cfg == 1 else 2)
    per = report.get("sections", [])
    if report["calls"] != calls:
        problems.append(f"{setting.label}: calls {report['calls']} != {calls} expected")
    if len(per) != sections:
        problems.append(f"{setting.label}: {len(per)} per-section entries for {sections} sections")
    if sum(s["computed"] for s in per) != report["computed"]:
        problems.append(f"{setting.label}: per-section computed {per} disagree with computed {report['computed']}")
    if sum(s["computed"] + s["skipped"] for s in per) != report["calls"]:
        problems.append(f"{setting.label}: per-section computed+skipped {per} != calls {report['calls']}")
    if abs(report["computed_fraction"] - report["computed"] / max(1, report["calls"])) > 0.0015:
        problems.append(f"{setting.label}: computed_fraction {report['computed_fraction']} != computed/calls")
    if report["computed"] in (0, report["calls"]):
        problems.append(f"{setting.label}: computed {report['computed']} of {report['calls']} (skips nothing or all)")
    return problems


def psnr(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")
    d = a.astype(np.float64) - b.astype(np.float64)
    mse = float((d**2).mean())
    return (math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)), int(np.abs(d).max())


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else float("nan")


def summarize(row: Row, ref: Row) -> dict:
    judged = [m["direction_ok"] for m in row.motion if m["direction_ok"] is not None]
    changed = sum(m["direction_ok"] != r["direction_ok"] for m, r in zip(row.motion, ref.motion))
    frac = _mean(row.fractions) if row.fractions else 1.0
    finite = [p for p in row.psnr if math.isfinite(p)]
    return {
        "schedule": row.schedule,
        "cfg": row.cfg,
        "setting": asdict(row.setting),
        "fraction": frac,
        "speedup": 1 / frac,
        "sample_s": _mean(row.sample_s),
        "time_ratio": sum(ref.sample_s) / max(1e-9, sum(row.sample_s)),
        "psnr": (_mean(finite) if len(finite) == len(row.psnr) else math.inf) if row.psnr else math.inf,
        "psnr_min": min(row.psnr) if row.psnr else math.inf,
        "max_err": max(row.max_err) if row.max_err else 0,
        "direction": sum(judged) / max(1, len(judged)),
        "judged": len(judged),
        "error": _mean(m["error"] for m in row.motion),
        "changed": changed,
    }


def fmt_db(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x:.1f}"


# ------------------------------------------------------------------------------------ plot (PIL)
COLORS = {"none": (0, 0, 0), "TeaCache": (214, 96, 0), "MagCache": (0, 102, 204),
          "MagCache (official table)": (140, 140, 140)}  # fmt: skip


def print_table(results: list[dict]) -> None:
    print("| schedule | cfg | cache | computed | speed-up (1/frac) | sample s/section | time ratio | "
          "PSNR dB mean (worst) | max abs err | direction ok | changed | centroid err px |")  # fmt: skip
    print("| --- | --: | --- | --: | --: | --: | --: | --: | --: | --: | --: | --: |")
    for s in results:
        label = Setting(**s["setting"]).label
        print(f"| {s['schedule']} | {s['cfg']:g} | {label} | {s['fraction']:.2f} | {s['speedup']:.2f}x | "
              f"{s['sample_s']:.2f} | {s['time_ratio']:.2f}x | {fmt_db(s['psnr'])} ({fmt_db(s['psnr_min'])}) | "
              f"{s['max_err']} | {s['direction']:.0%} of {s['judged']} | {s['changed']} | "
              f"{s['error']:.2f} |")  # fmt: skip


def plot(results: list[dict], path: Path, title: str) -> None:
    from PIL import Image, ImageDraw, ImageFont

    results = [(Setting(**s["setting"]), s) for s in results]
    panels = sorted({(s["schedule"], s["cfg"]) for _, s in results}, key=lambda p: (p[0] != "toy", p[1]))
    pw, ph, ml, mt, gap = 330, 220, 62, 64, 30
    width, height = ml + len(panels) * (pw + gap) + 10, mt + 2 * (ph + 70) + 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font, small, big = ImageFont.load_default(12), ImageFont.load_default(10), ImageFont.load_default(15)
    d.text((ml, 10), title, fill="black", font=big)
    cached = [s for st, s in results if st.cache != "none"]
    xmax = math.ceil(max(s["speedup"] for s in cached) * 2 + 0.2) / 2
    means = [s["psnr"] for s in cached if math.isfinite(s["psnr"])] or [40.0]
    ymin_p, ymax_p = 5 * math.floor(min(means) / 5 - 0.1), 5 * math.ceil(max(means) / 5 + 0.1)
    ymin_d = 10 * math.floor(min(s["direction"] * 10 for _, s in results) - 1)
    rows_spec = (("PSNR vs uncached (dB)", "psnr", ymin_p, ymax_p, 5, ymax_p),
                 ("direction within 45 deg (%)", "direction", max(0.0, ymin_d), 105.0, 10, 100.0))  # fmt: skip
    for ri, (ylabel, key, y0, y1, ystep, ytop) in enumerate(rows_spec):
        top = mt + ri * (ph + 70)
        for pi, (schedule, cfg) in enumerate(panels):
            left = ml + pi * (pw + gap)
            d.rectangle((left, top, left + pw, top + ph), outline="black")
            name = "toy (original, inverted)" if schedule == "toy" else "toy-f1 (forward)"
            d.text((left + 4, top - 16), f"{name}, cfg {cfg:g}", fill="black", font=font)

            def xy(x, y, left=left, top=top, y0=y0, y1=y1):
                return (left + (x - 1.0) / (xmax - 1.0) * pw, top + ph - (y - y0) / (y1 - y0) * ph)

            x = 1.0
            while x <= xmax + 1e-9:
                px, py = xy(x, y0)
                d.line((px, py, px, py + 4), fill="black")
                d.line((px, top, px, top + ph), fill=(232, 232, 232))
                d.text((px - 8, py + 6), f"{x:g}x", fill="black", font=small)
                x += 0.5
            y = y0
            while y <= ytop + 1e-9:
                px, py = xy(1.0, y)
                d.line((px - 4, py, px, py), fill="black")
                d.line((left, py, left + pw, py), fill=(232, 232, 232))
                if pi == 0:
                    d.text((px - 30, py - 6), f"{y:g}", fill="black", font=small)
                y += ystep
            d.rectangle((left, top, left + pw, top + ph), outline="black")
            d.text((left + pw // 2 - 90, top + ph + 20), "block-run speed-up (1 / computed fraction)",
                   fill="black", font=small)  # fmt: skip
            mine = [(st, s) for st, s in results if (s["schedule"], s["cfg"]) == (schedule, cfg)]
            for family, color in COLORS.items():
                pts = sorted(((s["speedup"], s[key] * (100 if key == "direction" else 1), st)
                              for st, s in mine if st.family == family), key=lambda p: p[0])  # fmt: skip
                if key == "psnr":
                    pts = [p for p in pts if math.isfinite(p[1])]
                pix = [xy(px, min(max(py, y0), y1)) for px, py, _ in pts]
                if len(pix) > 1:
                    d.line(pix, fill=color, width=2)
                seen: dict[tuple[int, int], list[str]] = {}
                for (px, py), (_, _v, st) in zip(pix, pts):
                    if st.cache != "none":
                        tag = f"{st.threshold:g}" + ("" if st.cache == "teacache" else f"/K{st.k}")
                        seen.setdefault((round(px), round(py)), []).append(tag)
                for n, ((px, py), tags) in enumerate(seen.items()):
                    tag = ", ".join(tags)
                    if family == "TeaCache":
                        d.text((px + 5, py - 14), tag, fill=color, font=small)
                    else:  # stacked below: MagCache points sit close together
                        d.text((px - 4, py + 5 + 11 * n), tag, fill=color, font=small)
                for px, py in pix:
                    r_ = 4
                    if family == "TeaCache":
                        d.ellipse((px - r_, py - r_, px + r_, py + r_), fill=color)
                    elif family == "none":
                        d.polygon([(px, py - 5), (px + 5, py), (px, py + 5), (px - 5, py)], fill=color)
                    else:
                        d.rectangle((px - r_, py - r_, px + r_, py + r_), fill=color)
        # y label, rotated, left of the first panel
        lbl = Image.new("RGB", (ph, 16), "white")
        ImageDraw.Draw(lbl).text((ph // 2 - 70, 1), ylabel, fill="black", font=font)
        img.paste(lbl.rotate(90, expand=True), (4, top))
    # legend, two entries per line
    for n, (family, color) in enumerate(COLORS.items()):
        lx, ly = ml + (n % 2) * 380, height - 40 + (n // 2) * 18
        if family == "TeaCache":
            d.ellipse((lx, ly, lx + 8, ly + 8), fill=color)
        elif family == "none":
            d.polygon([(lx + 4, ly - 1), (lx + 9, ly + 4), (lx + 4, ly + 9), (lx - 1, ly + 4)], fill=color)
        else:
            d.rectangle((lx, ly, lx + 8, ly + 8), fill=color)
        text = {"none": "no cache (reference; PSNR infinite)", "TeaCache": "TeaCache (threshold)",
                "MagCache": "MagCache, calibrated toy table (threshold/K)",
                "MagCache (official table)": "MagCache, official 640 px table"}[family]  # fmt: skip
        d.text((lx + 14, ly - 2), text, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# ------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=20, help="held-out scenes per schedule and cfg")
    ap.add_argument("--sections", type=int, default=1, help="video length in sections (36 frames each)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfgs", type=float, nargs="+", default=[1.0, TOY_CFG], help="real CFG scales")
    ap.add_argument("--models", nargs="+", default=["toy", "toy-f1"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: all cores). 1 by default: the 64x64 toy gains little from more, and "
                         "on a shared 2-core machine 2 threads measured 5-10x slower (oversubscribed)")  # fmt: skip
    ap.add_argument("--png", type=Path, default=Path(__file__).resolve().parent / "cache_quality.png")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary rows here")
    ap.add_argument("--quick", action="store_true", help="2 scenes, cfg 1 only (a smoke run)")
    ap.add_argument("--replot", type=Path, default=None, help="only draw the table and the PNG from a --json file")
    args = ap.parse_args()
    if args.replot:
        data = json.loads(args.replot.read_text())
        print_table(data["rows"])
        plot(data["rows"], args.png, data["title"])
        print(f"plot: {args.png}")
        return
    if args.quick:
        args.scenes, args.cfgs = 2, [1.0]
    import torch

    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    load0, t0 = os.getloadavg(), time.perf_counter()
    print(f"# {args.steps} steps, {args.sections} section(s) ({args.sections * SECTION_FRAMES + 1} frames) per "
          f"video, {args.scenes} held-out scenes (seed = scene no.), cfg {args.cfgs}, "
          f"{torch.get_num_threads()} torch threads; load average at start {load0[0]:.2f} {load0[1]:.2f} "
          f"{load0[2]:.2f}", flush=True)  # fmt: skip
    run = Runner(args.steps)
    scenes = held_out_scenes(args.scenes, args.sections)
    results: list[dict] = []
    problems: list[str] = []
    loads = [load0[0]]
    for model in args.models:
        generate(run, model, scenes[0], 1, 0, 1.0, SETTINGS[0])  # warm-up (load, first-call costs)
        for cfg in args.cfgs:
            rows = {s: Row(model, cfg, s) for s in SETTINGS}
            for i, clip in enumerate(scenes):
                ref = None
                for s in SETTINGS:  # interleaved: load changes hit every setting alike
                    g = generate(run, model, clip, args.sections, i, cfg, s)
                    row = rows[s]
                    row.sample_s += g.sample_s
                    row.motion.append(motion_metrics(g.frames, clip))
                    for p in check_report(g.step_cache, s, args.sections, args.steps, cfg):
                        if p not in problems:
                            problems.append(p)
                    if s.cache == "none":
                        ref = g.frames
                    else:
                        row.fractions.append(g.step_cache["computed_fraction"] if g.step_cache else 1.0)
                        db, mx = psnr(g.frames, ref)
                        row.psnr.append(db)
                        row.max_err.append(mx)
                loads.append(os.getloadavg()[0])
                print(f"  {model} cfg {cfg:g} scene {i + 1}/{len(scenes)} "
                      f"({time.perf_counter() - t0:.0f} s, load {loads[-1]:.2f})", flush=True)  # fmt: skip
            base = rows[SETTINGS[0]]
            results += [summarize(r, base) for r in rows.values()]

    print()
    print_table(results)
    load1 = os.getloadavg()
    print(f"\nload average: start {load0[0]:.2f}, mean of the per-scene samples {statistics.fmean(loads):.2f}, "
          f"max {max(loads):.2f}, end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")  # fmt: skip
    if problems:
        print("\nPROBLEMS (sidecar step_cache vs the run):")
        for p in problems:
            print("  " + p)
    else:
        print("step_cache reports: calls, per-section computed/skipped and computed_fraction all consistent")
    title = (f"Step caches on the toy model (64x64, {args.steps} steps, {args.sections} section(s), "
             f"{args.scenes} held-out scenes per panel)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"title": title, "args": vars(args), "problems": problems, "rows": results},
                                        indent=1, default=str))  # fmt: skip
    plot(results, args.png, title)
    print(f"plot: {args.png}")
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
