"""MagCache ratio tables: calibrated per model, resolution and step count, found again for a job.

    calibrate(pipe, ...)          one uncached section with `MagCalibrator` attached -> a table file
    find_table(spec, h, w, steps) the nearest table for a job: the user's calibrations
                                  (<FRAMEPACK_HOME>/magcache), then the ones shipped with the toy
                                  models (framepack/toy/magcache), then the official 640 px tables

Tables are JSON: {"model", "schedule", "height", "width", "steps", "ratios", "created"}. "Nearest" is
the same model first, then the closest pixel count, then the closest step count (a table is resampled
to the job's steps by nearest index). The sidecar names the table a job used.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime
from pathlib import Path

from framepack.config import framepack_home
from framepack.models.caches import MAGCACHE_RATIOS

SHIPPED = Path(__file__).parent / "toy" / "magcache"


def user_dir() -> Path:
    return framepack_home() / "magcache"


def table_name(model: str, height: int, width: int, steps: int) -> str:
    return f"{model}-{width}x{height}-{steps}steps.json"


def save_table(folder: Path, model: str, schedule: str, height: int, width: int, steps: int,
               ratios: tuple[float, ...]) -> Path:  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / table_name(model, height, width, steps)
    record = {"model": model, "schedule": schedule, "height": height, "width": width, "steps": steps,
              "ratios": list(ratios), "created": datetime.now().isoformat(timespec="seconds")}  # fmt: skip
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _tables(folders: list[Path]) -> list[tuple[dict, Path]]:
    out = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                ratios = [float(r) for r in record["ratios"]]
                if ratios and all(math.isfinite(r) and r > 0 for r in ratios):
                    out.append(({**record, "ratios": ratios}, path))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a damaged or foreign file is not a table
    return out


def find_table(spec, height: int, width: int, steps: int,
               folders: list[Path] | None = None) -> tuple[tuple[float, ...], str]:  # fmt: skip
    """(ratios, where they came from) for a job of `spec` at height x width pixels and `steps` steps."""
    tables = _tables(folders if folders is not None else [user_dir(), SHIPPED])
    same = [(r, p) for r, p in tables if r.get("model") == spec.name]
    if same:
        def distance(item):
            r = item[0]
            return (abs(math.log((r["height"] * r["width"]) / (height * width))), abs(r["steps"] - steps))

        record, path = min(same, key=distance)
        exact = (record["height"], record["width"], record["steps"]) == (height, width, steps)
        how = "" if exact else f" (nearest to {width}x{height}, {steps} steps)"
        return tuple(record["ratios"]), f"calibrated {path.name}{how}"
    schedule = spec.schedule if spec.schedule in MAGCACHE_RATIOS else "inverted"
    label = "original" if schedule == "inverted" else "F1"
    return MAGCACHE_RATIOS[schedule], f"official {label} table (640 px, 25 steps; not calibrated for {spec.name})"


def calibrate(pipe, *, image=None, prompt: str = "the object moves to the right", steps: int = 25,
              resolution: int | None = None, seed: int = 0, folder: Path | None = None,
              output: str | os.PathLike | None = None) -> tuple[Path, tuple[float, ...]]:  # fmt: skip
    """One uncached section of `pipe`'s model -> the table file (in `folder`, default the user's)."""
    import tempfile

    import numpy as np

    from framepack.config import GenerationRequest
    from framepack.models.caches import MagCalibrator

    calibrator = MagCalibrator()
    with tempfile.TemporaryDirectory() as tmp:
        if image is None:  # a plain gradient with a block: enough structure for the residual statistics
            x = np.zeros((512, 512, 3), np.uint8)
            x[..., 0] = np.linspace(0, 255, 512, dtype=np.uint8)[None]
            x[160:320, 160:320] = (40, 200, 90)
            image = x
        path_given = isinstance(image, (str, os.PathLike))
        request = GenerationRequest(prompt=prompt, steps=steps, seconds=1.2, resolution=resolution, seed=seed,
                                    cache="none", image=str(image) if path_given else None,
                                    output=str(output or Path(tmp) / "calibration.mp4"))  # one section
        kw = {} if path_given else {"image": image}
        result = pipe.generate(request, step_cache=calibrator, **kw)
        ratios = calibrator.table()
    spec = pipe.spec
    path = save_table(folder or user_dir(), spec.name, spec.schedule, result.height, result.width, steps, ratios)
    return path, ratios
