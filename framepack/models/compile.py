"""Regional torch.compile of the transformer, attached from outside (`compile_blocks(model)`).

Only the repeated blocks are compiled: the double-stream, single-stream and token-refiner block
classes. Each block's `forward` is wrapped by `torch.compile`, and because dynamo treats a module's
parameters as graph inputs (`inline_inbuilt_nn_modules`, the default), every block of a class runs
the same compiled graph: one compile per class (per device, dtype and shape set), not one per block,
and no whole-model graph that a step cache, block streaming or a LoRA merge would break:

  * step caches (TeaCache, MagCache) decide outside the blocks whether to run them at all;
  * block streaming moves a block's weights onto the device before it runs: the same shapes and
    dtypes on the same device, so the same graph;
  * a LoRA merge writes new values into the same weight tensors: no recompile.

Shapes: within a job every section has the same token count (the packed context is constant), so
steps and sections reuse one graph. A new prompt length or resolution changes the sequence length:
dynamo then recompiles once with that dimension dynamic (`dynamic=None`, its automatic mode) and
later lengths reuse it. `compile_counts()` reports how many graphs dynamo has built, for tests and
benchmarks that must show there are no recompiles between sections.

The compiled blocks compute the same function as eager ones (inductor reorders floating-point work,
so outputs match to rounding, checked in tests/test_compile.py).
"""

from __future__ import annotations

import time

import torch
from torch import nn


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    out = [model.transformer_blocks, model.single_transformer_blocks]
    refiner = getattr(getattr(model, "context_embedder", None), "token_refiner", None)
    if refiner is not None:
        out.append(refiner.refiner_blocks)
    return out


def compile_blocks(model: nn.Module, *, backend: str = "inductor", mode: str | None = None,
                   dynamic: bool | None = None) -> dict:  # fmt: skip
    """Wrap every block's forward with torch.compile, in place; the compile itself happens lazily, at
    the first call of each block class. Returns {"blocks": n, "classes": [...]}. Compiling twice is a
    no-op for the blocks already compiled."""
    compiled, classes = 0, []
    for blocks in _block_lists(model):
        for block in blocks:
            if getattr(block, "_framepack_compiled", False):
                continue
            block.compile(backend=backend, mode=mode, dynamic=dynamic)
            block._framepack_compiled = True
            compiled += 1
            if type(block).__name__ not in classes:
                classes.append(type(block).__name__)
    model._framepack_compile = {"backend": backend, "mode": mode, "blocks": compiled, "classes": classes,
                                "at": time.time()}  # fmt: skip
    return {"blocks": compiled, "classes": classes}


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(b, "_framepack_compiled", False) for blocks in _block_lists(model) for b in blocks)


def compile_counts() -> dict[str, int]:
    """Graphs dynamo has compiled so far in this process ("graphs"), and the frames it compiled
    ("frames"): a rise between two calls means a (re)compile happened in between."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "frames": int(counters["frames"]["ok"])}


def reset_compiled() -> None:
    """Forget every compiled graph (tests; after this the next call compiles again)."""
    torch._dynamo.reset()
