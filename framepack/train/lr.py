"""The learning-rate schedule shared by the section trainer and the VAE trainer.

`warmup_cosine(step, total, base, warmup)`: a linear warmup over the first `warmup` steps (step s
gets base * (s + 1) / warmup, so the first step already moves), then a half cosine from `base` at
the end of the warmup down to `base * floor` at step `total`, held there after it; `constant=True`
stays at `base` after the warmup instead. A plain function of the step, so a resumed run gets the
very same floats as an uninterrupted one.
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, base: float, warmup: int, *, floor: float = 0.1,
                  constant: bool = False) -> float:  # fmt: skip
    if step < warmup:
        return base * (step + 1) / warmup
    if constant:
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
