"""fp8 weight storage: the e4m3 rounding bound, memory halved, output error vs bf16, streaming."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_inputs, randomize_

from framepack.config import TINY
from framepack.memory import MemoryManager, Mode, Placement, Plan, module_bytes
from framepack.models.quant import E4M3_MAX, MODES, FP8Linear, quantize_fp8_
from framepack.models.transformer import FramePackTransformer


def test_fp8_linear_rounding_bound():
    """e4m3 keeps 3 mantissa bits: every weight in the normal range is within 2^-4 relative error."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    lin.weight.data = torch.randn(16, 64) * torch.logspace(-2, 1, 16)[:, None]  # rows of varied scale
    q = FP8Linear(lin, torch.float32)
    w, deq = lin.weight.detach(), q.weight
    scale = w.abs().amax(1, keepdim=True) / E4M3_MAX
    assert torch.allclose(deq.abs().amax(1), w.abs().amax(1))  # each row's absmax maps to 448 exactly
    normal = w.abs() >= scale * 2**-6  # e4m3's smallest normal is 2^-6
    rel = ((deq - w).abs() / w.abs())[normal]
    assert rel.max() <= 2**-4 + 1e-6
    x = torch.randn(3, 64)
    assert torch.allclose(q(x), torch.nn.functional.linear(x, deq, lin.bias))


@pytest.fixture(scope="module")
def models():
    cfg = dataclasses.replace(TINY, attention_head_dim=64, num_attention_heads=2, rope_axes_dim=(16, 24, 24))
    ref = randomize_(FramePackTransformer(cfg), seed=1).eval().to(torch.bfloat16)
    q = FramePackTransformer(cfg).eval().to(torch.bfloat16)
    q.load_state_dict(ref.state_dict())
    saved = quantize_fp8_(q)
    return cfg, ref, q, saved


def test_blocks_take_half_the_bytes(models):
    _, ref, q, saved = models
    blocks = lambda m: sum(module_bytes(b) for b in [*m.transformer_blocks, *m.single_transformer_blocks])  # noqa: E731
    before, after = blocks(ref), blocks(q)
    assert before - after == saved
    assert 0.5 < after / before < 0.56  # weights 1 byte instead of 2; biases, norms and scales stay


def test_fp8_output_error_against_bf16(models):
    cfg, ref, q, _ = models
    kw = make_inputs(cfg, "f1", seed=3, dtype=torch.bfloat16)
    with torch.no_grad():
        a, b = ref(**kw).sample, q(**kw).sample
    rel = ((a - b).norm() / a.norm()).item()
    print(f"fp8 vs bf16 relative L2 error of the velocity: {rel:.4f}")
    assert 0 < rel < 0.1


def test_quantized_model_streams_identically(models):
    cfg, _, q, _ = models
    kw = make_inputs(cfg, "original_p0", seed=4, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = q(**kw).sample
    blocks = [*q.transformer_blocks, *q.single_transformer_blocks]
    plan = Plan(1, {"t": Placement(Mode.STREAM, 1, 1, 2)})
    manager = MemoryManager("cpu", plan, {"t": q}, {"t": blocks})
    with manager.use("t"), torch.no_grad():
        got = q(**kw).sample
    assert torch.equal(expected, got)
    # every Linear of every block was replaced (none left in bf16), and nothing outside the blocks was
    plain = [m for b in blocks for m in b.modules() if type(m) is torch.nn.Linear]
    fp8 = [m for b in blocks for m in b.modules() if isinstance(m, FP8Linear)]
    # per double block: 2 modulations, q/k/v and their context twins, 2 outputs, 2 x 2 MLP; per single: 6
    assert plain == [] and len(fp8) == 14 * len(q.transformer_blocks) + 6 * len(q.single_transformer_blocks)
    assert not any(isinstance(m, FP8Linear) for m in q.context_embedder.modules())
    assert all(m.weight_fp8.dtype == torch.float8_e4m3fn for m in fp8)


# ------------------------------------------------------------------------------------- fp8 compute
def _e4m3(v: torch.Tensor) -> torch.Tensor:
    """float64 values rounded to e4m3fn by hand: 3 mantissa bits, round half to even, exponents down to
    -6 and subnormals (spacing 2^-9) below, largest finite 448 (the scaled values never pass it)."""
    a = v.abs()
    _, e = torch.frexp(a)  # a = m * 2^e with m in [0.5, 1): floor(log2 a) = e - 1
    step = torch.pow(2.0, ((e - 1).clamp_min(-6) - 3).double())
    return torch.sign(v) * (torch.round(a / step) * step).clamp_max(448.0)


def _fp8_compute_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Quantise the rows of x and of w to e4m3 (absmax / 448 scale, divided in fp32), dequantise, matmul: float64."""

    def rows(m: torch.Tensor) -> torch.Tensor:
        m = m.float()
        s = (m.abs().amax(1, keepdim=True) / 448.0).clamp_min(torch.finfo(torch.float32).tiny)
        return _e4m3((m / s).double()) * s.double()

    return rows(x) @ rows(w).t() + b.double()


def _linear(k: int, n: int, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    lin.weight.data = torch.randn(n, k) * torch.logspace(-2, 1, n)[:, None]  # rows of varied scale
    return lin


def test_emulated_compute_equals_a_float64_reference():
    from framepack.models.quant import quantize_rows

    lin = _linear(96, 40)
    x = torch.randn(2, 7, 96) * torch.logspace(-3, 2, 7)[None, :, None]  # batched tokens of varied scale
    q = FP8Linear(lin, torch.float32, "compute")
    got = q(x)
    assert got.shape == (2, 7, 40) and got.dtype == torch.float32 and q.kernel == "emulated"
    flat = x.reshape(-1, 96)
    x8, xs = quantize_rows(flat)  # the rounding itself equals the hand-written one, bit for bit
    assert torch.equal(x8.double(), _e4m3((flat / xs).double()))
    want = _fp8_compute_reference(flat, lin.weight.detach(), lin.bias.detach()).reshape(2, 7, 40)
    # fp32 dequantise + matmul against float64: only summation rounding is left
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    err = ((got.double() - want).norm() / want.norm()).item()
    print(f"emulated fp8 compute vs float64 reference: relative L2 {err:.1e}")
    assert err < 1e-6


def test_storage_mode_is_unchanged():
    """The default mode is storage, its output is the dequantise-then-matmul of before, bit for bit."""
    lin = _linear(64, 32).to(torch.bfloat16)
    x = torch.randn(3, 5, 64).to(torch.bfloat16)
    q = FP8Linear(lin, torch.bfloat16)
    assert q.mode == "storage" and q.kernel == "dequantised"
    deq = q.weight_fp8.to(torch.bfloat16) * q.weight_scale.to(torch.bfloat16)
    assert torch.equal(q(x), torch.nn.functional.linear(x, deq, lin.bias))
    assert torch.equal(FP8Linear(lin, torch.bfloat16, "storage")(x), q(x))
    with pytest.raises(ValueError, match="fp8 mode"):
        FP8Linear(lin, torch.bfloat16, "fast")


def test_compute_error_is_larger_than_storage_but_bounded():
    """One Linear, fp32, against the unquantised Linear: storage rounds the weight (rms ~2.6%), compute
    also the activations (~3.6%, about sqrt(2) times: two independent roundings of the same size)."""
    lin = _linear(256, 128)
    lin.weight.data = torch.randn(128, 256) / 16
    x = torch.randn(4, 50, 256)
    with torch.no_grad():
        ref = lin(x)
        errs = {m: ((FP8Linear(lin, torch.float32, m)(x) - ref).norm() / ref.norm()).item() for m in MODES}
    print(f"relative L2 vs fp32 Linear: storage {errs['storage']:.4f}, compute {errs['compute']:.4f}")
    assert 0.015 < errs["storage"] < 0.035
    assert errs["storage"] * 1.2 < errs["compute"] < 0.05


@pytest.fixture(scope="module")
def compute_model(models):
    cfg, ref, _, _ = models
    c = FramePackTransformer(cfg).eval().to(torch.bfloat16)
    c.load_state_dict(ref.state_dict())
    quantize_fp8_(c, mode="compute", device="cpu")
    return c


def test_fp8_compute_model_error_against_bf16(models, compute_model):
    """The whole tiny transformer in bf16: fp8 compute's velocity is further from bf16 than storage's."""
    from framepack.models.quant import fp8_report

    cfg, ref, q, _ = models
    kw = make_inputs(cfg, "f1", seed=3, dtype=torch.bfloat16)
    ran = set()  # every FP8Linear must run its own (fp8) matmul: none may be read as a plain weight
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: ran.add(name))
             for name, m in compute_model.named_modules() if isinstance(m, FP8Linear)]  # fmt: skip
    with torch.no_grad():
        a, b, c = ref(**kw).sample.float(), q(**kw).sample.float(), compute_model(**kw).sample.float()
    for h in hooks:
        h.remove()
    assert ran == {n for n, m in compute_model.named_modules() if isinstance(m, FP8Linear)}
    storage, compute = ((a - b).norm() / a.norm()).item(), ((a - c).norm() / a.norm()).item()
    print(f"velocity relative L2 vs bf16: fp8 storage {storage:.4f}, fp8 compute {compute:.4f}")
    assert 0 < storage < compute < 0.15
    report = fp8_report(compute_model)
    assert report["kernels"] == {"emulated": report["modules"]} and report["fallbacks"] == {}


def test_backend_on_cpu_is_emulated():
    from framepack.models.quant import fp8_backend_reason, fp8_compute_backend

    assert fp8_compute_backend("cpu") == fp8_compute_backend(torch.device("cpu")) == "emulated"
    assert "CUDA" in fp8_backend_reason("cpu")
    q = FP8Linear(_linear(32, 16), torch.float32, "compute")
    assert q.kernel is None  # picked at the first forward, for the input's device
    q(torch.randn(2, 32))
    assert q.kernel == "emulated" and q.fallback_reason is None
    assert "kernel=emulated" in repr(q)


def test_set_weight_in_compute_mode():
    """A LoRA merge (set_weight_) requantises in place; compute mode then computes with the new weight."""
    a, b = _linear(64, 32, seed=1), _linear(64, 32, seed=2)
    b.bias = a.bias
    q = FP8Linear(a, torch.float32, "compute")
    x = torch.randn(5, 64)
    q.set_weight_(b.weight)
    assert torch.equal(q(x), FP8Linear(b, torch.float32, "compute")(x))


def _cpu_scaled_mm_works() -> bool:
    try:
        one = torch.ones(())
        torch._scaled_mm(torch.zeros(16, 16).to(torch.float8_e4m3fn), torch.zeros(16, 16).to(torch.float8_e4m3fn).t(),
                         scale_a=one, scale_b=one, out_dtype=torch.float32)  # fmt: skip
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _cpu_scaled_mm_works(), reason="this torch has no CPU _scaled_mm")
@pytest.mark.parametrize("kernel,dtype,tol", [("scaled_mm rowwise", torch.bfloat16, 1e-2),
                                              ("scaled_mm tensorwise", torch.float32, 1e-6)])  # fmt: skip
def test_kernel_path_on_a_pretend_device(monkeypatch, kernel, dtype, tol):
    """The kernel path's _scaled_mm call (operand layout, scale shapes, bias, reshapes) runs on this
    torch's CPU _scaled_mm when the CPU is declared to have the kernel: it matches the emulation. A
    shape the kernel does not take runs emulated (reason recorded); a kernel that raises is called once,
    then the module is emulated."""
    import framepack.models.quant as quant

    monkeypatch.setitem(quant._BACKENDS, "cpu", (kernel, "pretend"))
    x = torch.randn(3, 11, 64).to(dtype)
    q = FP8Linear(_linear(64, 48).to(dtype), dtype, "compute")
    want = quant.fp8_matmul_emulated(x.reshape(-1, 64), q.weight_fp8, q.weight_scale, q.bias, dtype).reshape(3, 11, 48)
    got = q(x)
    assert q.kernel == kernel and q.fallback_reason is None and got.shape == (3, 11, 48) and got.dtype == dtype
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < tol, err

    odd = FP8Linear(_linear(40, 48).to(dtype), dtype, "compute")
    x40 = torch.randn(5, 40).to(dtype)
    assert torch.equal(odd(x40), quant.fp8_matmul_emulated(x40, odd.weight_fp8, odd.weight_scale, odd.bias, dtype))
    assert odd.kernel == "emulated" and "multiples of 16" in odd.fallback_reason

    moved = FP8Linear(_linear(64, 48).to(dtype), dtype, "compute")
    moved(x)  # kernel picked; then the weight moves to a misaligned view (a flat copy with an odd offset)
    buf = torch.empty(48 * 64 + 1, dtype=torch.float8_e4m3fn)
    buf[1:].view(48, 64).copy_(moved.weight_fp8)
    moved.weight_fp8 = buf[1:].view(48, 64)
    emulated = quant.fp8_matmul_emulated(x.reshape(-1, 64), moved.weight_fp8, moved.weight_scale, moved.bias, dtype)
    assert torch.equal(moved(x), emulated.reshape(3, 11, 48)) and "aligned" in moved.fallback_reason

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED (pretend)")

    monkeypatch.setattr(torch, "_scaled_mm", broken)
    q2 = FP8Linear(_linear(64, 48).to(dtype), dtype, "compute")
    emulated = quant.fp8_matmul_emulated(x.reshape(-1, 64), q2.weight_fp8, q2.weight_scale, q2.bias, dtype)
    for _ in range(2):
        assert torch.equal(q2(x), emulated.reshape(3, 11, 48))
    assert len(calls) == 1 and q2.kernel == "emulated" and "CUBLAS_STATUS_NOT_SUPPORTED" in q2.fallback_reason
    assert quant.fp8_report(torch.nn.ModuleList([q, odd, q2]))["kernels"] == {kernel: 1, "emulated": 2}


def test_tiny_generation_with_fp8_compute(tmp_path, monkeypatch):
    """A whole job on the tiny model with RuntimeOptions(fp8="compute"): every block Linear computes in
    (emulated) fp8 and the video is written."""
    import numpy as np
    from PIL import Image

    from framepack.config import GenerationRequest, RuntimeOptions
    from framepack.models.quant import fp8_report
    from framepack.pipeline import load_pipeline

    monkeypatch.setenv("FRAMEPACK_HOME", str(tmp_path / "home"))
    image = np.zeros((64, 96, 3), np.uint8)
    image[20:40, 30:60] = (40, 200, 90)
    Image.fromarray(image).save(tmp_path / "start.png")
    pipe = load_pipeline("tiny", device="cpu", options=RuntimeOptions(fp8="compute"))
    report = fp8_report(pipe.c.transformer)
    assert report["modules"] > 0 and report["kernels"] == {"emulated": report["modules"]}
    request = GenerationRequest(image=str(tmp_path / "start.png"), prompt="a green square moves right", steps=2,
                                seconds=1.2, teacache=False, output=str(tmp_path / "out.mp4"))  # fmt: skip
    result = pipe.generate(request)
    assert result.status == "finished" and result.video.exists() and result.frames > 0
    assert all(m.mode == "compute" for m in pipe.c.transformer.modules() if isinstance(m, FP8Linear))


# ------------------------------------------------------------------------------------- CUDA only
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scaled_mm_matches_emulation_on_cuda():
    import framepack.models.quant as quant

    backend, why = quant.fp8_compute_backend("cuda"), quant.fp8_backend_reason("cuda")
    cap = torch.cuda.get_device_capability()
    print(f"fp8 compute backend on {torch.cuda.get_device_name()} ({cap}): {backend} ({why})")
    if cap < (8, 9):
        assert backend == "emulated"
        return
    assert backend != "emulated", why
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        lin = _linear(512, 768).to("cuda", dtype)
        x = torch.randn(2, 100, 512, device="cuda").to(dtype)  # 200 tokens: M need not be a multiple of 16
        q = FP8Linear(lin, dtype, "compute")
        with torch.no_grad():
            got = q(x)
            want = quant.fp8_matmul_emulated(x.reshape(-1, 512), q.weight_fp8, q.weight_scale, q.bias, dtype)
        expected_kernel = backend if dtype == torch.bfloat16 else "scaled_mm tensorwise"
        assert q.kernel == expected_kernel and q.fallback_reason is None, q.fallback_reason
        err = ((got.reshape(-1, 768).float() - want.float()).norm() / want.float().norm()).item()
        print(f"{q.kernel} ({dtype}) vs emulation on CUDA: relative L2 {err:.1e}")
        assert err < tol
    odd = FP8Linear(_linear(40, 48).to("cuda", torch.bfloat16), torch.bfloat16, "compute")
    odd(torch.randn(3, 40, device="cuda", dtype=torch.bfloat16))
    assert odd.kernel == "emulated" and "multiples of 16" in odd.fallback_reason
