"""Checkpoint loading: round trips in both on-disk layouts, and every bad checkpoint named precisely."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_inputs, randomize_
from safetensors.torch import save_file

from framepack import CheckpointError, load_transformer, save_transformer
from framepack.config import TINY
from framepack.models.transformer import FramePackTransformer
from framepack.weights import INDEX_NAME, WEIGHTS_NAME, infer_config, open_checkpoint


@pytest.fixture(scope="module")
def model():
    return randomize_(FramePackTransformer(TINY), seed=1).eval()


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(TINY, "original_p0", seed=3)


def _out(m, kw):
    with torch.no_grad():
        return m(**kw).sample


@pytest.fixture
def sharded(tmp_path, model):
    return save_transformer(model, tmp_path / "ckpt", max_shard_bytes=60_000)


def test_round_trip_sharded_directory(model, inputs, sharded):
    names = sorted(p.name for p in sharded.iterdir())
    shards = [n for n in names if n.startswith("diffusion_pytorch_model-")]
    assert len(shards) >= 3 and INDEX_NAME in names and "config.json" in names
    assert json.loads((sharded / "config.json").read_text())["_class_name"] == "HunyuanVideoTransformer3DModelPacked"
    loaded = load_transformer(sharded, dtype=torch.float32)
    assert torch.equal(_out(loaded, inputs), _out(model, inputs))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_round_trip_single_file(tmp_path, model, inputs):
    path = save_transformer(model, tmp_path / "fp.safetensors")
    loaded = load_transformer(path)
    assert loaded.config == TINY
    assert torch.equal(_out(loaded, inputs), _out(model, inputs))


def test_diffusers_class_reads_our_directory(sharded, model, inputs):
    """Our saved layout is the official one: diffusers' FramePack class loads it as is."""
    from conftest import to_diffusers_kwargs
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    ref = HunyuanVideoFramepackTransformer3DModel.from_pretrained(sharded).eval()
    with torch.no_grad():
        expected = ref(**to_diffusers_kwargs(inputs)).sample
    assert (expected - _out(model, inputs)).abs().max() <= 1e-5


def test_dtype_conversion_on_load(tmp_path, model, inputs):
    path = save_transformer(model, tmp_path / "bf16", dtype=torch.bfloat16)
    kept = load_transformer(path)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    up = load_transformer(path, dtype=torch.float32)
    assert {p.dtype for p in up.parameters()} == {torch.float32}
    ref = FramePackTransformer(TINY)
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    assert torch.equal(_out(up, inputs), _out(ref.eval(), inputs))
    with pytest.raises(ValueError, match="dtype must be"):
        load_transformer(path, dtype=torch.int8)


def test_single_file_without_metadata_infers_official_config():
    from framepack.config import FRAMEPACK_HY

    with torch.device("meta"):
        full = FramePackTransformer(FRAMEPACK_HY)
    assert infer_config({k: tuple(v.shape) for k, v in full.state_dict().items()}) == FRAMEPACK_HY


# ------------------------------------------------------------------------------ bad checkpoints
def _rewrite_shard(directory: Path, edit) -> None:
    """Apply `edit(tensors)` to whichever shard holds proj_out.weight, keeping the index consistent."""
    index = json.loads((directory / INDEX_NAME).read_text())
    shard = directory / index["weight_map"]["proj_out.weight"]
    from safetensors.torch import load_file

    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != shard.name}
    index["weight_map"].update(dict.fromkeys(tensors, shard.name))
    (directory / INDEX_NAME).write_text(json.dumps(index))


def test_missing_key_is_named(sharded):
    _rewrite_shard(sharded, lambda t: t.pop("proj_out.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): proj_out.weight"):
        load_transformer(sharded)


def test_unexpected_key_is_named(sharded):
    _rewrite_shard(sharded, lambda t: t.update({"lora_A.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): lora_A.weight"):
        load_transformer(sharded)


def test_shape_mismatch_is_named(sharded):
    _rewrite_shard(sharded, lambda t: t.update({"proj_out.weight": torch.zeros(32, 32)}))
    with pytest.raises(CheckpointError, match=r"proj_out.weight: checkpoint \[32, 32\], model expects \[64, 32\]"):
        load_transformer(sharded)


def test_truncated_shard_is_named(sharded):
    shard = sorted(sharded.glob("diffusion_pytorch_model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=rf"{shard.name} is truncated"):
        load_transformer(sharded)


def test_corrupt_header_is_named(sharded):
    shard = sorted(sharded.glob("diffusion_pytorch_model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"garbage!!!!!"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name} is corrupt: its safetensors header is not valid JSON"):
        load_transformer(sharded)


def test_missing_shard_is_named(sharded):
    shard = sorted(sharded.glob("diffusion_pytorch_model-*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard\(s\) that do not exist .*{shard.name}"):
        load_transformer(sharded)


def test_config_of_another_model(sharded):
    cfg = json.loads((sharded / "config.json").read_text())
    cfg["_class_name"] = "FluxTransformer2DModel"
    (sharded / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="describes a 'FluxTransformer2DModel', not a FramePack transformer"):
        load_transformer(sharded)


def test_config_with_unknown_field(sharded):
    cfg = json.loads((sharded / "config.json").read_text())
    cfg["num_experts"] = 8
    (sharded / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unknown transformer config fields \['num_experts'\]"):
        load_transformer(sharded)


def test_config_that_does_not_fit_the_weights(sharded):
    cfg = json.loads((sharded / "config.json").read_text())
    cfg["num_layers"] = 2
    (sharded / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing \d+ key\(s\): transformer_blocks.1"):
        load_transformer(sharded)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"not found: no such file or directory"):
        load_transformer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        load_transformer(tmp_path / "empty")
    (tmp_path / "model.bin").write_bytes(b"x" * 100)
    with pytest.raises(CheckpointError, match=r"is not a \.safetensors file"):
        load_transformer(tmp_path / "model.bin")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file: only 3 bytes long"):
        load_transformer(tmp_path / "tiny.safetensors")


def test_offline_hub_repo_gives_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(CheckpointError, match=r"lllyasviel/FramePackI2V_HY is not in the local Hugging Face cache"):
        load_transformer("lllyasviel/FramePackI2V_HY")


def test_checkpoint_size_is_reported(sharded, model):
    ckpt = open_checkpoint(sharded)
    assert ckpt.nbytes == sum(p.numel() * p.element_size() for p in model.parameters())


# ------------------------------------------------------------------------------ peak host memory
_RSS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from framepack import load_transformer

    def hwm():  # peak RSS of this address space (ru_maxrss would include the parent's, across exec)
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
        return int(line.split()[1]) * 1024

    path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    base = hwm()
    m = load_transformer(path, dtype=dtype)
    total = sum(float(p.sum()) for p in m.parameters())  # touch every weight
    peak = hwm()
    print(peak - base, sum(p.numel() * p.element_size() for p in m.parameters()))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("stored,wanted", [("float32", "float32"), ("bfloat16", "float32")])
def test_loading_peak_rss_is_about_one_copy(tmp_path, stored, wanted):
    """A ~1 GB sharded checkpoint: peak RSS - baseline <= 1.1 x the loaded weights' bytes."""
    import dataclasses

    cfg = dataclasses.replace(
        TINY,
        num_attention_heads=8,
        attention_head_dim=128,
        rope_axes_dim=(16, 56, 56),
        num_layers=4,
        num_single_layers=6,
        text_embed_dim=1024,
    )  # fmt: skip  (1.04 GiB in fp32)
    with torch.device("meta"):
        meta = FramePackTransformer(cfg)
    path = tmp_path / "big"
    path.mkdir()
    shard, shards, size = {}, [], 0
    dt = getattr(torch, stored)
    for k, v in meta.state_dict().items():  # write shard by shard to keep this test's own RSS low
        shard[k] = torch.randn(v.shape, dtype=torch.float32).to(dt) * 0.01
        size += shard[k].numel() * shard[k].element_size()
        if size > 300 * 2**20:
            shards.append(shard)
            shard, size = {}, 0
    shards.append(shard)
    weight_map = {}
    for i, s in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(s, str(path / name))
        weight_map.update(dict.fromkeys(s, name))
    del shard, shards, s
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg.to_json_dict()))
    assert not (path / WEIGHTS_NAME).exists()
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), wanted], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, check=True)  # fmt: skip
    grown, weights = (int(x) for x in out.stdout.split())
    assert weights >= 2**30
    print(f"peak RSS growth {grown / 2**20:.0f} MiB for {weights / 2**20:.0f} MiB of weights: {grown / weights:.3f}x")
    assert grown <= 1.1 * weights
