"""benchmarks/gpu_suite.py on the CPU: the whole suite end to end at a tiny size (--cpu-smoke), the one-line
no-GPU exit, the time budget, and the CPU-side arithmetic the GPU figures rest on (token and FLOP counts,
random weights)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_suite.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_suite  # noqa: E402

from framepack.config import FRAMEPACK_HY, TINY  # noqa: E402
from framepack.models.transformer import FramePackTransformer  # noqa: E402

NOT_OK = {"unsupported", "skipped", "error", "timeout"}


def _env() -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("OUT", None)
    return env


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=REPO)  # fmt: skip


def _rows(results: dict, section: str) -> dict[str, dict]:
    return {r["name"]: r for r in results["sections"][section]["rows"]}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    proc = _run("--cpu-smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "gpu_suite.json").read_text()), proc.stdout


@pytest.mark.slow
def test_cpu_smoke_runs_every_section_with_numbers_or_reasons(smoke):
    results, stdout = smoke
    assert results["mode"] == "cpu-smoke"
    assert list(results["sections"]) == list(gpu_suite.NAMES)
    for name, entry in results["sections"].items():
        assert entry["status"] == "ok", (name, entry.get("reason"))  # every code path ran on the CPU
        assert entry["rows"], name
        for r in entry["rows"]:
            if r["status"] == "ok":
                assert _number(r.get("value")), (name, r)
            else:
                assert r["status"] in NOT_OK and r.get("reason"), (name, r)
    assert "==== gpu_suite cpu-smoke" in stdout and stdout.count("variant") >= 2  # incremental and final table

    peak = results["sections"]["peak"]["rows"]
    assert peak[0]["metric"] == "TFLOP/s" and peak[0]["value"] > 0
    assert _rows(results, "peak")["fp8 e4m3 _scaled_mm"]["status"] == "unsupported"

    compare = _rows(results, "ours_vs_diffusers")
    assert compare["ours"]["status"] == compare["diffusers"]["status"] == "ok"
    assert len(compare["ours"]["runs"]) == len(compare["diffusers"]["runs"]) == 3
    assert compare["ours"]["mfu"] > 0 and compare["ours"]["tflops"] > 0
    same = compare["ours vs diffusers: velocity"]
    assert same["max_diff"] < 1e-4 * max(1.0, same["ref_max"]) and same["rel_err"] < 1e-5  # fp32, same weights

    attention = _rows(results, "attention")
    assert attention["sdpa (auto, ours)"]["status"] == "ok" and attention["sdpa (auto, ours)"]["rel_err"] < 1e-5
    assert attention["sage backend"]["status"] == attention["model with sage"]["status"] == "unsupported"  # CUDA only
    assert attention["sdpa efficient"]["status"] == "unsupported"  # a CUDA kernel

    fp8 = _rows(results, "fp8")
    assert fp8["fp8 storage"]["status"] == "ok" and 0 < fp8["fp8 storage"]["rel_err"] < 0.1
    assert fp8["fp8 storage"]["weight_gib"] < 0.7 * fp8["fp8 storage"]["bf16_weight_gib"]
    assert fp8["fp8 compute"]["status"] in {"ok", "unsupported", "error"}  # the mode exists, is emulated, or not

    memory = _rows(results, "memory")
    streamed = next(r for n, r in memory.items() if n.startswith("streamed"))
    assert memory["resident"]["status"] == streamed["status"] == memory["copy-on-access"]["status"] == "ok"
    assert _number(streamed["ratio"]) and streamed["declared_peak_gib"] <= streamed["budget_gib"]
    assert "k=1/" in streamed["name"]

    compiled = _rows(results, "compile")
    if importlib.util.find_spec("framepack.models.compile") is not None:
        row = compiled["compiled (eager)"]
        assert row["status"] == "ok" and row["rel_err"] < 1e-5 and row["recompiles_in_timed_steps"] == 0

    job = _rows(results, "job")["2-section job"]
    assert job["status"] == "ok" and job["status_job"] == "finished"
    assert job["frames"] == 4 * (2 * 3 + 1) - 3 and len(job["sections"]) == 2  # window 3 in the smoke
    assert job["value"] > 0 and job["floor_s_frame"] > 0 and job["rss_gib"] > 0
    assert "text_encoder" in job["memory_plan"]  # the engine's managed memory plan ran over all models


def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    proc = _run("--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0], proc.stdout
    assert not (tmp_path / "out" / "gpu_suite.json").exists()


def test_sections_past_the_budget_are_skipped_and_recorded(tmp_path):
    proc = _run("--cpu-smoke", "--budget", "10", "--only", "peak,ours_vs_diffusers,job", "--out", str(tmp_path),
                timeout=200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    sections = results["sections"]
    assert set(sections) == set(gpu_suite.NAMES)
    assert sections["peak"]["status"] == "ok"
    for name in ("ours_vs_diffusers", "job"):
        assert sections[name]["status"] == "skipped" and "time budget" in sections[name]["reason"], sections[name]
        assert sections[name]["rows"][0]["status"] == "skipped"
    for name in ("attention", "fp8", "memory", "compile"):
        assert sections[name]["status"] == "skipped" and "not selected" in sections[name]["reason"]


def test_unknown_sections_are_refused():
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--only", "peak,nope"])


def test_token_counts_match_the_packed_sequence_of_the_model():
    model = gpu_suite.random_transformer(TINY, "cpu", torch.float32, seed=0)
    for h, w in ((8, 8), (10, 6), (12, 14)):
        a = gpu_suite.parse_args(["--cpu-smoke"])
        suite = gpu_suite.Suite(a)
        suite.cfg, suite.h, suite.w = TINY, h, w
        kw, x0 = suite.inputs()
        model.clear_section_cache()
        with torch.no_grad():
            model(**kw, hidden_states=x0, timestep=torch.tensor([500.0]))
        section = model._sections.entries[-1][2]
        counts = gpu_suite.token_counts(h, w, suite.window, siglip=suite.siglip)
        assert section.n_img == counts["n_img"] and section.n_ctx == counts["n_img"] - counts["noisy"]
        assert section.text.shape[1] == counts["text"] == gpu_suite.TEXT_TOKENS
        assert section.image_tokens.shape[1] == counts["siglip"]


def test_flop_count_equals_torch_flop_counter():
    """forward_flops against torch's own count of every matmul of a forward (attention as explicit bmm)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = dataclasses.replace(TINY, num_layers=2, num_single_layers=3, num_refiner_layers=2)

    def attention(q, k, v, padding=None):  # (B, L, H, D), the same contract as the backends
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        scores = (qt @ kt.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        return (scores @ vt).transpose(1, 2)

    with torch.device("meta"):
        model = FramePackTransformer(cfg, attention)
    gpu_suite.materialize_(model, "cpu", torch.float32, seed=3)
    a = gpu_suite.parse_args(["--cpu-smoke"])
    suite = gpu_suite.Suite(a)
    suite.cfg, suite.h, suite.w = cfg, 8, 10
    kw, x0 = suite.inputs()
    with torch.no_grad():
        model(**kw, hidden_states=x0, timestep=torch.tensor([500.0]))  # the section's cached work, done once
        with FlopCounterMode(display=False) as counter:
            model(**kw, hidden_states=x0, timestep=torch.tensor([400.0]))
    counted = counter.get_total_flops()
    tokens = gpu_suite.token_counts(8, 10, suite.window, siglip=suite.siglip)
    ours = gpu_suite.forward_flops(cfg, tokens)["total"]
    # the timestep / guidance / pooled-text embedders (three small MLPs) are the only matmuls left out
    d = cfg.inner_dim
    embedders = 2 * (256 * d + d * d) * 2 + 2 * (cfg.pooled_projection_dim * d + d * d) + 2 * (256 * d + d * d)
    assert abs(counted - ours - embedders) <= 1e-3 * counted, (counted, ours, embedders)


def test_real_size_flops_match_the_issue_figure():
    tokens = gpu_suite.token_counts(80, 76)
    assert tokens["n_img"] == 3040 + 380 + 400 + 13680 and tokens["total"] == 17500 + 729 + 61
    at_issue = dict(tokens, total=19385)
    f = gpu_suite.forward_flops(FRAMEPACK_HY, at_issue)
    assert 530e12 < f["total"] < 550e12 and 0.49 < f["attention_share"] < 0.53  # "~540 TFLOP, ~51% attention"
    ours = gpu_suite.forward_flops(FRAMEPACK_HY, tokens)["total"]
    assert 480e12 < ours < f["total"]


def test_random_weights_are_finite_and_scaled():
    model = gpu_suite.random_transformer(TINY, "cpu", torch.bfloat16, seed=5)
    params = dict(model.named_parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 and torch.isfinite(p).all()
               for p in params.values())  # fmt: skip
    norm = params["transformer_blocks.0.attn.norm_q.weight"].float()
    assert (norm - 1).abs().max() < 0.1
    w = params["transformer_blocks.0.attn.to_q.weight"].float()
    assert abs(w.std().item() * math.sqrt(w.shape[1]) - 1) < 0.2  # fan-in scaled
    again = gpu_suite.random_transformer(TINY, "cpu", torch.bfloat16, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))  # seeded
