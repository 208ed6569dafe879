"""Device memory policy, in bytes: which model stays on the accelerator, which is loaded for its phase
and evicted after, and which streams its blocks from host memory.

The pipeline only declares what it needs (`with manager.use("transformer"): ...`); this module
decides (`NullMemory`, with the same interface, when a job's memory is not managed). One plan is made
per job from the models' sizes, their working sets (`WORKING_SETS`), the free device memory and the user's
"preserved memory" (the official slider: memory to leave free for the rest of the system):

    budget = free - preserved
    1. everything fits at once (all weights + the largest working set)   -> all RESIDENT (high-VRAM)
    2. otherwise each model, alone on the device for its phase:
         weights + working <= budget                                    -> SWAP (load, run, evict)
         it has blocks: core + working + prefetch slots + as many leading
         blocks as still fit                                             -> STREAM (k blocks resident)
         neither                                                         -> MemoryBudgetError
    3. leftover budget keeps the small SWAP models resident between phases, largest first, as long
       as the largest phase (the transformer's) still fits beside them.

Every placement carries its declared peak (bytes on the device while that phase runs, resident
models included) and the plan guarantees peak <= budget. The mechanics live in `ModelSlot`
(swap: parameters point either at their host copy or at a device copy) and `BlockStreamer`
(host blocks in pinned memory, copied to a rotating set of device slots on a side stream one block
ahead of use, so transfer overlaps compute).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from framepack.weights import is_mapped, release_pages

GiB = 2**30


def fmt_bytes(n: float) -> str:
    """Human-readable size: GiB for big numbers, MiB or KiB for the small test models."""
    for unit, size in (("GiB", GiB), ("MiB", 2**20)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.1f} KiB"


def _eager(hook):
    """A module hook that always runs eagerly: under a compiled block (framepack.models.compile) dynamo
    would otherwise trace the streamer's bookkeeping into the graph and recompile for every block index."""
    return torch.compiler.disable(hook)


class Mode(str, Enum):
    RESIDENT = "resident"  # on the device for the whole job
    SWAP = "swap"  # moved to the device for its phase, evicted after
    STREAM = "stream"  # core on the device for its phase; blocks streamed (k stay resident)


class MemoryBudgetError(RuntimeError):
    """The device cannot hold even the smallest configuration of some model under the budget."""


@dataclass(frozen=True)
class Footprint:
    """Device bytes a model needs: its weights and its working set while it runs."""

    name: str
    weight_bytes: int
    working_bytes: int = 0
    block_bytes: tuple[int, ...] = ()  # streamable units in execution order (subset of the weights)

    @property
    def core_bytes(self) -> int:
        return self.weight_bytes - sum(self.block_bytes)


@dataclass(frozen=True)
class Placement:
    mode: Mode
    peak_bytes: int  # device bytes while this model's phase runs (resident models included)
    resident_blocks: int = 0  # STREAM: leading blocks kept on the device
    prefetch_slots: int = 0  # STREAM: device buffers blocks are streamed through


@dataclass(frozen=True)
class Plan:
    budget_bytes: int
    placements: dict[str, Placement]
    resident_bytes: int = 0  # bytes of RESIDENT models, present during every phase

    @property
    def high_vram(self) -> bool:
        return all(p.mode == Mode.RESIDENT for p in self.placements.values())

    @property
    def peak_bytes(self) -> int:
        return max((p.peak_bytes for p in self.placements.values()), default=0)

    def describe(self) -> str:
        rows = [f"memory plan: budget {fmt_bytes(self.budget_bytes)}, declared peak {fmt_bytes(self.peak_bytes)}"]
        for name, p in self.placements.items():
            extra = f", {p.resident_blocks} blocks resident" if p.mode == Mode.STREAM else ""
            rows.append(f"  {name:15s} {p.mode.value:8s} peak {fmt_bytes(p.peak_bytes):>11s}{extra}")
        return "\n".join(rows)


def plan_memory(models: Sequence[Footprint], *, free_bytes: int, preserved_bytes: int, prefetch: int = 2) -> Plan:
    """Decide every model's placement (see the module docstring); peak <= free - preserved always."""
    budget = free_bytes - preserved_bytes
    if budget <= 0:
        raise MemoryBudgetError(
            f"no device memory to use: {fmt_bytes(free_bytes)} free and {fmt_bytes(preserved_bytes)} "
            "preserved; lower the preserved memory"
        )
    weights = sum(m.weight_bytes for m in models)
    working = max((m.working_bytes for m in models), default=0)
    if weights + working <= budget:
        return Plan(budget, {m.name: Placement(Mode.RESIDENT, weights + working) for m in models}, weights)

    alone: dict[str, Placement] = {}
    for m in models:
        if m.weight_bytes + m.working_bytes <= budget:
            alone[m.name] = Placement(Mode.SWAP, m.weight_bytes + m.working_bytes)
        elif m.block_bytes:
            alone[m.name] = _stream(m, budget, prefetch)
        else:
            raise MemoryBudgetError(
                f"{m.name} needs {fmt_bytes(m.weight_bytes + m.working_bytes)} on the device and cannot be "
                f"streamed; the budget is {fmt_bytes(budget)} ({fmt_bytes(free_bytes)} free - "
                f"{fmt_bytes(preserved_bytes)} preserved). Lower the preserved memory or use a smaller resolution."
            )

    # Keep small swapped models resident while every phase still fits beside them (largest first:
    # they cost the most to move each section). `spare` is what the biggest phase leaves unused.
    spare = budget - max(p.peak_bytes for p in alone.values())
    resident: set[str] = set()
    for m in sorted(models, key=lambda m: -m.weight_bytes):
        if alone[m.name].mode == Mode.SWAP and m.weight_bytes <= spare:
            resident.add(m.name)
            spare -= m.weight_bytes
    kept = sum(m.weight_bytes for m in models if m.name in resident)
    placements = {}
    for m in models:
        p = alone[m.name]
        if m.name in resident:  # its phase: all resident weights (its own included) + its working set
            placements[m.name] = Placement(Mode.RESIDENT, kept + m.working_bytes)
        else:  # its phase: the resident weights + what it needs alone
            placements[m.name] = Placement(p.mode, kept + p.peak_bytes, p.resident_blocks, p.prefetch_slots)
    return Plan(budget, placements, kept)


def _stream(m: Footprint, budget: int, prefetch: int) -> Placement:
    slot = max(m.block_bytes)
    fixed = m.core_bytes + m.working_bytes + prefetch * slot
    if fixed > budget and prefetch > 1:  # one slot: no copy/compute overlap, but it runs
        return _stream(m, budget, 1)
    if fixed > budget:
        raise MemoryBudgetError(
            f"{m.name} cannot run even fully streamed: its non-block weights, working set and {prefetch} block "
            f"buffers need {fmt_bytes(fixed)}, the budget is {fmt_bytes(budget)}. Lower the preserved "
            "memory or use a smaller resolution."
        )
    used, k = fixed, 0
    for b in m.block_bytes:
        if used + b > budget:
            break
        used += b
        k += 1
    if k == len(m.block_bytes):  # everything fits after all: no streaming buffers needed
        return Placement(Mode.SWAP, m.weight_bytes + m.working_bytes)
    return Placement(Mode.STREAM, used, k, prefetch)


# ------------------------------------------------------------------------------- working sets
# Device bytes a model needs beside its weights while it runs, per model of a FramePack spec, at a
# job's latent size (h x w) and window. Estimates, generous where the real peak is hard to bound.
def _transformer_working(module: nn.Module, h: int, w: int, window: int) -> int:
    """The residual stream, q/k/v, attention out and the MLP hidden: (8 D + 2 mlp) values per token. On
    N sequence-parallel ranks (`module.parallel`, framepack.parallel) a rank holds 1/N of the image
    tokens (its attention: all of them for 1/N of the heads, the same count) and the whole joint part."""
    cfg, act = module.config, module.dtype.itemsize
    ranks = getattr(getattr(module, "parallel", None), "world", 1)
    frame = (h // 2) * (w // 2)
    image = (window + 2) * frame + frame // 4 * 2 // 2 + frame // 16 * 16 // 4  # + 2x: 2 frames, 4x: 16 frames
    tokens = -(-image // ranks) + 729 + 256
    return int(1.25 * tokens * (8 * cfg.inner_dim + 2 * cfg.mlp_dim) * act)


def _vae_working(module: nn.Module, h: int, w: int, window: int) -> int:
    """Decoding 2 windows: a few full-resolution activations; tiled beyond 3 GiB."""
    frames, channels = 4 * (2 * window + 1) - 3, max(module.config.block_out_channels)
    return min(4 * frames * 64 * h * w * channels * module.dtype.itemsize, 3 * GiB)


def _text_working(module: nn.Module, h: int, w: int, window: int) -> int:
    """LLaMA keeps every layer's hidden states of (crop + 256) tokens."""
    c = module["llama"].config
    tokens = 512
    return tokens * (c.hidden_size * (c.num_hidden_layers + 1) + 2 * c.intermediate_size) * 4


def _siglip_working(module: nn.Module, h: int, w: int, window: int) -> int:
    """SigLIP over its patch tokens."""
    c = module.config
    tokens = (c.image_size // c.patch_size) ** 2 + 1
    return tokens * (6 * c.hidden_size + 2 * c.intermediate_size) * 4 + tokens**2 * c.num_attention_heads * 4


WORKING_SETS = {"transformer": _transformer_working, "vae": _vae_working, "text_encoder": _text_working,
                "image_encoder": _siglip_working}  # fmt: skip


def footprint(name: str, module: nn.Module, blocks: Sequence[nn.Module], *, height: int, width: int,
              window: int) -> Footprint:  # fmt: skip
    """A model's weights, its streamable blocks and its working set (`WORKING_SETS[name]`) for one job."""
    working = WORKING_SETS[name](module, height, width, window)
    return Footprint(name, module_bytes(module), int(working), tuple(module_bytes(b) for b in blocks))


def configure_host_allocator(mmap_threshold: int = 16 * 2**20) -> None:
    """Make glibc serve allocations above `mmap_threshold` with their own mappings, returned on free.

    By default glibc raises that threshold as the program frees large blocks (up to 32 MiB), after
    which medium temporaries (a VAE decode makes thousands) live in the heap and fragment it: peak
    RSS then creeps up from section to section (measured: +12% over 50 sections at 256x256 on CPU;
    with this setting +1%). Costs some page faults on the CPU path. No-op without glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, mmap_threshold)
        libc.mallopt(m_trim_threshold, 2 * mmap_threshold)
    except (OSError, AttributeError):
        pass


def release_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, and RSS creeps up section by
    section with the VAE's large temporaries). A no-op where glibc's malloc_trim does not exist."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


# ------------------------------------------------------------------------------------- mechanics
def _tensors(module: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(owner, attribute name, is parameter) for every parameter and buffer, each listed once."""
    out, seen = [], set()
    for owner in module.modules():
        for name, t in list(owner._parameters.items()) + list(owner._buffers.items()):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append((owner, name, name in owner._parameters))
    return out


def _get(owner: nn.Module, name: str, is_param: bool) -> torch.Tensor:
    return owner._parameters[name] if is_param else owner._buffers[name]


def _point(owner: nn.Module, name: str, is_param: bool, data: torch.Tensor) -> None:
    if is_param:
        owner._parameters[name].data = data
    else:
        owner._buffers[name] = data


def module_bytes(module: nn.Module) -> int:
    return sum(_get(*t).numel() * _get(*t).element_size() for t in _tensors(module))


class ModelSlot:
    """A model whose master weights live on the host; `load` points it at a device copy, `evict` back.

    Evicting copies nothing (the host copy never changed) and frees the device memory. On a CUDA
    device the host copy is pinned so loads can run asynchronously at full bus speed.
    """

    def __init__(self, module: nn.Module, device: torch.device, *, pin: bool | None = None) -> None:
        self.module, self.device = module, torch.device(device)
        self.entries = _tensors(module)
        pin = self.device.type == "cuda" if pin is None else pin
        self.host = []
        for entry in self.entries:
            t = _get(*entry).data
            if t.device.type != "cpu":
                t = t.cpu()
            if pin and not t.is_pinned() and not is_mapped(t):  # pinning a mapped file would copy it
                t = t.pin_memory()
            _point(*entry, t)
            self.host.append(t)
        self.loaded = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host)

    def load(self) -> None:
        if not self.loaded:
            for entry, t in zip(self.entries, self.host):
                _point(*entry, t.to(self.device, non_blocking=True, copy=True))
                release_pages(t)  # a mapped checkpoint's pages: copied, so drop them from RSS
            self.loaded = True

    def evict(self) -> None:
        if self.loaded:
            for entry, t in zip(self.entries, self.host):
                _point(*entry, t)
            self.loaded = False


class _Flat:
    """One block's tensors laid out in one host buffer per dtype (a single copy per dtype to stream)."""

    def __init__(self, block: nn.Module, pin: bool) -> None:
        self.entries = _tensors(block)
        self.layout: dict[torch.dtype, list[tuple[int, int, torch.Size]]] = {}
        sizes: dict[torch.dtype, int] = {}
        for i, entry in enumerate(self.entries):
            t = _get(*entry)
            off = sizes.get(t.dtype, 0)
            self.layout.setdefault(t.dtype, []).append((i, off, t.shape))
            sizes[t.dtype] = off + t.numel()
        self.host = {}
        for dtype, n in sizes.items():
            buf = torch.empty(n, dtype=dtype, pin_memory=pin)
            for i, off, _shape in self.layout[dtype]:
                src = _get(*self.entries[i]).data
                buf[off : off + src.numel()].copy_(src.reshape(-1))
            self.host[dtype] = buf
        self.point_to(self.host)  # the old per-tensor storage is released: still one host copy

    @property
    def sizes(self) -> dict[torch.dtype, int]:
        return {d: b.numel() for d, b in self.host.items()}

    def point_to(self, buffers: dict[torch.dtype, torch.Tensor]) -> None:
        for dtype, items in self.layout.items():
            for i, off, shape in items:
                _point(*self.entries[i], buffers[dtype][off : off + shape.numel()].view(shape))


def _flat(block: nn.Module, pin: bool) -> _Flat:
    """The block's flat host layout, made once and kept on the block (jobs re-plan, blocks stay flat)."""
    flat = getattr(block, "_framepack_flat", None)
    if flat is None:
        flat = _Flat(block, pin)
        object.__setattr__(block, "_framepack_flat", flat)
    return flat


class BlockStreamer:
    """Runs `blocks` (in execution order) with only the first `resident` kept on the device; the rest
    stream from pinned host memory through `slots` device buffers, one block ahead, on a side stream.

    Correctness does not depend on timing: a block's forward waits for its copy (CUDA event) and a
    buffer is only overwritten after the block that used it has finished (CUDA event). On a CPU
    "device" the same bookkeeping runs with synchronous copies, which is how the tests check it.
    """

    def __init__(self, blocks: list[nn.Module], device: torch.device, resident: int, slots: int = 2) -> None:
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.resident = [_flat(b, pin=cuda) for b in blocks[:resident]]
        self.streamed = blocks[resident:]
        self.flats = [_flat(b, pin=cuda) for b in self.streamed]
        self.n_slots = min(slots, len(self.streamed)) if self.streamed else 0
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.slot_of: dict[int, int] = {}  # streamed block index -> slot holding it
        self.holder: list[int | None] = [None] * self.n_slots  # slot -> block index
        self.last_used = [0] * self.n_slots
        self.running: int | None = None  # slot of the block whose forward is running
        self._clock = 0
        self.slots: list[dict[torch.dtype, torch.Tensor]] = []
        self.ready: list[object] = []
        self.free: list[object] = []
        self.handles: list = []
        self.copies = 0  # host -> device block copies made (for tests and reports)

    def attach(self) -> None:
        for r in self.resident:  # one device copy per dtype for each resident block
            r.point_to({d: b.to(self.device, non_blocking=True, copy=True) for d, b in r.host.items()})
        if not self.streamed:
            return
        sizes: dict[torch.dtype, int] = {}
        for f in self.flats:
            for d, n in f.sizes.items():
                sizes[d] = max(sizes.get(d, 0), n)
        self.slots = [{d: torch.empty(n, dtype=d, device=self.device) for d, n in sizes.items()}
                      for _ in range(self.n_slots)]  # fmt: skip
        cuda = self.copy_stream is not None
        self.ready = [torch.cuda.Event() if cuda else None for _ in range(self.n_slots)]
        self.free = [torch.cuda.Event() if cuda else None for _ in range(self.n_slots)]
        for i, block in enumerate(self.streamed):
            self.handles.append(block.register_forward_pre_hook(_eager(lambda m, a, i=i: self._before(i))))
            self.handles.append(block.register_forward_hook(_eager(lambda m, a, o, i=i: self._after(i))))
        self._prefetch(0)

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        for f in self.flats:
            f.point_to(f.host)
        self.slots, self.slot_of, self.holder = [], {}, [None] * self.n_slots
        self.running = None
        for r in self.resident:
            r.point_to(r.host)

    def _prefetch(self, i: int) -> None:
        """Start copying streamed block i into a slot that no running block uses (no-op if it is in one)."""
        if i in self.slot_of:
            return
        free = [s for s in range(self.n_slots) if s != self.running]
        if not free:  # a single slot, in use: block i is copied when it is about to run
            return
        empty = [s for s in free if self.holder[s] is None]
        slot = empty[0] if empty else min(free, key=lambda s: self.last_used[s])
        old = self.holder[slot]
        if old is not None:
            del self.slot_of[old]
        self.holder[slot], self.slot_of[i] = i, slot
        host, dst = self.flats[i].host, self.slots[slot]
        if self.copy_stream is None:
            for d, buf in host.items():
                dst[d][: buf.numel()].copy_(buf)
        else:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.free[slot])  # the previous user of this slot is done
                for d, buf in host.items():
                    dst[d][: buf.numel()].copy_(buf, non_blocking=True)
                self.ready[slot].record(self.copy_stream)
        self.copies += 1

    def _before(self, i: int) -> None:
        self._prefetch(i)  # normally already done one block ahead
        slot = self.slot_of[i]
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        self.flats[i].point_to(self.slots[slot])
        self.running = slot
        self._prefetch((i + 1) % len(self.streamed))  # the next block (or the first, for the next call)

    def _after(self, i: int) -> None:
        slot = self.slot_of[i]
        if self.copy_stream is not None:
            self.free[slot].record(torch.cuda.current_stream(self.device))
        self.flats[i].point_to(self.flats[i].host)
        self.running = None
        self._clock += 1
        self.last_used[slot] = self._clock


class SwapStreamer:
    """Streams blocks whose host weights are memory-mapped (the text encoder): each block is copied to
    the device right before its forward (its pages released) and dropped after; the first `resident`
    stay for the phase. No prefetch: a pinned staging copy of an 8B model is what this avoids, and it
    runs once per new prompt."""

    def __init__(self, blocks: list[nn.Module], device: torch.device, resident: int) -> None:
        self.resident = [ModelSlot(b, device, pin=False) for b in blocks[:resident]]
        self.streamed = [(b, ModelSlot(b, device, pin=False)) for b in blocks[resident:]]
        self.handles: list = []
        self.copies = 0

    def attach(self) -> None:
        for r in self.resident:
            r.load()
        for block, slot in self.streamed:
            self.handles.append(block.register_forward_pre_hook(_eager(lambda m, a, s=slot: self._load(s))))
            self.handles.append(block.register_forward_hook(_eager(lambda m, a, o, s=slot: s.evict())))

    def _load(self, slot: ModelSlot) -> None:
        slot.load()
        self.copies += 1

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for _, slot in self.streamed:
            slot.evict()
        for r in self.resident:
            r.evict()


class MemoryManager:
    """Carries out a Plan: `with manager.use(name):` puts that model where the plan says for the phase.

    `blocks[name]` lists a model's streamable blocks in execution order; the rest of a streamed model
    (its core) is swapped. RESIDENT models are loaded on first use and stay.
    """

    def __init__(self, device, plan: Plan, modules: dict[str, nn.Module], blocks: dict[str, list[nn.Module]]):
        self.device, self.plan = torch.device(device), plan
        self.slots: dict[str, ModelSlot] = {}
        self.streamers: dict[str, BlockStreamer] = {}
        for name, module in modules.items():
            p = plan.placements[name]
            if p.mode == Mode.STREAM:
                block_ids = {id(b) for b in blocks[name]}
                mapped = any(is_mapped(t) for b in blocks[name] for t in _all_tensors(b))
                self.streamers[name] = (
                    SwapStreamer(blocks[name], self.device, p.resident_blocks)
                    if mapped
                    else BlockStreamer(blocks[name], self.device, p.resident_blocks, p.prefetch_slots)
                )
                self.slots[name] = _CoreSlot(module, self.device, block_ids)
            else:
                self.slots[name] = ModelSlot(module, self.device)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        mode = self.plan.placements[name].mode
        self.slots[name].load()
        streamer = self.streamers.get(name)
        if streamer:
            streamer.attach()
        try:
            yield
        finally:
            if streamer:
                streamer.detach()
            if mode != Mode.RESIDENT:
                self.slots[name].evict()

    def drop(self, name: str) -> None:
        """Forget a model (e.g. text encoders freed after encoding): its weights stay on the host."""
        slot = self.slots.pop(name, None)
        if slot is not None:
            slot.evict()
        self.streamers.pop(name, None)

    def close(self) -> None:
        for slot in self.slots.values():
            slot.evict()

    @property
    def tiled_decode(self) -> bool:
        """Decode the VAE in tiles: on an accelerator whose plan is not everything-resident."""
        return not self.plan.high_vram and self.device.type != "cpu"

    def describe(self) -> str | None:
        return self.plan.describe()


class NullMemory:
    """The manager of a job whose memory is not managed: every model stays where it was loaded."""

    plan = None
    tiled_decode = False

    def use(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def drop(self, name: str) -> None:
        pass

    def close(self) -> None:
        pass

    def describe(self) -> None:
        return None


class _CoreSlot(ModelSlot):
    """A ModelSlot over a model's tensors outside its streamed blocks."""

    def __init__(self, module: nn.Module, device: torch.device, block_ids: set[int]) -> None:
        self.module, self.device = module, torch.device(device)
        inside = {id(t) for b in module.modules() if id(b) in block_ids for t in _all_tensors(b)}
        self.entries = [e for e in _tensors(module) if id(_get(*e)) not in inside]
        pin = self.device.type == "cuda"
        self.host = []
        for entry in self.entries:
            t = _get(*entry).data.cpu()
            if pin and not t.is_pinned() and not is_mapped(t):
                t = t.pin_memory()
            _point(*entry, t)
            self.host.append(t)
        self.loaded = False


def _all_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [_get(*e) for e in _tensors(module)]


__all__ = [
    "BlockStreamer", "Footprint", "MemoryBudgetError", "MemoryManager", "Mode", "ModelSlot", "NullMemory", "Placement",
    "Plan", "configure_host_allocator", "footprint", "module_bytes", "plan_memory", "release_host_memory",
]  # fmt: skip


# ------------------------------------------------------------------------------- device facts
def device_free_bytes(device: torch.device) -> int:
    """Free device memory, counting what torch's caching allocator holds but does not use."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    return _available_host_bytes()


def device_total_bytes(device: torch.device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory())
    return _available_host_bytes()


def auto_preserved_bytes(total: int) -> int:
    """Headroom left free in automatic mode: 0.5 GiB plus 5% of the device (display, fragmentation).

    A 6 GB card keeps 0.8 GB free, a 24 GB card 1.7 GB, an 80 GB card 4.5 GB.
    """
    return int(0.5 * GiB + 0.05 * total)


def _available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return 8 * GiB


def reset_peaks(device: torch.device) -> None:
    """Start measuring a job's peak device memory and peak host RSS."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass


def peaks(device: torch.device) -> tuple[int | None, int | None]:
    """(peak device bytes or None without CUDA, peak host RSS bytes or None) since `reset_peaks`."""
    vram = torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None
    try:
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        rss = None
    return vram, rss


def current_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
