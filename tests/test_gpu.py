"""CUDA-only checks (marker `gpu`; skipped without a CUDA device, run by benchmarks/gpu_suite.sh):
the block streamer's copy stream and events give the resident run's latents bit for bit, and every
attention backend that imports agrees with SDPA at the real model's head shape in bf16. (fp8 compute
vs its emulation: tests/test_quant.py.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import force_streamed_transformer
from PIL import Image

from framepack.config import GenerationRequest, RuntimeOptions
from framepack.models.attention import BACKENDS, KeyPadding, select_backend, unavailable_reason

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def start_image(tmp_path):
    path = tmp_path / "start.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def test_streamed_blocks_on_cuda_equal_resident_bit_for_bit(home, start_image, tmp_path, monkeypatch):
    import framepack.vae as vae_mod
    from framepack.pipeline import load_pipeline

    seen, real = [], vae_mod.decode
    monkeypatch.setattr(vae_mod, "decode", lambda m, latents, **k: (seen.append(latents.clone()), real(m, latents,
                                                                                                       **k))[1])
    request = GenerationRequest(image=start_image, prompt="a dot moves", steps=3, seconds=2.4, seed=3,
                                output=str(tmp_path / "resident.mp4"))  # fmt: skip
    options = RuntimeOptions(memory="managed")
    load_pipeline("tiny", device="cuda", options=options).generate(request)
    resident = list(seen)
    seen.clear()
    events, real_event = [], torch.cuda.Event

    class CountedEvent(real_event):
        def record(self, stream=None):
            events.append(stream)
            return super().record(stream)

    monkeypatch.setattr(torch.cuda, "Event", CountedEvent)
    force_streamed_transformer(monkeypatch)
    pipe = load_pipeline("tiny", device="cuda", options=options)
    result = pipe.generate(dataclasses.replace(request, output=str(tmp_path / "streamed.mp4")))
    assert result.status == "finished" and len(seen) == len(resident) == 2
    assert all(torch.equal(a, b) for a, b in zip(resident, seen))
    assert any(s is not None for s in events)  # copies were ordered by events on the streamer's copy stream
    assert all(p.device.type == "cpu" for p in pipe.c.transformer.parameters())  # back on the host after


@pytest.mark.parametrize("name", [b for b in BACKENDS if b != "sdpa"])
def test_every_backend_agrees_with_sdpa_at_the_real_head_shape(name):
    reason = unavailable_reason(name)
    if reason:
        pytest.skip(reason)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 24, 128, generator=g).to("cuda", torch.bfloat16) for n in (1536, 1800, 1800))
    padding = KeyPadding([1800, 1333], 1800)
    want = select_backend("sdpa")(q, k, v, padding).float()
    got = select_backend(name)(q, k, v, padding).float()
    err = ((got - want).norm() / want.norm()).item()
    assert err < (5e-2 if name == "sage" else 1e-2), err
