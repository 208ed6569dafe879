"""`framepack generate --gpus N` and `torchrun --nproc-per-node N -m framepack.app.cli generate ...`:
one video on several GPUs (framepack.parallel). Rank 0 is the process that loads the pipeline and
writes the video; the others load only the transformer and follow."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any


def add_gpus_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="one video on N GPUs of this machine: sequence-parallel attention (N must divide the "
                   "model's 24 heads: 1, 2, 3, 4, 6, 8), with real CFG (--cfg > 1, no step cache) also the two "
                   "passes at once on two halves; --device cpu runs N CPU ranks (gloo). torchrun works too: "
                   "torchrun --nproc-per-node N -m framepack.app.cli generate ...")  # fmt: skip


def ranks_asked(args: argparse.Namespace) -> int:
    from framepack.parallel import ParallelError, torchrun_env

    env = torchrun_env()
    if env is not None:
        return env[1]
    gpus = 1 if args.gpus is None else args.gpus
    if gpus < 1:
        raise ParallelError(f"--gpus must be at least 1, got {gpus}")
    return gpus


def device_kind(args: argparse.Namespace) -> str:
    import torch

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        return "cuda"
    if name != "cpu":
        from framepack.parallel import ParallelError

        raise ParallelError(f"--gpus runs on CUDA devices or CPU ranks, not {name!r}")
    return "cpu"


def follower_spec(args: argparse.Namespace, model: str, options: Any) -> Any:
    from framepack.parallel import FollowerSpec

    return FollowerSpec(model, device_kind(args), args.models_dir, not args.offline, options)


def run_follower_if_torchrun(args: argparse.Namespace, model: str, options: Any) -> bool:
    """Under torchrun, ranks above 0 follow here (True: this process was one, it is done)."""
    from framepack.parallel import follower_main, torchrun_env

    env = torchrun_env()
    if env is None or env[0] == 0:
        return False
    rank, world, local = env
    follower_main(rank, world, int(os.environ["MASTER_PORT"]), follower_spec(args, model, options),
                  address=os.environ.get("MASTER_ADDR", "127.0.0.1"), local_rank=local)  # fmt: skip
    return True


def check_ranks(args: argparse.Namespace, world: int) -> None:
    """What can be told before any weight loads: the devices are there (torchrun brings its own)."""
    from framepack import parallel

    if parallel.torchrun_env() is None:
        parallel.check_devices(world, device_kind(args))


@contextlib.contextmanager
def ranks_for(args: argparse.Namespace, pipe: Any, model: str, world: int) -> Iterator[None]:
    """Rank 0's side of a run on `world` ranks: the other ranks started (spawned here, or by torchrun)
    and joined, `pipe`'s transformer hooked to them. ParallelError for a degree that does not divide the
    model's heads."""
    from framepack import parallel

    parallel.check_degree(world, pipe.c.transformer.config.num_attention_heads)
    kind = device_kind(args)
    env = parallel.torchrun_env()
    if env is None:
        print(f"starting {world - 1} more rank{'s' if world > 2 else ''} ({kind}) ...", file=sys.stderr)
        launch = parallel.Launch(world, follower_spec(args, model, pipe.c.options))
    else:
        launch = _TorchrunRankZero(world, parallel.rank_device(kind, env[2]))
    pipe.c.transformer.parallel = launch.blocks
    try:
        with launch:
            yield
    finally:
        pipe.c.transformer.parallel = None


class _TorchrunRankZero:
    """Rank 0 started by torchrun: join the group torchrun's environment describes."""

    def __init__(self, world: int, device: Any) -> None:
        from framepack import parallel

        self.world = world
        self.collective = parallel.init(0, world, device, os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                        int(os.environ["MASTER_PORT"]))  # fmt: skip
        self.blocks = parallel.ParallelBlocks(self.collective)  # torchrun itself reports which rank failed

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        self.blocks.stop()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


class RankGroupLoader:
    """The job queue's loader for `serve --gpus N` / `ui --gpus N`: each pipeline it loads comes with
    N - 1 follower ranks (spawned here) holding the same model's transformer, so every job runs on the
    group. `release(pipe)` stops a pipeline's ranks (the runner calls it when it swaps models and when
    the queue closes). Plain data until its first call, so a Ray worker can hold one (`serve --ray
    --gpus N`: each worker owns N GPUs and runs its jobs on them)."""

    def __init__(self, loader: Any, world: int, device: str) -> None:
        from framepack import parallel

        if world < 2:
            raise parallel.ParallelError(f"a group of GPUs needs at least 2, got {world}")
        self.loader, self.world, self.device = loader, world, device
        self._launches: dict[int, Any] = {}

    def __call__(self, model: str) -> Any:
        from framepack import parallel

        parallel.check_devices(self.world, self.device)  # where the group runs (a Ray worker: its own GPUs)
        pipe = self.loader(model)
        parallel.check_degree(self.world, pipe.c.transformer.config.num_attention_heads)
        spec = parallel.FollowerSpec(model, self.device, self.loader.models_dir, self.loader.download,
                                     self.loader.options)  # fmt: skip
        print(f"starting {self.world - 1} more rank{'s' if self.world > 2 else ''} for {model!r} ...", file=sys.stderr)
        launch = parallel.Launch(self.world, spec)
        pipe.c.transformer.parallel = launch.blocks
        self._launches[id(pipe)] = launch
        return pipe

    def release(self, pipe: Any) -> None:
        launch = self._launches.pop(id(pipe), None)
        if launch is not None:
            pipe.c.transformer.parallel = None
            launch.__exit__(None, None, None)
