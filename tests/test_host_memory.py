"""Host RAM of memory-mapped weights: no second copy of the text encoder, pages released after use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys, torch
    from transformers import LlamaConfig, LlamaModel
    from framepack.components import _load_llama
    from framepack.memory import current_rss, release_host_memory, MemoryManager, Plan, Placement, Mode
    from framepack.memory import configure_host_allocator
    from framepack.weights import is_mapped, map_tensors, release_pages

    configure_host_allocator()  # as load_pipeline does
    path = sys.argv[1]
    cfg = LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=32000)
    torch.manual_seed(0)
    LlamaModel(cfg).save_pretrained(path)
    gc.collect(); release_host_memory()
    r = {"model_bytes": sum(p.numel() * 4 for p in LlamaModel(cfg).parameters())}
    gc.collect(); release_host_memory()

    def rss():
        gc.collect(); release_host_memory(); return current_rss()

    # warm up: the first forward in a process loads kernels and code pages; that is not a weight copy
    warm = LlamaModel(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=8,
                                  num_key_value_heads=8, vocab_size=32000))
    with torch.no_grad():
        warm(input_ids=torch.randint(0, 32000, (1, 300)))
    del warm

    base = rss()
    model = _load_llama(path, torch.float32, torch.device("cpu"))
    r["mapped"] = all(is_mapped(p) for p in model.parameters())
    r["after_load"] = rss() - base  # nothing read yet
    plan = Plan(1, {"t": Placement(Mode.STREAM, 1, 0, 1)})
    manager = MemoryManager("cpu", plan, {"t": model}, {"t": list(model.layers)})
    ids = torch.randint(0, 32000, (1, 300))
    with manager.use("t"), torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
        release_host_memory()
        r["during"] = current_rss() - base
    r["after_phase"] = rss() - base  # every copied tensor's pages were released
    del model, manager, out
    r["after_free"] = rss() - base

    # touch every page of a mapping, then release it
    base = rss()
    tensors = map_tensors(path)
    total = sum(float(t.sum()) for t in tensors.values())
    r["touched"] = rss() - base
    for t in tensors.values():
        release_pages(t)
    r["released"] = rss() - base
    print(json.dumps(r))
    """
)


@pytest.mark.slow
def test_mapped_text_encoder_keeps_no_host_copy(tmp_path):
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "llama")], capture_output=True, text=True,
                         check=True, env={**os.environ})  # fmt: skip
    r = json.loads(out.stdout.strip().splitlines()[-1])
    size = r["model_bytes"]
    assert size > 150 * 2**20 and r["mapped"]
    assert r["after_load"] < 0.1 * size  # mapping reads nothing
    assert r["during"] < 0.6 * size  # streaming touches one layer at a time (+ the embedding table)
    assert r["after_phase"] < 0.1 * size and r["after_free"] < 0.1 * size
    assert r["touched"] > 0.9 * size and r["released"] < 0.1 * size
