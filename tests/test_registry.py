"""Model registry: names, local copies, and the one clear message when weights are missing offline."""

from __future__ import annotations

import pytest

from framepack.registry import REGISTRY, get_spec, resolve_spec
from framepack.weights import CheckpointError


def test_registry_names_and_schedules():
    assert {n: s.schedule for n, s in REGISTRY.items()} == {
        "original": "inverted", "f1": "forward", "tiny": "inverted", "tiny-f1": "forward",
        "toy": "inverted", "toy-f1": "forward",
    }  # fmt: skip
    assert get_spec("original").transformer.repo == "lllyasviel/FramePackI2V_HY"
    assert get_spec("f1").transformer.repo == "lllyasviel/FramePack_F1_I2V_HY_20250503"
    assert get_spec("f1").text_encoder == get_spec("original").text_encoder  # shared encoders
    names = "original, f1, tiny, tiny-f1, toy, toy-f1"
    with pytest.raises(ValueError, match=f"unknown model 'sdxl'; choose one of: {names}"):
        get_spec("sdxl")


@pytest.fixture
def empty_hf(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def test_offline_missing_weights_one_message(empty_hf):
    with pytest.raises(CheckpointError) as err:
        resolve_spec(get_spec("original"))
    msg = str(err.value)
    for repo in ("hunyuanvideo-community/HunyuanVideo", "lllyasviel/flux_redux_bfl", "lllyasviel/FramePackI2V_HY"):
        assert repo in msg
    assert "framepack download original" in msg and "--models-dir" in msg


def test_local_copies_under_models_dir(empty_hf, tmp_path, monkeypatch):
    spec = get_spec("f1")
    for src in spec.sources.values():
        (tmp_path / "models" / src.repo / (src.subfolder or "")).mkdir(parents=True, exist_ok=True)
    paths = resolve_spec(spec, models_root=tmp_path / "models")
    assert paths["transformer"] == tmp_path / "models" / "lllyasviel/FramePack_F1_I2V_HY_20250503"
    assert paths["vae"] == tmp_path / "models" / "hunyuanvideo-community/HunyuanVideo" / "vae"
    monkeypatch.setenv("FRAMEPACK_MODELS_DIR", str(tmp_path / "models"))
    assert resolve_spec(spec) == paths
    # a partial copy: only the missing repo is named
    (tmp_path / "models" / "lllyasviel/FramePack_F1_I2V_HY_20250503").rename(tmp_path / "moved")
    with pytest.raises(CheckpointError) as err:
        resolve_spec(spec)
    assert "lllyasviel/FramePack_F1_I2V_HY_20250503" in str(err.value)
    assert "flux_redux_bfl" not in str(err.value)
