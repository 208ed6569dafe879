"""Memory planner decisions on simulated devices, against tables computed by hand."""

from __future__ import annotations

import pytest

from framepack.memory import Footprint, GiB, MemoryBudgetError, Mode, plan_memory

# A FramePack-shaped job in round numbers (GiB): transformer = 1 core + 20 double blocks of 0.5 +
# 40 single blocks of 0.25 = 21 GiB, working set 2; LLaMA = 1 core + 32 layers of 0.5 = 17, working 1.
MODELS = [
    Footprint("text_encoder", 17 * GiB, 1 * GiB, (GiB // 2,) * 32),
    Footprint("text_encoder_2", GiB // 4, GiB // 4),
    Footprint("image_encoder", 1 * GiB, GiB // 2),
    Footprint("vae", GiB // 2, 3 * GiB),
    Footprint("transformer", 21 * GiB, 2 * GiB, (GiB // 2,) * 20 + (GiB // 4,) * 40),
]
R, S, T = Mode.RESIDENT, Mode.SWAP, Mode.STREAM


def G(x: float) -> int:
    return int(x * GiB)


# free, preserved -> {model: (mode, resident blocks, declared peak GiB)}; worked out in the comments.
TABLE = {
    # budget 74 >= 39.75 weights + 3 working: everything resident (high-VRAM), peak 42.75 everywhere
    (80, 6): {m.name: (R, 0, 42.75) for m in MODELS},
    (80, 16): {m.name: (R, 0, 42.75) for m in MODELS},
    # budget 24: transformer alone 21+2 = 23 -> swap; spare 1 keeps SigLIP (1 GiB) resident; peaks +1
    (24, 0): {"text_encoder": (S, 0, 19), "text_encoder_2": (S, 0, 1.5), "image_encoder": (R, 0, 1.5),
              "vae": (S, 0, 4.5), "transformer": (S, 0, 24)},
    # budget 18: transformer streams: fixed = 1 core + 2 working + 2 slots x 0.5 = 4, then 20 doubles
    # (10) and 16 singles (4) fill it: k = 36, peak 18. LLaMA 17+1 = 18 fits alone -> swap.
    (24, 6): {"text_encoder": (S, 0, 18), "text_encoder_2": (S, 0, 0.5), "image_encoder": (S, 0, 1.5),
              "vae": (S, 0, 3.5), "transformer": (T, 36, 18)},
    # budget 8: transformer fixed 4 + 8 doubles; LLaMA fixed 1 + 1 + 1 = 3 + 10 layers
    (24, 16): {"text_encoder": (T, 10, 8), "text_encoder_2": (S, 0, 0.5), "image_encoder": (S, 0, 1.5),
               "vae": (S, 0, 3.5), "transformer": (T, 8, 8)},
    # budget 12: transformer 4 + 16 doubles; LLaMA 3 + 18 layers
    (12, 0): {"text_encoder": (T, 18, 12), "text_encoder_2": (S, 0, 0.5), "image_encoder": (S, 0, 1.5),
              "vae": (S, 0, 3.5), "transformer": (T, 16, 12)},
    # budget 6 (the official 6 GB floor, or 12 GB with the default 6 GB preserved)
    (6, 0): {"text_encoder": (T, 6, 6), "text_encoder_2": (S, 0, 0.5), "image_encoder": (S, 0, 1.5),
             "vae": (S, 0, 3.5), "transformer": (T, 4, 6)},
    (12, 6): {"text_encoder": (T, 6, 6), "text_encoder_2": (S, 0, 0.5), "image_encoder": (S, 0, 1.5),
              "vae": (S, 0, 3.5), "transformer": (T, 4, 6)},
    # budget 4: the transformer's fixed part exactly fits, no block resident
    (8, 4): {"text_encoder": (T, 2, 4), "text_encoder_2": (S, 0, 0.5), "image_encoder": (S, 0, 1.5),
             "vae": (S, 0, 3.5), "transformer": (T, 0, 4)},
}  # fmt: skip


@pytest.mark.parametrize("free,preserved", sorted(TABLE))
def test_plan_matches_hand_computation(free, preserved):
    plan = plan_memory(MODELS, free_bytes=G(free), preserved_bytes=G(preserved))
    got = {n: (p.mode, p.resident_blocks, p.peak_bytes / GiB) for n, p in plan.placements.items()}
    assert got == TABLE[(free, preserved)]
    assert plan.peak_bytes <= plan.budget_bytes == G(free - preserved)
    assert plan.high_vram == all(m == R for m, *_ in TABLE[(free, preserved)].values())


@pytest.mark.parametrize("free", [6, 8, 12, 16, 24, 48, 80])
@pytest.mark.parametrize("preserved", [0, 1, 2, 4, 6, 8, 10, 12, 16])
def test_declared_peak_never_exceeds_budget(free, preserved):
    try:
        plan = plan_memory(MODELS, free_bytes=G(free), preserved_bytes=G(preserved))
    except MemoryBudgetError as err:
        assert free - preserved < 4  # below the transformer's fixed streaming need: 1 + 2 + 2 x 0.5
        assert "GiB" in str(err)
        return
    assert free - preserved >= 4
    for name, p in plan.placements.items():
        assert p.peak_bytes <= plan.budget_bytes, name


def test_impossible_budgets_say_why():
    with pytest.raises(MemoryBudgetError, match=r"no device memory to use: 6\.00 GiB free and 6\.00 GiB preserved"):
        plan_memory(MODELS, free_bytes=G(6), preserved_bytes=G(6))
    transformer = MODELS[-1]
    with pytest.raises(MemoryBudgetError, match="transformer cannot run even fully streamed"):
        plan_memory([transformer], free_bytes=G(3.4), preserved_bytes=0)  # 1 core + 2 working + 1 slot = 3.5
    with pytest.raises(MemoryBudgetError, match=r"vae needs 3\.50 GiB on the device and cannot be streamed"):
        plan_memory([Footprint("vae", GiB // 2, 3 * GiB)], free_bytes=G(3), preserved_bytes=0)


def test_one_slot_when_two_do_not_fit():
    """Budget 3.75: core 1 + working 2 + two 0.5 slots = 4 does not fit; one slot (no overlap) does."""
    plan = plan_memory([MODELS[-1]], free_bytes=G(3.75), preserved_bytes=0)
    p = plan.placements["transformer"]
    assert (p.mode, p.prefetch_slots, p.resident_blocks, p.peak_bytes) == (Mode.STREAM, 1, 0, G(3.5))


def test_describe_lists_every_model():
    text = plan_memory(MODELS, free_bytes=G(12), preserved_bytes=G(6)).describe()
    assert "budget 6.00 GiB" in text and "transformer     stream" in text and "4 blocks resident" in text


# ---------------------------------------------------------------------------------- mechanics
import torch  # noqa: E402
from conftest import make_inputs, randomize_  # noqa: E402

from framepack.config import TINY  # noqa: E402
from framepack.memory import BlockStreamer, MemoryManager, Placement, Plan  # noqa: E402
from framepack.models.caches import TeaCache  # noqa: E402
from framepack.models.transformer import FramePackTransformer  # noqa: E402


def _model(seed=4):
    import dataclasses

    cfg = dataclasses.replace(TINY, num_layers=2, num_single_layers=3)
    return cfg, randomize_(FramePackTransformer(cfg), seed).eval()


def _blocks(m):
    return list(m.transformer_blocks) + list(m.single_transformer_blocks)


def _steps(model, kw, n=3):
    outs = []
    with torch.no_grad():
        for i in range(n):
            x = kw["hidden_states"] * (1 - 0.1 * i)
            outs.append(model(**{**kw, "hidden_states": x, "timestep": torch.tensor([900.0 - 100 * i])}).sample)
    return outs


@pytest.mark.parametrize("mode,resident_blocks", [(Mode.SWAP, 0), (Mode.STREAM, 0), (Mode.STREAM, 2), (Mode.STREAM, 4)])
def test_resident_swap_and_streamed_outputs_are_bitwise_equal(mode, resident_blocks):
    cfg, ref = _model()
    kw = make_inputs(cfg, "f1", batch=2, text_lens=(3, 7), seed=2)
    expected = _steps(ref, kw)
    _, model = _model()  # same seed: same weights, fresh module
    plan = Plan(1, {"transformer": Placement(mode, 1, resident_blocks, 2)})
    manager = MemoryManager("cpu", plan, {"transformer": model}, {"transformer": _blocks(model)})
    with manager.use("transformer"):
        got = _steps(model, kw)
        if mode == Mode.STREAM:
            streamed = 5 - resident_blocks
            # more streamed blocks than slots: each is copied once per step (plus the first one's
            # prefetch for a next step); otherwise they stay in their slots after the first copy
            expected_copies = 1 + 3 * streamed if streamed > 2 else streamed
            assert manager.streamers["transformer"].copies == expected_copies
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    # after the phase every weight points back at its host copy and equals the original
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), name


def _inside(ptr: int, buffers) -> bool:
    return any(b.data_ptr() <= ptr < b.data_ptr() + b.numel() * b.element_size() for b in buffers)


def test_streamed_blocks_run_from_the_slot_buffers():
    cfg, model = _model()
    blocks = _blocks(model)
    streamer = BlockStreamer(blocks, torch.device("cpu"), resident=1, slots=2)
    streamer.attach()
    slots = [buf for slot in streamer.slots for buf in slot.values()]
    hosts = [buf for f in streamer.flats for buf in f.host.values()]
    during = []
    # hooks registered after attach run after the streamer's own pre-hook
    handles = [b.register_forward_pre_hook(lambda m, a: during.append(m.attn.to_q.weight.data_ptr())) for b in blocks]
    with torch.no_grad():
        model(**make_inputs(cfg, "f1", seed=3))
    for h in handles:
        h.remove()
    streamer.detach()
    assert len(during) == 5
    assert not _inside(during[0], slots + hosts)  # the resident block keeps its own (device) copy
    assert all(_inside(p, slots) for p in during[1:])  # streamed blocks compute from a slot
    assert all(_inside(b.attn.to_q.weight.data_ptr(), hosts) for b in blocks[1:])  # and go back home


def test_teacache_skips_keep_streaming_consistent():
    """Skipped steps run no block; the next computed step must still find every block's weights."""
    cfg, ref = _model()
    kw = make_inputs(cfg, "f1", seed=5)
    _, model = _model()
    plan = Plan(1, {"transformer": Placement(Mode.STREAM, 1, 1, 2)})
    manager = MemoryManager("cpu", plan, {"transformer": model}, {"transformer": _blocks(model)})
    outs = {}
    for name, m in (("ref", ref), ("streamed", model)):
        cache = TeaCache(threshold=0.3)
        cache.reset(6)
        m.step_cache = cache
        with manager.use("transformer") if name == "streamed" else torch.no_grad():
            res = []
            for i in range(6):
                cache.select(i)
                res.append(_steps(m, {**kw, "hidden_states": kw["hidden_states"] * (1 - 0.001 * i)}, n=1)[0])
        outs[name] = (res, list(cache.log))
        m.step_cache = None
    assert outs["ref"][1] == outs["streamed"][1] and not all(c for *_, c in outs["ref"][1])
    assert all(torch.equal(a, b) for a, b in zip(outs["ref"][0], outs["streamed"][0]))
