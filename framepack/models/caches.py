"""Step caches: skip the transformer blocks on steps where their output would barely change.

Protocol (`StepCache`). A cache attaches from outside (`model.step_cache = cache`); the model's one
hook hands it every call of its block stack as a `BlockStack` (the tokens going in, the step's
conditioning embedding, the rows that come out, and a function that runs the blocks), and the cache
returns the blocks' output: computed by `stack.run()`, or reused. The sampler side calls `reset`
at the start of every section (the context changed) and `select` before every forward call (which
sampler step and which guidance pass: with real CFG each step makes two calls, which the official
TeaCache counted as two steps); `report()` says what it computed and skipped, for the sidecar.
Caches change results, so they are off unless a request asks for one (`make_step_cache`).

    TeaCache   the official FramePack step cache (a rescaled relative-L1 test on block 0's input)
    MagCache   skips on the calibrated magnitude ratio of consecutive block-stack residuals
    MagCalibrator  computes every step and records those ratios (`framepack calibrate-cache`)

A new cache is a class with these four methods, added to `STEP_CACHES`. Every cache's `report()`
also lists, per section, how many forward calls computed and how many were skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class BlockStack:
    """One call of the transformer's block stack, as a step cache sees it."""

    model: nn.Module  # the transformer (caches may read its blocks' modulation)
    hidden: torch.Tensor  # (B, n_img, D) image-stream tokens entering the blocks
    temb: torch.Tensor  # (B, D) the step's conditioning embedding (timestep, guidance, pooled text)
    rows: slice  # the rows of `hidden` whose final states the blocks return (the noisy window)
    run: Callable[[], torch.Tensor]  # runs the blocks -> (B, rows, D)

    def residual(self, out: torch.Tensor) -> torch.Tensor:
        """What the blocks added to the returned rows."""
        return out - self.hidden[:, self.rows]

    def reuse(self, residual: torch.Tensor) -> torch.Tensor:
        """The output of a skipped call: the rows going in plus an earlier call's residual."""
        return self.hidden[:, self.rows] + residual


class StepCache(Protocol):
    name: str

    def reset(self, num_steps: int) -> None:
        """Start of a section of `num_steps` sampler steps: forget everything."""

    def select(self, step: int, pass_name: str = "cond") -> None:
        """The next forward call belongs to sampler step `step` of guidance pass `pass_name`."""

    def __call__(self, stack: BlockStack) -> torch.Tensor:
        """The block stack's output for this call (computed or reused)."""

    def report(self) -> dict:
        """JSON-able: the cache, its settings and what it computed over the whole job."""


# Polynomial (highest power first) mapping the raw relative L1 change of block 0's modulated input to
# an estimate of the output change, as published for HunyuanVideo / FramePack.
TEACACHE_COEFFICIENTS = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)


@dataclass(kw_only=True)
class ResidualCache:
    """What TeaCache and MagCache share: per-guidance-pass state (`state_type`), a per-section log,
    per-section and whole-job counts, and the residual reuse itself. A subclass decides per call
    (`decide_call`); a computed call stores its residual, a skipped one adds the pass's last residual
    to the rows going in."""

    name = "?"
    state_type: type = field(default=object, repr=False)
    num_steps: int = 25
    log: list[tuple[int, str, bool]] = field(default_factory=list)  # this section: (step, pass, computed)
    sections: list[dict] = field(default_factory=list)  # per section: forward calls computed / skipped
    calls: int = 0  # since construction (a whole job), for reporting
    computed: int = 0
    _passes: dict = field(default_factory=dict)
    _step: int | None = None
    _pass: str = "cond"

    def reset(self, num_steps: int) -> None:
        """Start of a section: forget everything (the context changed)."""
        self.num_steps = num_steps
        self._passes.clear()
        self.log.clear()
        self.sections.append({"computed": 0, "skipped": 0})
        self._step = None

    def select(self, step: int, pass_name: str = "cond") -> None:
        """The next forward call belongs to sampler step `step` of guidance pass `pass_name`."""
        self._step, self._pass = step, pass_name

    def _state(self):
        """This pass's state and the call's sampler step (counted per pass when nobody selected one)."""
        st = self._passes.setdefault(self._pass, self.state_type())
        step = self._step if self._step is not None else st.calls % self.num_steps
        st.calls += 1
        return st, step

    def _record(self, step: int, compute: bool) -> bool:
        self.log.append((step, self._pass, compute))
        self.calls += 1
        self.computed += compute
        if self.sections:
            self.sections[-1]["computed" if compute else "skipped"] += 1
        return compute

    def decide_call(self, stack: BlockStack) -> bool:
        raise NotImplementedError

    def __call__(self, stack: BlockStack) -> torch.Tensor:
        if self.decide_call(stack):
            out = stack.run()
            self._passes[self._pass].residual = stack.residual(out)
            return out
        return stack.reuse(self._passes[self._pass].residual)

    @property
    def computed_fraction(self) -> float:
        """Share of forward calls that ran the blocks, over every section since construction."""
        return self.computed / max(1, self.calls)

    def counts(self) -> dict:
        return {"calls": self.calls, "computed": self.computed, "computed_fraction": round(self.computed_fraction, 3),
                "sections": list(self.sections)}  # fmt: skip


@dataclass
class _PassState:
    previous: torch.Tensor | None = None  # block-0 modulated input of the last call
    accumulated: float = 0.0
    residual: torch.Tensor | None = None  # blocks' output - input on the kept rows, last computed step
    calls: int = 0


@dataclass
class TeaCache(ResidualCache):
    """TeaCache (Liu et al. 2024) as FramePack uses it: threshold 0.15 ~ 2.1x, 0.1 ~ 1.6x fewer block runs.

    Always computes the first and the last step of a section. `threshold <= 0` computes every step.
    It compares block 0's AdaLN output on the image stream between consecutive calls of a pass.
    """

    name = "teacache"
    threshold: float = 0.15
    coefficients: tuple[float, ...] = TEACACHE_COEFFICIENTS
    state_type: type = field(default=_PassState, repr=False, kw_only=True)

    def rescale(self, rel_l1: float) -> float:
        result = 0.0
        for c in self.coefficients:
            result = result * rel_l1 + c
        return result

    def decide(self, modulated: torch.Tensor) -> bool:
        """True: run the blocks this step; False: reuse the cached residual."""
        st, step = self._state()
        edge = step == 0 or step >= self.num_steps - 1
        if edge or st.previous is None or st.residual is None or self.threshold <= 0:
            compute, st.accumulated = True, 0.0
        else:
            prev = st.previous
            # One host sync per step is inherent: whether to run 60 blocks is a host-side decision.
            rel = ((modulated - prev).abs().mean() / prev.abs().mean()).item()
            st.accumulated += self.rescale(rel)
            compute = st.accumulated >= self.threshold
            if compute:
                st.accumulated = 0.0
        st.previous = modulated
        return self._record(step, compute)

    def decide_call(self, stack: BlockStack) -> bool:
        return self.decide(block0_input(stack))

    def report(self) -> dict:
        return {"name": self.name, "threshold": self.threshold, **self.counts()}


def block0_input(stack: BlockStack) -> torch.Tensor:
    """Block 0's AdaLN output on the image stream: LayerNorm(hidden) * (1 + scale) + shift."""
    from framepack.models.transformer import modulate

    shift, scale = stack.model.transformer_blocks[0].norm1(stack.temb)[:2]
    with torch.no_grad():
        return modulate(stack.hidden, shift, scale)


# ------------------------------------------------------------------------------------ MagCache
# Official FramePack MagCache tables at 25 steps (640 px): gamma_t = mean over tokens of
# |r_t| / |r_(t-1)|, r = the block stack's residual; step 0 has no predecessor (1.0).
MAGCACHE_RATIOS = {
    "inverted": (1.0, 1.26562, 1.23438, 1.03125, 1.02344, 1.03906, 1.01562, 1.03906, 1.05469, 1.02344, 1.03906,
                 0.99609, 1.03125, 1.02344, 1.01562, 1.02344, 1.00781, 1.04688, 0.98828, 1.0, 1.00781, 0.98828,
                 0.94141, 0.94141, 0.78906),
    "forward": (1.0, 1.25781, 1.08594, 1.02344, 1.00781, 1.02344, 1.00781, 1.02344, 1.05469, 0.99609, 1.03906,
                1.00781, 1.01562, 1.00781, 1.02344, 1.01562, 0.98047, 1.05469, 0.98047, 0.96875, 1.03125, 0.97266,
                0.9375, 0.96484, 0.78516),
}  # fmt: skip
MAGCACHE_GUARD = 0.06  # a step whose own ratio is further than this from 1 always computes
MAGCACHE_THRESHOLD = 0.10  # the default threshold (TeaCache's is the request's teacache_threshold, 0.15)


def resample_ratios(ratios: tuple[float, ...] | list[float], steps: int) -> tuple[float, ...]:
    """A ratio table for `steps` steps from one of another length, by nearest index i * (L-1) / (T-1)."""
    n = len(ratios)
    if steps == n:
        return tuple(ratios)
    if steps == 1:
        return (float(ratios[0]),)
    return tuple(float(ratios[int(i * (n - 1) / (steps - 1) + 0.5)]) for i in range(steps))


@dataclass
class _MagState:
    ratio: float = 1.0  # accumulated product of the skipped steps' gammas
    err: float = 0.0  # accumulated |1 - ratio|
    skipped: int = 0  # consecutive skipped steps
    residual: torch.Tensor | None = None
    calls: int = 0


@dataclass
class MagCache(ResidualCache):
    """MagCache (Ma et al. 2025) on the whole block stack, with per-guidance-pass state.

    Steps before floor(retention * steps), step 0 and the last step always compute. Otherwise the
    step's calibrated ratio gamma_t is folded into the accumulators (ratio *= gamma_t, err += |1 -
    ratio|, skipped += 1) and the step reuses the cached residual when err <= threshold, skipped <=
    k and |1 - gamma_t| <= 0.06; a computed step resets the accumulators and stores its residual.
    `threshold <= 0` computes every step.
    """

    ratios: tuple[float, ...]  # calibrated gamma per step (any length: resampled to the section's steps)
    threshold: float = MAGCACHE_THRESHOLD
    k: int = 3
    retention: float = 0.2
    source: str = "official"  # where the table came from (reported in the sidecar)
    name = "magcache"
    state_type: type = field(default=_MagState, repr=False, kw_only=True)
    _table: tuple[float, ...] = ()

    def reset(self, num_steps: int) -> None:
        super().reset(num_steps)
        self._table = resample_ratios(self.ratios, num_steps)

    def decide(self) -> bool:
        """True: run the blocks this call; False: reuse the pass's cached residual."""
        st, step = self._state()
        if not self._table:
            self._table = resample_ratios(self.ratios, self.num_steps)
        always = (step == 0 or step >= self.num_steps - 1 or step < int(self.retention * self.num_steps)
                  or st.residual is None or self.threshold <= 0)  # fmt: skip
        compute = True
        if not always:
            gamma = self._table[step]
            st.ratio *= gamma
            st.err += abs(1.0 - st.ratio)
            st.skipped += 1
            compute = not (st.err <= self.threshold and st.skipped <= self.k and abs(1.0 - gamma) <= MAGCACHE_GUARD)
        if compute:
            st.ratio, st.err, st.skipped = 1.0, 0.0, 0
        return self._record(step, compute)

    def decide_call(self, stack: BlockStack) -> bool:
        return self.decide()

    def report(self) -> dict:
        return {"name": self.name, "threshold": self.threshold, "k": self.k, "retention": self.retention,
                "table": self.source, **self.counts()}  # fmt: skip


def residual_ratio(current: torch.Tensor, previous: torch.Tensor) -> float:
    """gamma = mean over tokens of |r_t| / |r_(t-1)| (L2 norms along the channel dim)."""
    a = current.float().norm(dim=-1)
    b = previous.float().norm(dim=-1).clamp_min(1e-12)
    return float((a / b).mean())


@dataclass
class MagCalibrator:
    """Computes every step and records gamma_t of the first guidance pass ("cond"): a MagCache table.
    Several sections average per step."""

    name = "magcache-calibration"
    num_steps: int = 25
    ratios: list[list[float]] = field(default_factory=list)  # per section: gamma per step (step 0: 1.0)
    calls: int = 0
    _previous: torch.Tensor | None = None
    _step: int | None = None
    _pass: str = "cond"

    def reset(self, num_steps: int) -> None:
        self.num_steps = num_steps
        self.ratios.append([])
        self._previous = None

    def select(self, step: int, pass_name: str = "cond") -> None:
        self._step, self._pass = step, pass_name

    def __call__(self, stack: BlockStack) -> torch.Tensor:
        out = stack.run()
        self.calls += 1
        if self._pass == "cond":
            residual = stack.residual(out)
            if not self.ratios:
                self.ratios.append([])
            self.ratios[-1].append(1.0 if self._previous is None else residual_ratio(residual, self._previous))
            self._previous = residual
        return out

    def table(self) -> tuple[float, ...]:
        rows = [r for r in self.ratios if r]
        if not rows:
            raise ValueError("no section was calibrated")
        n = min(len(r) for r in rows)
        return tuple(round(sum(r[i] for r in rows) / len(rows), 5) for i in range(n))

    def report(self) -> dict:
        return {"name": self.name, "calls": self.calls, "computed": self.calls, "computed_fraction": 1.0}


# name -> the cache a request asks for, given the MagCache table for the job (framepack.magtables)
def _threshold(request, default: float) -> float:
    """The request's cache_threshold, or the cache's default when it leaves it at None."""
    return request.cache_threshold if request.cache_threshold is not None else default


STEP_CACHES: dict[str, Callable[..., StepCache]] = {
    "teacache": lambda request, table: TeaCache(_threshold(request, request.teacache_threshold)),
    "magcache": lambda request, table: MagCache(table[0], _threshold(request, MAGCACHE_THRESHOLD), request.magcache_k,
                                                request.magcache_retention, table[1]),
}  # fmt: skip


def make_step_cache(request, table: tuple[tuple[float, ...], str] | None = None) -> StepCache | None:
    """The step cache a GenerationRequest asks for, or None (every step computes). `table`: the
    MagCache ratios for the job and where they came from (default: the official original table)."""
    name = request.cache if request.teacache else "none"
    if name == "none":
        return None
    return STEP_CACHES[name](request, table or (MAGCACHE_RATIOS["inverted"], "official original, 25 steps"))


def _check_names() -> None:
    from framepack.config import CACHE_NAMES

    if set(STEP_CACHES) | {"none"} != set(CACHE_NAMES):  # a new cache needs its request choice (config.py)
        raise ImportError(f"STEP_CACHES {sorted(STEP_CACHES)} and config.CACHE_NAMES {CACHE_NAMES} disagree")


_check_names()
