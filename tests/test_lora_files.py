"""LoRA files at inference (framepack.lora, framepack.models.lora) on the tiny model.

One known delta per block Linear is written in every accepted spelling (tests/lorafiles.py): each
loaded file must give exactly that delta, and generating with it must give the same MP4 as a model
merged by hand. Then: alpha, weights, several LoRAs, switching sets in one process (a queue) against
fresh processes, fp8, block streaming, sidecar re-runs by hash, and every bad input's message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_file
from lorafiles import KnownLora, dyadic, merge_reference, write
from PIL import Image

from framepack.config import GenerationRequest, LoraRef, RuntimeOptions
from framepack.lora import LoraLibrary, parse_lora_arg
from framepack.models.lora import LoraError, TargetTable, parse_lora
from framepack.pipeline import load_pipeline

FAST = dict(prompt="a green square moves right", steps=2, seconds=1.2, teacache=False)


@pytest.fixture(scope="module")
def loras(home):
    folder = home / "loras"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def pipe(home, loras):
    return load_pipeline("tiny", device="cpu", options=RuntimeOptions(lora_dir=str(loras)))


@pytest.fixture(scope="module")
def known(pipe):
    return KnownLora(pipe.c.transformer, rank=4, alpha=2.0, seed=1)


@pytest.fixture(scope="module")
def image(home):
    x = np.zeros((64, 96, 3), np.uint8)
    x[..., 0] = np.linspace(0, 255, 96, dtype=np.uint8)[None]
    x[20:40, 30:60] = (40, 200, 90)
    path = home / "start.png"
    Image.fromarray(x).save(path)
    return str(path)


def _gen(pipe, image, out: Path, loras=(), **kw):
    request = GenerationRequest(image=image, output=str(out), loras=tuple(loras), **{**FAST, **kw})
    return pipe.generate(request)


@pytest.fixture(scope="module")
def reference_video(pipe, known, image, tmp_path_factory):
    """The video of the tiny model merged by hand with the known deltas (no LoRA machinery involved)."""
    return _reference(pipe, image, tmp_path_factory.mktemp("ref") / "ref.mp4", known.reference())


def _reference(pipe, image, out, deltas, weight=1.0, bias=None):
    pipe.c.apply_loras([])  # the original weights
    model = pipe.c.transformer
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    merge_reference(model, deltas, weight, bias)
    model.clear_section_cache()
    try:
        return _gen(pipe, image, out).video
    finally:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(saved[k])
        model.clear_section_cache()


# ------------------------------------------------------------------------------------- formats
SPELLINGS = ["kohya", "peft-transformer", "peft-diffusion_model", "peft-bare", "hunyuan-kohya", "hunyuan-peft",
             "comfyui", "loha", "lokr", "trainer"]  # fmt: skip
FORMAT_NAMES = {"kohya": "kohya/musubi-tuner", "peft-transformer": "diffusers/PEFT", "peft-diffusion_model":
                "diffusers/PEFT", "peft-bare": "diffusers/PEFT", "hunyuan-kohya": "HunyuanVideo (kohya spelling)",
                "hunyuan-peft": "HunyuanVideo (PEFT spelling)", "comfyui": "ComfyUI native", "loha": "LyCORIS LoHa",
                "lokr": "LyCORIS LoKr", "trainer": "FramePack trainer"}  # fmt: skip


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_gives_the_known_delta_and_the_reference_video(pipe, known, loras, image, reference_video,
                                                                      tmp_path, spelling):  # fmt: skip
    meta = {"framepack_lora": "{}"} if spelling == "trainer" else None
    path = write(loras / f"{spelling}.safetensors", known.spellings()[spelling], meta)
    table = pipe.c.lora_targets
    [loaded] = pipe.c.lora_library().load((LoraRef(str(path)),), table)
    parsed = loaded.parsed
    assert parsed.formats == (FORMAT_NAMES[spelling],)
    reference = known.reference()
    assert set(parsed.modules) == set(reference)  # every block Linear, fused modules split onto their targets
    assert len(reference) == 14 + 2 * 6  # tiny: 1 double block (14 Linears) + 2 single blocks (6 each)
    assert parsed.unmatched == {}
    for target, parts in parsed.modules.items():
        got = sum(p.delta(torch.device("cpu")) for p in parts)
        assert torch.equal(got.double(), reference[target]), target  # dyadic factors: exact in fp32
    result = _gen(pipe, image, tmp_path / "lora.mp4", [LoraRef(str(path))])
    assert_same_file(result.video, reference_video)
    side = json.loads(result.metadata.read_text())
    [entry] = side["loras"]
    assert entry["format"] == FORMAT_NAMES[spelling] and entry["matched_modules"] == len(reference)
    assert entry["sha256"] == loaded.sha256 and entry["weight"] == 1.0 and entry["file"] == path.name
    assert side["request"]["loras"] == [{"path": str(path), "weight": 1.0, "sha256": loaded.sha256}]


def test_random_factors_match_float64_formulas(pipe):
    """Non-dyadic factors: each format's delta against its formula in float64 (fp32 rounding only)."""
    table, g = pipe.c.lora_targets, torch.Generator().manual_seed(5)
    t = "transformer_blocks.0.attn.to_q"  # (32, 32)
    f = t.replace(".", "_")
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in [(32, 6), (6, 32), (32, 6), (6, 32)])
    k1, k2a, k2b, k2 = (torch.randn(s, generator=g) for s in [(2, 4), (16, 3), (3, 8), (16, 8)])
    up, down = torch.randn(96, 5, generator=g), torch.randn(5, 32, generator=g)
    cases = {
        "loha": ({f"lycoris_{f}.hada_w1_a": w1a, f"lycoris_{f}.hada_w1_b": w1b, f"lycoris_{f}.hada_w2_a": w2a,
                  f"lycoris_{f}.hada_w2_b": w2b, f"lycoris_{f}.alpha": torch.tensor(3.0)},
                 {t: (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * 3.0 / 6}),
        "lokr-lowrank": ({f"lycoris_{f}.lokr_w1": k1, f"lycoris_{f}.lokr_w2_a": k2a, f"lycoris_{f}.lokr_w2_b": k2b,
                          f"lycoris_{f}.alpha": torch.tensor(1.5)},
                         {t: torch.kron(k1.double(), k2a.double() @ k2b.double()) * 1.5 / 3}),
        "lokr-full": ({f"lycoris_{f}.lokr_w1": k1, f"lycoris_{f}.lokr_w2": k2, f"lycoris_{f}.alpha": torch.tensor(7.0)},
                      {t: torch.kron(k1.double(), k2.double())}),  # full w2: scale 1 whatever alpha says
        "hunyuan-qkv": ({"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
                         "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
                         "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.5)},
                        {f"transformer_blocks.0.attn.to_{x}": up[32 * i : 32 * i + 32].double() @ down.double()
                         * 2.5 / 5 for i, x in enumerate("qkv")}),
    }  # fmt: skip
    for name, (tensors, expected) in cases.items():
        parsed = parse_lora(tensors, {}, table, name=name)
        assert set(parsed.modules) == set(expected), name
        for target, ref in expected.items():
            got = sum(p.delta(torch.device("cpu")) for p in parsed.modules[target]).double()
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), (name, target)


def test_comfy_diff_b_changes_biases(pipe, known, loras, image, tmp_path):
    path = write(loras / "comfy-bias.safetensors", known.comfy(with_bias=True))
    ref = _reference(pipe, image, tmp_path / "ref.mp4", known.reference(), bias=known.bias)
    result = _gen(pipe, image, tmp_path / "lora.mp4", [LoraRef(str(path))])
    assert_same_file(result.video, ref)
    plain = _gen(
        pipe, image, tmp_path / "nobias.mp4", [LoraRef(str(write(loras / "comfy.safetensors", known.comfy())))]
    )
    with pytest.raises(AssertionError):
        assert_same_file(plain.video, ref)  # the bias deltas are not a no-op


def test_peft_metadata_alpha_is_honoured(pipe, known):
    tensors = {k: v for k, v in known.peft("transformer.").items()}
    tensors = {k: (v / known.scale if "lora_B" in k else v) for k, v in tensors.items()}  # unscaled B
    meta = {"lora_adapter_metadata": json.dumps({"r": known.rank, "lora_alpha": known.alpha})}
    parsed = parse_lora(tensors, meta, pipe.c.lora_targets, name="peft-meta")
    ref = known.reference()
    assert parsed.alphas == (known.alpha,) and parsed.scales == (known.scale,)
    for target, parts in parsed.modules.items():
        assert torch.equal(parts[0].delta(torch.device("cpu")).double(), ref[target])


# ---------------------------------------------------------------------------- alpha, weights, sums
def _lowrank_file(path, model, rank, alpha, seed, up_scale=1.0, targets=None):
    gen = torch.Generator().manual_seed(seed)
    out, factors = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith(("transformer_blocks", "single_transformer_blocks")):
            if targets is not None and name not in targets:
                continue
            down, up = dyadic((rank, m.in_features), gen), dyadic((m.out_features, rank), gen) * up_scale
            k = "lora_unet_" + name.replace(".", "_")
            out |= {k + ".lora_down.weight": down.float(), k + ".lora_up.weight": up.float(),
                    k + ".alpha": torch.tensor(float(alpha))}  # fmt: skip
            factors[name] = (up, down)
    return write(path, out), factors


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_alpha_scales_the_delta(pipe, loras):
    model, c = pipe.c.transformer, pipe.c
    c.apply_loras([])
    before = _weights(model)
    one, _ = _lowrank_file(loras / "alpha1.safetensors", model, 8, 1, seed=3)
    eight, _ = _lowrank_file(loras / "alpha8.safetensors", model, 8, 8, seed=3)  # the same factors
    effect = {}
    for path in (one, eight):
        c.apply_loras(c.lora_library().load((LoraRef(str(path)),), c.lora_targets))
        after = _weights(model)
        effect[path.name] = {k: after[k].double() - before[k].double() for k in before}
    c.apply_loras([])
    name = "transformer_blocks.0.attn.to_q.weight"
    small, big = effect["alpha1.safetensors"][name], effect["alpha8.safetensors"][name]
    assert big.abs().max() > 0
    assert torch.allclose(small * 8, big, atol=1e-6)  # alpha 1 at rank 8: 1/8 of alpha 8's effect
    assert c.lora_library().load((LoraRef(str(one)),), c.lora_targets)[0].parsed.scales == (1 / 8,)


def test_weight_zero_is_no_lora_and_halves_sum(pipe, loras, image, tmp_path):
    model, c = pipe.c.transformer, pipe.c
    a, fa = _lowrank_file(loras / "a.safetensors", model, 4, 4, seed=10)
    b, fb = _lowrank_file(loras / "b.safetensors", model, 4, 4, seed=11)
    # C = 0.5 A + 0.5 B as one file: ranks concatenated, ups halved (exact with dyadic factors)
    tensors = {}
    for name in fa:
        (ua, da), (ub, db) = fa[name], fb[name]
        k = "lora_unet_" + name.replace(".", "_")
        tensors |= {k + ".lora_down.weight": torch.cat([da, db]).float(),
                    k + ".lora_up.weight": (torch.cat([ua, ub], 1) * 0.5).float(),
                    k + ".alpha": torch.tensor(8.0)}  # fmt: skip
    csum = write(loras / "c.safetensors", tensors)
    none = _gen(pipe, image, tmp_path / "none.mp4")
    zero = _gen(pipe, image, tmp_path / "zero.mp4", [LoraRef(str(a), 0.0)])
    assert_same_file(zero.video, none.video)  # weight 0 = no LoRA, bit for bit
    halves = _gen(pipe, image, tmp_path / "halves.mp4", [LoraRef(str(a), 0.5), LoraRef(str(b), 0.5)])
    weights_halves = _weights(model)
    summed = _gen(pipe, image, tmp_path / "sum.mp4", [LoraRef(str(csum))])
    assert all(torch.equal(weights_halves[k], v) for k, v in _weights(model).items())
    assert_same_file(halves.video, summed.video)
    negative = _gen(pipe, image, tmp_path / "neg.mp4", [LoraRef(str(a), -1.0)])
    assert negative.status == "finished"
    c.apply_loras([])


def test_parse_lora_arg():
    assert parse_lora_arg("style.safetensors") == LoraRef("style.safetensors", 1.0)
    assert parse_lora_arg("style.safetensors:0.8") == LoraRef("style.safetensors", 0.8)
    assert parse_lora_arg("style.safetensors:-1.5") == LoraRef("style.safetensors", -1.5)
    assert parse_lora_arg("C:/loras/x.safetensors") == LoraRef("C:/loras/x.safetensors", 1.0)
    assert parse_lora_arg("a:b.safetensors:2") == LoraRef("a:b.safetensors", 2.0)
    assert parse_lora_arg("x.safetensors:nan") == LoraRef("x.safetensors:nan", 1.0)


def test_include_exclude_filter_modules(pipe, known, loras):
    path = write(loras / "filter.safetensors", known.kohya())
    lib, table = pipe.c.lora_library(), pipe.c.lora_targets
    [only] = lib.load((LoraRef(str(path)),), table, include=r"^single_transformer_blocks\.")
    assert set(only.parsed.modules) == {t for t in known.reference() if t.startswith("single_")}
    assert only.parsed.filtered == 14
    [no_norm] = lib.load((LoraRef(str(path)),), table, exclude=r"norm")
    assert not any("norm" in t for t in no_norm.parsed.modules) and no_norm.parsed.filtered == 4
    with pytest.raises(LoraError, match="left out by --lora-include"):
        lib.load((LoraRef(str(path)),), table, include="no_such_module")


def test_unmatched_keys_are_reported(pipe, known, loras, image, tmp_path):
    tensors = known.kohya() | {
        "lora_unet_txt_in_individual_token_refiner_blocks_0_mlp_fc1.lora_down.weight": torch.zeros(4, 4),
        "lora_unet_txt_in_individual_token_refiner_blocks_0_mlp_fc1.lora_up.weight": torch.zeros(4, 4),
        "lora_unet_final_layer_linear.lora_up.weight": torch.zeros(4, 4),
    }
    path = write(loras / "extra.safetensors", tensors)
    result = _gen(pipe, image, tmp_path / "x.mp4", [LoraRef(str(path))])
    [entry] = json.loads(result.metadata.read_text())["loras"]
    assert entry["unmatched_keys"] == 3
    assert set(entry["unmatched"]) == {"lora_unet_txt_in_individual_token_refiner_blocks_N_mlp_fc1",
                                       "lora_unet_final_layer_linear"}  # fmt: skip


# ------------------------------------------------------------------------- switching, fp8, streaming
def test_switch_back_restores_the_original_weights_bitwise(pipe, known, loras):
    c = pipe.c
    c.apply_loras([])
    before = _weights(c.transformer)
    path = write(loras / "switch.safetensors", known.kohya())
    report = c.apply_loras(c.lora_library().load((LoraRef(str(path)),), c.lora_targets))
    assert report["modules_changed"] == 26
    assert not all(torch.equal(before[k], v) for k, v in _weights(c.transformer).items())
    report = c.apply_loras([])
    assert report["modules_changed"] == 26 and report["modules_merged"] == 0
    assert all(torch.equal(before[k], v) for k, v in _weights(c.transformer).items())
    assert c.apply_loras([]) is None  # nothing merged: nothing to do


def test_fp8_merges_before_quantising(home, known, loras):
    from framepack.models.quant import FP8Linear, quantize_fp8_
    from framepack.weights import load_transformer

    fp8 = load_pipeline("tiny", device="cpu", options=RuntimeOptions(fp8=True, lora_dir=str(loras)))
    c = fp8.c
    fresh = {k: v.clone() for k, v in c.transformer.state_dict().items()}
    path = write(loras / "fp8.safetensors", known.kohya())
    c.apply_loras(c.lora_library().load((LoraRef(str(path)),), c.lora_targets))
    reference = load_transformer(c.paths["transformer"], dtype=torch.float32)
    merge_reference(reference, known.reference())
    quantize_fp8_(reference, compute_dtype=torch.float32)  # the reference-merged weights, quantised
    got, want = c.transformer.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k].float(), want[k].float()) for k in want)
    assert any(isinstance(m, FP8Linear) for m in c.transformer.modules())
    c.apply_loras([])
    assert all(torch.equal(v.float(), fresh[k].float()) for k, v in c.transformer.state_dict().items())


def test_block_streaming_with_loras(home, known, loras, image, tmp_path, pipe, monkeypatch):
    """A managed pipeline whose plan streams every transformer block: the merged weights are what
    streams, so the video equals the unmanaged pipeline's with the same LoRA, and the next job (no
    LoRA) equals a plain run (the streamed blocks' flat host copies got their weights back)."""
    import framepack.components as comp
    from framepack.memory import Mode, Placement, Plan

    real_plan = comp.plan_memory
    modes = {
        "transformer": ("stream", 0),
        "text_encoder": ("swap", 0),
        "vae": ("swap", 0),
        "image_encoder": ("swap", 0),
    }

    def streamed_plan(footprints, **kw):
        plan = real_plan(footprints, **kw)
        return Plan(plan.budget_bytes, {f.name: Placement(Mode(modes[f.name][0]), 1, modes[f.name][1], 2)
                                        for f in footprints})  # fmt: skip

    monkeypatch.setattr(comp, "plan_memory", streamed_plan)
    path = write(loras / "stream.safetensors", known.kohya())
    streamed = load_pipeline("tiny", device="cpu", options=RuntimeOptions(
        memory="managed", device_free_bytes=64 * 2**30, lora_dir=str(loras)))  # fmt: skip
    a = streamed.generate(GenerationRequest(image=image, output=str(tmp_path / "s.mp4"), loras=(LoraRef(str(path)),),
                                            **FAST))  # fmt: skip
    assert "stream" in json.loads(a.metadata.read_text())["memory_plan"]
    b = _gen(pipe, image, tmp_path / "u.mp4", [LoraRef(str(path))])
    assert_same_file(a.video, b.video)
    second = streamed.generate(GenerationRequest(image=image, output=str(tmp_path / "s2.mp4"), **FAST))
    plain = _gen(pipe, image, tmp_path / "u2.mp4")
    assert_same_file(second.video, plain.video)


def _framepack(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "framepack.app.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)  # fmt: skip


def test_queue_switching_equals_fresh_processes(home, loras, image, tmp_path):
    """A queue running jobs with LoRA A, LoRA B and none in one process gives the same three videos as
    three fresh `framepack generate` processes."""
    from apphelpers import tiny_loader

    from framepack.jobs import JobQueue

    model = tiny_loader("tiny").c.transformer
    a, _ = _lowrank_file(loras / "qa.safetensors", model, 4, 1, seed=20, up_scale=8)
    b, _ = _lowrank_file(loras / "qb.safetensors", model, 8, 8, seed=21)
    sets = {"a": [f"{a}:0.75"], "b": [str(b)], "none": []}
    queue = JobQueue(tmp_path / "q", loader=tiny_loader, models=["tiny"])
    try:
        jobs = {}
        for name, specs in sets.items():
            refs = [dataclass_dict(parse_lora_arg(s)) for s in specs]
            jobs[name] = queue.submit(image, {**FAST, "loras": refs, "seed": 7}).id
        done = {name: queue.wait(job, timeout=240) for name, job in jobs.items()}
    finally:
        queue.close()
    env = {**os.environ, "FRAMEPACK_HOME": str(home), "PYTHONPATH": str(Path(__file__).parents[1])}
    fresh = {}
    for name, specs in sets.items():  # the three fresh processes at once (their start-up overlaps)
        flags = [x for s in specs for x in ("--lora", s)]
        cmd = [sys.executable, "-m", "framepack.app.cli", "generate", "--model", "tiny", "--image", image, "--prompt",
               FAST["prompt"], "--steps", "2", "--seconds", "1.2", "--no-teacache", "--seed", "7", "--out",
               str(tmp_path / f"fresh-{name}.mp4"), *flags, "--quiet"]  # fmt: skip
        fresh[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, specs in sets.items():
        job = done[name]
        assert job.state == "done", job.error
        _, err = fresh[name].communicate(timeout=300)
        assert fresh[name].returncode == 0, err
        if specs:
            assert "LoRA q" in err and "modules" in err  # the CLI says what each file matched
        assert_same_file(queue.outputs / "jobs" / job.video, tmp_path / f"fresh-{name}.mp4")


def dataclass_dict(ref: LoraRef) -> dict:
    return {"path": ref.path, "weight": ref.weight}


def test_rerun_from_sidecar_finds_the_file_by_hash(home, known, loras, image, tmp_path, pipe):
    elsewhere = write(tmp_path / "mine" / "style.safetensors", known.kohya())
    first = _gen(pipe, image, tmp_path / "first.mp4", [LoraRef(str(elsewhere), 0.5)])
    lib = tmp_path / "lib"
    lib.mkdir()
    elsewhere.rename(lib / "renamed.safetensors")  # the path in the sidecar no longer exists
    env = {**os.environ, "FRAMEPACK_HOME": str(home), "PYTHONPATH": str(Path(__file__).parents[1])}
    again = tmp_path / "again.mp4"
    r = _framepack("generate", "--from", str(first.metadata), "--lora-dir", str(lib), "--out", str(again), "--quiet",
                   env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "LoRA renamed.safetensors x0.5" in r.stderr
    assert_same_file(again, first.video)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _framepack("generate", "--from", str(first.metadata), "--lora-dir", str(empty),
                   "--out", str(tmp_path / "x.mp4"), env=env)  # fmt: skip
    assert r.returncode == 2 and "no file in the LoRA folder" in r.stderr and "recorded sha256" in r.stderr


# ---------------------------------------------------------------------------------- bad input
def _bad_cli(tmp_path, home, lora_path, *extra) -> str:
    """Run generate with a bad LoRA: one-line error, exit 2, no files in the output folder."""
    from framepack.app.cli import main

    out = tmp_path / "out"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["generate", "--model", "tiny", "--prompt", "x", "--steps", "1", "--seconds", "1", "--out", str(out),
                   "--lora", str(lora_path), "--quiet", *extra])  # fmt: skip
    text = err.getvalue()
    lines = [x for x in text.splitlines() if x.startswith("error:")]
    assert rc == 2, text
    assert len(lines) == 1 and "Traceback" not in text, text
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    return lines[0]


def test_bad_inputs_are_one_line_errors_before_sampling(home, known, tmp_path):
    cases = {}
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a safetensors file at all")
    cases["not safetensors"] = (text, "is not a usable safetensors file")
    pickle = tmp_path / "old.ckpt"
    torch.save({"a": torch.zeros(1)}, pickle)
    cases["pickle"] = (pickle, "only .safetensors files are loaded")
    sdxl = write(tmp_path / "sdxl.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)})  # fmt: skip
    cases["sdxl"] = (sdxl, "its keys look like a Stable Diffusion / SDXL LoRA (e.g. 'lora_")
    wan = write(
        tmp_path / "wan.safetensors",
        {
            "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 8),
            "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(8, 4),
        },
    )
    cases["wan"] = (wan, "look like a Wan LoRA (e.g. 'diffusion_model.blocks.0.self_attn.q')")
    flux = write(tmp_path / "flux.safetensors", known.hunyuan_kohya(), {"ss_base_model_version": "flux1"})
    cases["flux metadata"] = (flux, "its metadata says ss_base_model_version='flux1'")
    big = write(tmp_path / "big.safetensors", {
        "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight": torch.zeros(4, 3072),
        "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight": torch.zeros(3072, 4)})  # fmt: skip
    cases["shape"] = (big, "gives a delta of shape [3072, 3072] but transformer_blocks.0.attn.to_q expects [32, 32]")
    nan = known.kohya()
    nan["lora_unet_single_transformer_blocks_1_proj_out.lora_up.weight"][0, 0] = float("nan")
    cases["nan"] = (write(tmp_path / "nan.safetensors", nan), "lora_unet_single_transformer_blocks_1_proj_out."
                    "lora_up.weight holds 1 NaN/inf value(s)")  # fmt: skip
    inf = known.kohya()
    inf["lora_unet_transformer_blocks_0_ff_net_2.alpha"] = torch.tensor(float("inf"))
    cases["inf alpha"] = (write(tmp_path / "inf.safetensors", inf), "NaN/inf")
    nothing = write(tmp_path / "nothing.safetensors", {"model.layers.0.weight": torch.zeros(2, 2)})
    cases["no match"] = (nothing, "matches no module of this transformer")
    lokr = write(
        tmp_path / "lokr.safetensors",
        {
            "lycoris_transformer_blocks_0_attn_to_q.lokr_w1_a": torch.zeros(2, 1),
            "lycoris_transformer_blocks_0_attn_to_q.lokr_w1_b": torch.zeros(1, 2),
            "lycoris_transformer_blocks_0_attn_to_q.lokr_w2": torch.zeros(16, 16),
        },
    )
    cases["factorised lokr"] = (lokr, "LoKr with a factorised w1 (lokr_w1_a/lokr_w1_b): 2 key(s)")
    dora = known.kohya() | {"lora_unet_transformer_blocks_0_attn_to_q.dora_scale": torch.ones(1, 32)}
    cases["dora"] = (write(tmp_path / "dora.safetensors", dora), "DoRA (dora_scale)")
    cases["missing"] = (tmp_path / "absent.safetensors", "LoRA file not found")
    for what, (path, message) in cases.items():
        line = _bad_cli(tmp_path, home, path)
        assert message in line, (what, line)
    ok = write(tmp_path / "ok.safetensors", known.kohya())
    assert "not a valid regular expression" in _bad_cli(tmp_path, home, ok, "--lora-include", "(")
    assert "left out by --lora-include" in _bad_cli(tmp_path, home, ok, "--lora-include", "nothing_here")


def test_request_checks_loras():
    ok = GenerationRequest(prompt="x", loras=(LoraRef("a.safetensors", 0.5),)).validate()
    assert GenerationRequest.from_json_dict(ok.to_json_dict()) == ok
    for bad, message in [
        ({"loras": [{"path": "a", "weight": "x"}]}, "weight must be a number"),
        ({"loras": [{"path": "a", "weight": 99}]}, "weight must be a number in -20..20"),
        ({"loras": [{"path": ""}]}, "needs a file path"),
        ({"loras": [{"path": "a", "sha256": "xyz"}]}, "sha256 must be 64"),
        ({"lora_include": "blocks"}, "need at least one LoRA"),
    ]:
        with pytest.raises(ValueError, match=message):
            GenerationRequest.from_json_dict({"prompt": "x", **bad}).validate()
    with pytest.raises(ValueError, match="a LoRA is"):
        GenerationRequest.from_json_dict({"prompt": "x", "loras": [3]})


def test_inspect_prints_format_and_matches(known, tmp_path, capsys, home):
    from framepack.app.cli import main

    tensors = known.hunyuan_kohya() | {"lora_unet_txt_in_t_embedder_mlp_0.lora_up.weight": torch.zeros(2, 2)}
    path = write(tmp_path / "hy.safetensors", tensors)
    assert main(["lora", "inspect", str(path), "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "format:    HunyuanVideo (kohya spelling)" in out
    assert "rank:      4" in out and "alpha:     2" in out and "scale:     0.5" in out
    assert "matched:   26 target modules" in out
    assert "lora_unet_txt_in_t_embedder_mlp_N: 1 key(s)" in out
    assert main(["lora", "inspect", str(path)]) == 2  # for the full-size model: a shape error, one line
    assert "expects [3072, 3072] (a LoRA for a model of another size?)" in capsys.readouterr().err


def test_library_resolves_names_and_lists_files(tmp_path):
    lib = LoraLibrary(tmp_path)
    (tmp_path / "sub").mkdir()
    a = write(tmp_path / "sub" / "A.safetensors", {"x.alpha": torch.ones(())})
    assert lib.files() == [a]
    assert lib.resolve(LoraRef("sub/A.safetensors")) == a
    table = TargetTable({"m": (2, 2)}, 0, 0)
    with pytest.raises(LoraError, match="matches no module"):
        parse_lora({"x.alpha": torch.ones(())}, {}, table, name="A")
