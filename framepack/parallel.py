"""One video on several GPUs: Ulysses sequence parallel and CFG-parallel passes over torch.distributed.

Roles. Rank 0 runs the whole engine as on one GPU (encoders, VAE, sampler, step cache, MP4 writer,
progress). Every other rank holds only the transformer's blocks and follows: when rank 0's transformer
reaches its blocks (`FramePackTransformer._blocks`, the one hook: `transformer.parallel`), it broadcasts
the blocks' inputs (the image-stream tokens, the refined conditioning tokens, the time embedding, the
section's RoPE table when it changed, the key padding) and all ranks run the blocks together; the
final hidden states of the noisy rows come back to rank 0, which goes on alone (final norm,
projection, sampler). Embedders, the text refiner and step-cache decisions happen once, on rank 0, so
every rank runs the same blocks calls in the same order by construction.

Ulysses (per blocks call, over a group of `sp` ranks). The image stream [4x | 2x | 1x context | noisy]
is padded to a multiple of `sp` rows and split into contiguous shards; the conditioning stream
[SigLIP | text] is split too when its count divides `sp`, and otherwise kept whole on every rank (a
"joint" part), as xDiT does. Everything outside attention is token-local and runs on the shards (a
whole joint part is computed on every rank, cheaply: ~900 rows next to ~18,000). In each attention
the shards go from sequence shards to head shards by an all-to-all (a whole joint part is cut to the
rank's heads), and the attention runs over [image (all rows) | joint | image padding] with the
padding keys masked, so the valid keys are one prefix per sample exactly as on one GPU; an all-to-all
brings the rows back to sequence shards (a whole joint part: an all-gather of its heads). RoPE is
sliced per shard (padding rows get the identity rotation). The degree must divide the heads (24 in
the real model: 1, 2, 3, 4, 6, 8).

CFG parallel. With real CFG (cfg > 1) the engine may ask for both passes in one batched call (batch 2:
cond, uncond); the world is then split in two groups of `world / 2` ranks, each running one sample of
the batch with Ulysses inside it (4 GPUs = 2 CFG x 2 Ulysses). The result equals the two sequential
passes up to floating-point reassociation.

Noise is drawn on rank 0 only (the sampler runs there), so the result does not depend on the degree.
A job's LoRAs are merged on every rank: rank 0 sends the files (by path), weights and module filters
(`send_loras`), and each follower merges them into its transformer as rank 0 did.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from framepack.models.attention import KeyPadding

ENV_TIMEOUT = "FRAMEPACK_PARALLEL_TIMEOUT_S"  # how long a rank waits in a collective (default 600 s)


class ParallelError(RuntimeError):
    """A degree that cannot split the model, more ranks than devices, or a rank that stopped."""


def divisors(heads: int) -> list[int]:
    return [d for d in range(1, heads + 1) if heads % d == 0]


def check_degree(world: int, heads: int, *, cfg_parallel: bool = False) -> None:
    """ParallelError unless `world` ranks can split `heads` heads (and, for CFG parallel, halves can)."""
    allowed = ", ".join(map(str, [d for d in divisors(heads) if d <= 8] or divisors(heads)))
    if world < 1 or heads % world:
        raise ParallelError(f"--gpus {world} does not divide the model's {heads} attention heads: sequence "
                            f"parallel splits the heads between the GPUs (use {allowed})")  # fmt: skip
    if cfg_parallel and (world % 2 or heads % (world // 2)):
        raise ParallelError(f"CFG parallel on {world} GPUs needs an even count whose half divides the {heads} heads")


# ------------------------------------------------------------------------------ communication
@dataclass
class Collective:
    """The process groups of one run: the world (Ulysses over every rank) and, for an even world, its two
    halves (CFG parallel: one pass per half). `device`: where this rank's tensors live."""

    world: int
    rank: int
    device: torch.device
    halves: list[Any] | None = None

    @classmethod
    def create(cls, device: torch.device) -> Collective:
        world, rank = dist.get_world_size(), dist.get_rank()
        halves = None
        if world > 1 and world % 2 == 0:
            half = world // 2
            halves = [dist.new_group(list(range(0, half))), dist.new_group(list(range(half, world)))]
        return cls(world, rank, device, halves)

    def layout(self, cfg: int) -> tuple[Any, int, int, int]:
        """(group, its size, this rank's place in it, this rank's CFG group) for a call split `cfg` ways."""
        if cfg == 1:
            return None, self.world, self.rank, 0
        half = self.world // 2
        return self.halves[self.rank // half], half, self.rank % half, self.rank // half


def _seq_to_heads(x: torch.Tensor, sp: int, group: Any) -> torch.Tensor:
    """(B, L, H, D) sequence shard -> (B, sp * L, H / sp, D): every shard's rows, this rank's heads."""
    b, n, heads, d = x.shape
    chunks = x.reshape(b, n, sp, heads // sp, d).permute(2, 0, 1, 3, 4).contiguous()  # chunk j goes to rank j
    out = torch.empty_like(chunks)
    dist.all_to_all_single(out, chunks, group=group)  # out[j]: rank j's rows, this rank's heads
    return out.permute(1, 0, 2, 3, 4).reshape(b, sp * n, heads // sp, d)


def _heads_to_seq(x: torch.Tensor, sp: int, group: Any) -> torch.Tensor:
    """The inverse: (B, sp * L, H / sp, D) -> (B, L, H, D) for this rank's rows."""
    b, total, h, d = x.shape
    n = total // sp
    chunks = x.reshape(b, sp, n, h, d).permute(1, 0, 2, 3, 4).contiguous()  # rows of shard j go to rank j
    out = torch.empty_like(chunks)
    dist.all_to_all_single(out, chunks, group=group)  # out[j]: this rank's rows, rank j's heads
    return out.permute(1, 2, 0, 3, 4).reshape(b, n, sp * h, d)


class UlyssesAttention:
    """The attention of one blocks call on a sequence shard (see the module docstring). Called by the
    blocks as `attend(q, k, v, padding)` with q/k/v = [image shard | joint part]; `padding` is ignored
    (this object knows the whole call's key padding)."""

    def __init__(self, inner: Any, group: Any, sp: int, sp_rank: int, n_img: int, n_cond: int,
                 lengths: list[int], text_sharded: bool = False) -> None:  # fmt: skip
        self.inner, self.group, self.sp, self.sp_rank = inner, group, sp, sp_rank
        self.n_img, self.n_cond, self.lengths = n_img, n_cond, lengths
        self.text_sharded = text_sharded  # the joint part is split too (its count divides the degree)
        self.n_joint = n_cond // sp if text_sharded else n_cond  # its rows on this rank
        self._pads: dict[int, KeyPadding | None] = {}  # by key count: one per call, its masks cached inside

    def _padding(self, total: int) -> KeyPadding | None:
        if total not in self._pads:
            self._pads[total] = None if all(n == total for n in self.lengths) else KeyPadding(self.lengths, total)
        return self._pads[total]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding: Any = None) -> torch.Tensor:
        if self.sp == 1 and k.shape[1] == self.n_img + self.n_cond:  # one rank, no padding rows: as without
            return self.inner(q, k, v, self._padding(k.shape[1]))  # the hook (q: all rows, or the kept ones)
        n_local = q.shape[1] - self.n_joint
        heads = q.shape[2] // self.sp
        mine = slice(self.sp_rank * heads, (self.sp_rank + 1) * heads)
        parts = []
        for t in (q, k, v):
            img, joint = t[:, :n_local], t[:, n_local:]
            if self.sp > 1:
                img = _seq_to_heads(img, self.sp, self.group)
                joint = _seq_to_heads(joint, self.sp, self.group) if self.text_sharded else joint[:, :, mine]
            # [valid image rows | joint | padding rows]: the valid keys stay one prefix per sample
            parts.append(torch.cat([img[:, : self.n_img], joint, img[:, self.n_img :]], 1))
        o = self.inner(*parts, self._padding(parts[0].shape[1]))
        n_img, end = self.n_img, self.n_img + self.n_cond
        img, joint = torch.cat([o[:, :n_img], o[:, end:]], 1), o[:, n_img:end]
        if self.sp > 1:
            img = _heads_to_seq(img, self.sp, self.group)
            if self.text_sharded:
                joint = _heads_to_seq(joint, self.sp, self.group)
            else:
                gathered = [torch.empty_like(joint) for _ in range(self.sp)]
                dist.all_gather(gathered, joint.contiguous(), group=self.group)
                joint = torch.cat(gathered, 2)
        return torch.cat([img, joint], 1)


def sharded_blocks(model: Any, x_img: torch.Tensor, cond: torch.Tensor, temb: torch.Tensor, rope: tuple,
                   n_ctx: int, lengths: list[int] | None, collective: Collective,
                   cfg: int) -> torch.Tensor:  # fmt: skip
    """Every rank's part of one blocks call; returns the noisy rows' final hidden states (B, n_noisy, D)
    (complete on every rank)."""
    group, sp, sp_rank, g = collective.layout(cfg)
    b, n_img, _ = x_img.shape
    n_cond = cond.shape[1]
    rows = slice(g * b // cfg, (g + 1) * b // cfg)  # this CFG group's samples
    x_img, cond, temb = x_img[rows], cond[rows], temb[rows]
    if rope[0].shape[0] > 1:
        rope = (rope[0][rows], rope[1][rows])
    full = [n_img + n_cond] * b
    lengths = (lengths or full)[rows]
    pad = (-n_img) % sp
    per = (n_img + pad) // sp
    mine = slice(sp_rank * per, (sp_rank + 1) * per)
    if sp == 1:  # one rank (or one per CFG half): the whole sequence, as without the hook
        xi, cos, sin = x_img, rope[0], rope[1]
    else:
        xi = F.pad(x_img, (0, 0, 0, pad))[:, mine]
        cos = F.pad(rope[0], (0, 0, 0, 0, 0, pad), value=1.0)[:, mine].contiguous()  # padding rows: no rotation
        sin = F.pad(rope[1], (0, 0, 0, 0, 0, pad), value=0.0)[:, mine].contiguous()
    text_sharded = sp > 1 and n_cond % sp == 0  # as xDiT: the joint part is split when its count divides
    if text_sharded:
        per_cond = n_cond // sp
        cond = cond[:, sp_rank * per_cond : (sp_rank + 1) * per_cond]
    attend = UlyssesAttention(model.attention, group, sp, sp_rank, n_img, n_cond, lengths, text_sharded)
    # One residual buffer, as FramePackTransformer._blocks: the blocks update its image and conditioning
    # views in place (inference), and the caller's x_img and cond stay untouched.
    x = torch.cat([xi, cond], 1)
    xi, xt = x[:, :per], x[:, per:]
    for blk in model.transformer_blocks:
        xi, xt = blk(xi, xt, temb, (cos, sin), None, attend)
    last = len(model.single_transformer_blocks) - 1
    keep = slice(n_ctx, n_img) if sp == 1 and last >= 0 else None  # one rank: only the noisy rows at the end
    for i, blk in enumerate(model.single_transformer_blocks):
        x = blk(x, temb, (cos, sin), None, attend, keep if i == last else None)
    shard = x if keep is not None else x[:, :per]  # the noisy rows (one rank), or this rank's image rows
    if collective.world > 1:
        gathered = [torch.empty_like(shard) for _ in range(collective.world)]
        dist.all_gather(gathered, shard.contiguous())
        half = collective.world // cfg
        shard = torch.cat([torch.cat(gathered[j * half : (j + 1) * half], 1) for j in range(cfg)], 0)  # group order
    return shard if keep is not None else shard[:, n_ctx:n_img]


# --------------------------------------------------------------------------------- the roles
class ParallelBlocks:
    """Rank 0's hook (`transformer.parallel`): broadcast a blocks call to the followers and run it with
    them. `cfg_split()`: the calls inside run a batch of 2 as two CFG groups."""

    def __init__(self, collective: Collective) -> None:
        self.collective = collective
        self._split = False
        self.calls = 0
        self.describe: Any = None  # () -> "rank R of N exited with code C" | None: named in errors
        self._rope: torch.Tensor | None = None  # the RoPE table the followers have (held: its identity stays its own)

    @property
    def world(self) -> int:
        return self.collective.world

    @property
    def can_split_cfg(self) -> bool:
        return self.collective.halves is not None

    @contextlib.contextmanager
    def cfg_split(self) -> Iterator[None]:
        self._split, before = self.can_split_cfg, self._split
        try:
            yield
        finally:
            self._split = before

    def run(self, model: Any, x_img: torch.Tensor, cond: torch.Tensor, temb: torch.Tensor, sec: Any) -> torch.Tensor:
        c = self.collective
        cfg = 2 if self._split and x_img.shape[0] == 2 else 1
        lengths = sec.joint_padding.lengths if sec.joint_padding is not None else None
        self.calls += 1
        if c.world > 1:
            send_rope = self._rope is not sec.rope[0]  # once per section (its table is cached with it)
            header = {"op": "blocks", "cfg": cfg, "n_ctx": sec.n_ctx, "lengths": lengths, "dtype": x_img.dtype,
                      "x": tuple(x_img.shape), "cond": tuple(cond.shape), "temb": tuple(temb.shape),
                      "rope": tuple(sec.rope[0].shape) if send_rope else None,
                      "rope_dtype": sec.rope[0].dtype}  # fmt: skip
            _guard(lambda: dist.broadcast_object_list([header], src=0), "sending a blocks call", self.describe)
            tensors = [x_img.contiguous(), cond.contiguous(), temb.contiguous()]
            if send_rope:
                tensors += [sec.rope[0].contiguous(), sec.rope[1].contiguous()]
                self._rope = sec.rope[0]
            for t in tensors:
                _guard(lambda t=t: dist.broadcast(t, src=0), "sending a blocks call", self.describe)
        return _guard(lambda: sharded_blocks(model, x_img, cond, temb, sec.rope, sec.n_ctx, lengths, c, cfg),
                      "running the blocks", self.describe)  # fmt: skip

    def send_loras(self, loaded: list) -> None:
        """Rank 0 merged `loaded` (framepack.lora.LoadedLora) into its transformer: every follower merges
        the same files, weights and module filters into its own, and says whether it could (a rank that
        could not stops the job here, before any step)."""
        c = self.collective
        if c.world == 1:
            return
        items = [{"path": str(x.path), "sha256": x.sha256, "weight": x.weight, "include": x.include,
                  "exclude": x.exclude} for x in loaded]  # fmt: skip
        _guard(lambda: dist.broadcast_object_list([{"op": "loras", "loras": items}], src=0), "sending the LoRAs",
               self.describe)  # fmt: skip
        failed = torch.zeros(1, device=c.device)
        _guard(lambda: dist.all_reduce(failed, op=dist.ReduceOp.MAX), "merging the LoRAs", self.describe)
        if failed.item() > 0:
            raise ParallelError("another rank could not merge the job's LoRAs (its error is printed above); the "
                                "LoRA files must be at the same paths on every machine")  # fmt: skip

    def stop(self) -> None:
        if self.collective.world > 1:
            with contextlib.suppress(Exception):
                dist.broadcast_object_list([{"op": "stop"}], src=0)


def follow(model: Any, collective: Collective, originals: Any = None) -> int:
    """A follower rank's loop: run every blocks call rank 0 broadcasts until it says stop; returns the
    number of calls run. `originals`: the transformer's weights as loaded (`weights.CheckpointTensors`;
    None: copies kept in memory), which LoRA switching restores from."""
    calls, rope, merger = 0, None, None
    dev = collective.device
    with torch.inference_mode():
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            header = box[0]
            if header["op"] == "stop":
                return calls
            if header["op"] == "loras":
                merger = _merge_loras(model, header["loras"], merger, originals, collective)
                continue
            dt = header["dtype"]
            x, cond, temb = (torch.empty(header[k], dtype=dt, device=dev) for k in ("x", "cond", "temb"))
            for t in (x, cond, temb):
                dist.broadcast(t, src=0)
            if header["rope"] is not None:
                rope = tuple(torch.empty(header["rope"], dtype=header["rope_dtype"], device=dev) for _ in range(2))
                for t in rope:
                    dist.broadcast(t, src=0)
            sharded_blocks(model, x, cond, temb, rope, header["n_ctx"], header["lengths"], collective, header["cfg"])
            calls += 1


def _merge_loras(model: Any, items: list[dict], merger: Any, originals: Any, collective: Collective) -> Any:
    """A follower's side of `ParallelBlocks.send_loras`: the same LoRA set merged here; returns the merger."""
    from framepack.lora import KeptWeights, LoraLibrary, LoraMerger, LoraRef
    from framepack.models.lora import TargetTable

    failed = torch.zeros(1, device=collective.device)
    try:
        library, table, loaded = LoraLibrary(None), TargetTable.of(model), []
        for x in items:
            loaded += library.load((LoraRef(x["path"], x["weight"], x["sha256"]),), table, x["include"], x["exclude"])
        if merger is None and loaded:
            merger = LoraMerger(model, originals if originals is not None else KeptWeights(model))
        if merger is not None:
            merger.apply(loaded)
    except Exception as err:  # rank 0 stops the job with a clear error; this rank goes on following
        print(f"framepack rank {collective.rank}: could not merge the LoRAs: {err}", file=sys.stderr, flush=True)
        failed += 1
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    return merger


def _guard(fn: Any, what: str, describe: Any = None) -> Any:
    """A collective that failed because another rank is gone becomes a ParallelError naming it
    (`describe()`: which rank ended, when the launcher knows)."""
    try:
        return fn()
    except ParallelError:
        raise
    except RuntimeError as err:
        if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
            raise
        who = (describe() if describe is not None else None) or "another rank stopped"
        raise ParallelError(f"{who} while {what} ({str(err).splitlines()[0] if str(err) else type(err).__name__})",
                            ) from err  # fmt: skip


# --------------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world, local rank) when started by torchrun (its environment), else None."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(kind: str, local_rank: int) -> torch.device:
    return torch.device(f"cuda:{local_rank}") if kind == "cuda" else torch.device("cpu")


def check_devices(world: int, kind: str) -> None:
    """ParallelError when `world` ranks need more GPUs than this machine has."""
    if kind != "cuda":
        return
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if world > have:
        raise ParallelError(f"--gpus {world} but this machine has {have} CUDA device{'s' if have != 1 else ''} "
                            "(--device cpu runs CPU ranks instead)")  # fmt: skip


def init(rank: int, world: int, device: torch.device, address: str, port: int) -> Collective:
    """Join the process group (NCCL on CUDA, gloo on CPU) and make this run's groups."""
    timeout = timedelta(seconds=float(os.environ.get(ENV_TIMEOUT, "600")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                            timeout=timeout)  # fmt: skip
    return Collective.create(device)


@dataclass(frozen=True)
class FollowerSpec:
    """What a follower rank loads: the model's transformer, as rank 0 loads it."""

    model: str
    device: str  # "cuda" or "cpu"
    models_dir: str | None = None
    download: bool = True
    options: Any = None  # config.RuntimeOptions (fp8, compile)
    attention: str = "auto"


def follower_main(rank: int, world: int, port: int, spec: FollowerSpec, address: str = "127.0.0.1",
                  local_rank: int | None = None) -> None:  # fmt: skip
    """A follower process: load the transformer, join, follow until rank 0 stops (torchrun or --gpus)."""
    from framepack.components import load_transformer_for
    from framepack.registry import get_spec, resolve_spec
    from framepack.weights import CheckpointTensors

    device = rank_device(spec.device, rank if local_rank is None else local_rank)
    try:
        model = load_transformer_for(spec.model, device, models_dir=spec.models_dir, download=spec.download,
                                     options=spec.options, attention=spec.attention)  # fmt: skip
        paths = resolve_spec(get_spec(spec.model), models_root=spec.models_dir, download=False)
        originals = CheckpointTensors(paths["transformer"], model.dtype)  # what LoRA switching restores from
    except BaseException as err:
        print(f"framepack rank {rank}: could not load {spec.model!r}: {err}", file=sys.stderr, flush=True)
        raise
    collective = init(rank, world, device, address, port)
    try:
        follow(model, collective, originals)
    except RuntimeError as err:  # rank 0 went away: say so and stop
        print(f"framepack rank {rank}: rank 0 stopped ({str(err).splitlines()[0]}); stopping", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


class Launch:
    """`framepack generate --gpus N`: this process is rank 0; N - 1 follower processes are spawned here
    (torch.multiprocessing, spawn), each loading the transformer. Use as a context manager: on exit the
    followers are told to stop and joined. `rank_status()` says which follower ended, and how."""

    def __init__(self, world: int, spec: FollowerSpec) -> None:
        import torch.multiprocessing as mp

        self.world, self.spec = world, spec
        self.port = free_port()
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=follower_main, args=(r, world, self.port, spec), daemon=True,
                                  name=f"framepack-rank-{r}") for r in range(1, world)]  # fmt: skip
        for p in self.procs:
            p.start()
        self.device = rank_device(spec.device, 0)
        try:
            self.collective = init(0, world, self.device, "127.0.0.1", self.port)
        except BaseException:
            self._end()
            raise
        self.blocks = ParallelBlocks(self.collective)
        self.blocks.describe = self.rank_status  # errors name the follower that ended

    def rank_status(self) -> str | None:
        """'rank R of N exited with code C' for the first follower that has ended, else None."""
        for r, p in enumerate(self.procs, start=1):
            p.join(0.5)  # a rank whose connection just broke may still be ending
            if not p.is_alive():
                return f"rank {r} of {self.world} exited with code {p.exitcode}"
        return None

    def __enter__(self) -> Launch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.blocks.stop()
        self._end()

    def _end(self) -> None:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
