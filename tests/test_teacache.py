"""TeaCache: exact when disabled by threshold 0, and the skip pattern of a hand computation."""

from __future__ import annotations

import torch
from conftest import make_inputs, randomize_

from framepack.config import TINY
from framepack.models.caches import TEACACHE_COEFFICIENTS, TeaCache
from framepack.models.transformer import FramePackTransformer


def _poly(x: float) -> float:
    a, b, c, d, e = TEACACHE_COEFFICIENTS
    return a * x**4 + b * x**3 + c * x**2 + d * x + e


def test_threshold_zero_equals_uncached_run():
    model = randomize_(FramePackTransformer(TINY), seed=2).eval()
    kw = make_inputs(TINY, "f1", seed=1)
    steps = 6
    xs = [torch.randn_like(kw["hidden_states"]) for _ in range(steps)]
    with torch.no_grad():
        plain = [model(**{**kw, "hidden_states": x, "timestep": torch.tensor([1000.0 - 150 * i])}).sample
                 for i, x in enumerate(xs)]  # fmt: skip
        cache = TeaCache(threshold=0.0)
        cache.reset(steps)
        model.step_cache = cache
        try:
            cached = []
            for i, x in enumerate(xs):
                cache.select(i)
                cached.append(model(**{**kw, "hidden_states": x, "timestep": torch.tensor([1000.0 - 150 * i])}).sample)
        finally:
            model.step_cache = None
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))
    assert cache.computed_fraction == 1.0


def test_skip_pattern_matches_hand_computation():
    """Scripted block-0 inputs with known relative changes; decisions follow spec §4.10 by hand."""
    base = torch.ones(2, 5, 4)
    rels = [None, 0.30, 0.02, 0.02, 0.02, 0.40, 0.01, 0.01]  # change of step i vs step i-1
    seq, x = [], base
    for r in rels:
        x = x if r is None else x * (1 + r)  # mean|x - prev| / mean|prev| == r exactly
        seq.append(x)
    thresh = 0.15
    cache = TeaCache(threshold=thresh)
    cache.reset(len(seq))
    got = []
    for i, m in enumerate(seq):
        cache.select(i)
        if i:  # a residual exists once step 0 computed
            cache._passes["cond"].residual = torch.zeros(1)
        got.append(cache.decide(m))
    # Hand computation: step 0 and the last step always compute; otherwise accumulate poly(rel).
    expected, acc = [], 0.0
    for i, r in enumerate(rels):
        if i in (0, len(rels) - 1):
            expected.append(True)
            acc = 0.0
            continue
        acc += _poly(r)
        expected.append(acc >= thresh)
        if acc >= thresh:
            acc = 0.0
    assert got == expected
    assert expected == [True, True, False, False, True, True, False, True]  # the table, written out


def test_passes_are_counted_separately_and_reset_per_section():
    cache = TeaCache(threshold=10.0)  # never computes except at the edges
    cache.reset(4)
    m = torch.ones(3)
    for step in range(4):
        for p in ("cond", "uncond"):
            cache.select(step, p)
            if step:
                cache._passes[p].residual = torch.zeros(1)
            cache.decide(m * (1 + 0.01 * step))  # ~1% change per step: far below the threshold
    # Both passes see steps 0..3: compute at 0 and 3 only (the official counted 8 calls as 8 steps).
    assert [(s, p, c) for s, p, c in cache.log] == [
        (0, "cond", True), (0, "uncond", True), (1, "cond", False), (1, "uncond", False),
        (2, "cond", False), (2, "uncond", False), (3, "cond", True), (3, "uncond", True),
    ]  # fmt: skip
    cache.reset(4)
    assert cache.log == [] and cache._passes == {}


def test_cached_run_skips_blocks_and_stays_close():
    """Skipped steps reuse the last computed step's residual of the block stack: their output equals a run
    whose blocks return (input rows + that residual), and is closer to the uncached output than the last
    computed output itself would be (what reusing stale velocities gives)."""
    from framepack.models.caches import BlockStack

    model = randomize_(FramePackTransformer(TINY), seed=2).eval()
    kw = make_inputs(TINY, "f1", seed=1)
    steps, runs = 8, []
    inputs = [{**kw, "hidden_states": kw["hidden_states"] * (1 - 0.01 * i), "timestep": torch.tensor([900.0 - i])}
              for i in range(steps)]  # fmt: skip
    with torch.no_grad():
        plain = [model(**k).sample for k in inputs]
    real = model._blocks
    model._blocks = lambda *a: runs.append(1) or real(*a)
    cache = TeaCache(threshold=0.5)
    cache.reset(steps)
    model.step_cache = cache
    with torch.no_grad():
        cached = []
        for i, k in enumerate(inputs):
            cache.select(i)
            cached.append(model(**k).sample)
    computed = [c for *_, c in cache.log]
    assert len(runs) == sum(computed) < steps and computed[0] and computed[-1]

    residual = {}

    def replay(stack: BlockStack) -> torch.Tensor:  # the reference: residual of the last computed step
        if computed[replay.step]:
            out = stack.run()
            residual["last"] = out - stack.hidden[:, stack.rows]
            return out
        return stack.hidden[:, stack.rows] + residual["last"]

    model.step_cache = replay
    with torch.no_grad():
        expected = []
        for i, k in enumerate(inputs):
            replay.step = i
            expected.append(model(**k).sample)
    model.step_cache = None
    last = 0
    for i, (got, ref, full) in enumerate(zip(cached, expected, plain)):
        assert torch.allclose(got, ref, atol=1e-6), i
        if computed[i]:
            assert torch.equal(got, full), i  # a computed step is the uncached model's output
            last = i
        else:
            err = ((got - full).norm() / full.norm()).item()
            stale = ((plain[last] - full).norm() / full.norm()).item()
            assert 0 < err < stale, (i, err, stale)
    assert ((cached[1] - plain[1]).norm() / plain[1].norm()).item() < 0.1  # one skipped step: within 10%
