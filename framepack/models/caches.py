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

A new cache is a class with these four methods, added to `STEP_CACHES`.
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


@dataclass
class _PassState:
    previous: torch.Tensor | None = None  # block-0 modulated input of the last call
    accumulated: float = 0.0
    residual: torch.Tensor | None = None  # blocks' output - input on the kept rows, last computed step
    calls: int = 0


@dataclass
class TeaCache:
    """TeaCache (Liu et al. 2024) as FramePack uses it: threshold 0.15 ~ 2.1x, 0.1 ~ 1.6x fewer block runs.

    Always computes the first and the last step of a section. `threshold <= 0` computes every step.
    It compares block 0's AdaLN output on the image stream between consecutive calls of a pass.
    """

    name = "teacache"
    threshold: float = 0.15
    coefficients: tuple[float, ...] = TEACACHE_COEFFICIENTS
    num_steps: int = 25
    log: list[tuple[int, str, bool]] = field(default_factory=list)  # this section: (step, pass, computed)
    calls: int = 0  # since construction (a whole job), for reporting
    computed: int = 0
    _passes: dict[str, _PassState] = field(default_factory=dict)
    _step: int | None = None
    _pass: str = "cond"

    def reset(self, num_steps: int) -> None:
        """Start of a section: forget everything (the context changed)."""
        self.num_steps = num_steps
        self._passes.clear()
        self.log.clear()
        self._step = None

    def select(self, step: int, pass_name: str = "cond") -> None:
        """The next forward call belongs to sampler step `step` of guidance pass `pass_name`."""
        self._step, self._pass = step, pass_name

    def rescale(self, rel_l1: float) -> float:
        result = 0.0
        for c in self.coefficients:
            result = result * rel_l1 + c
        return result

    def decide(self, modulated: torch.Tensor) -> bool:
        """True: run the blocks this step; False: reuse the cached residual."""
        st = self._passes.setdefault(self._pass, _PassState())
        step = self._step if self._step is not None else st.calls % self.num_steps
        st.calls += 1
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
        self.log.append((step, self._pass, compute))
        self.calls += 1
        self.computed += compute
        return compute

    def __call__(self, stack: BlockStack) -> torch.Tensor:
        if self.decide(block0_input(stack)):
            out = stack.run()
            self._passes[self._pass].residual = stack.residual(out)
            return out
        return stack.reuse(self._passes[self._pass].residual)

    @property
    def computed_fraction(self) -> float:
        """Share of forward calls that ran the blocks, over every section since construction."""
        return self.computed / max(1, self.calls)

    def report(self) -> dict:
        return {"name": self.name, "threshold": self.threshold, "calls": self.calls, "computed": self.computed,
                "computed_fraction": round(self.computed_fraction, 3)}  # fmt: skip


def block0_input(stack: BlockStack) -> torch.Tensor:
    """Block 0's AdaLN output on the image stream: LayerNorm(hidden) * (1 + scale) + shift."""
    from framepack.models.transformer import modulate

    shift, scale = stack.model.transformer_blocks[0].norm1(stack.temb)[:2]
    with torch.no_grad():
        return modulate(stack.hidden, shift, scale)


# name -> the cache a request asks for (framepack.config: `teacache`, `teacache_threshold`)
STEP_CACHES: dict[str, Callable[..., StepCache]] = {"teacache": lambda request: TeaCache(request.teacache_threshold)}


def make_step_cache(request) -> StepCache | None:
    """The step cache a GenerationRequest asks for, or None (every step computes)."""
    return STEP_CACHES["teacache"](request) if request.teacache else None
