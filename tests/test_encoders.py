"""Prompt and image encoding on the tiny family, checked with forward hooks (not the code's own path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from framepack.encoders import MAX_PROMPT_TOKENS, PromptCache, PromptEmbedding, pad_text, prompt_template
from framepack.pipeline import load_pipeline


@pytest.fixture(scope="module")
def comps(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FRAMEPACK_HOME", str(tmp_path_factory.getbasetemp() / "framepack-home-enc"))
    try:
        yield load_pipeline("tiny", device="cpu", prompt_cache_dir=tmp_path_factory.mktemp("pc")).c
    finally:
        mp.undo()


def test_template_is_diffusers_hunyuan_template():
    t = prompt_template()
    assert t["crop_start"] == 95 and t["template"].count("{}") == 1
    assert t["template"].startswith("<|start_header_id|>system<|end_header_id|>")
    assert "Describe the video by detailing the following aspects" in t["template"]


def test_llama_states_are_layer_n_minus_3_cropped_to_the_prompt(comps):
    enc = comps.text_encoder()
    llama, tok = enc.llama, enc.llama_tokenizer
    prompt = "a red ball bounces"
    # Independent: the crop is the number of template tokens before the prompt (with BOS).
    prefix_ids = tok(prompt_template()["template"].split("{}")[0])["input_ids"]
    assert enc.crop == len(prefix_ids)
    # hidden_states[-3] of an n-layer LLaMA is the output of layer n-3 (0-based): capture it with a hook.
    captured = {}
    layer = llama.layers[len(llama.layers) - 3]
    handle = layer.register_forward_hook(lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    try:
        emb = enc.encode(prompt)
    finally:
        handle.remove()
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"]) + 1  # the prompt and the closing eot
    assert emb.llama.shape == (1, n_prompt, llama.config.hidden_size)
    assert torch.allclose(emb.llama, captured["h"][:, enc.crop : enc.crop + n_prompt].float())


def test_long_prompts_are_cut_to_256_tokens(comps):
    emb = comps.text_encoder().encode(" ".join(["ball"] * 400))
    assert emb.llama.shape[1] == MAX_PROMPT_TOKENS


def test_clip_pooled_is_the_eos_state_after_final_norm(comps):
    enc = comps.text_encoder()
    captured = {}
    clip = getattr(enc.clip, "text_model", enc.clip)  # transformers 4 nests the text model, 5 does not
    handle = clip.final_layer_norm.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    try:
        emb = enc.encode("a cat runs")
    finally:
        handle.remove()
    ids = enc.clip_tokenizer("a cat runs")["input_ids"]
    assert ids[-1] == enc.clip_tokenizer.eos_token_id
    assert torch.allclose(emb.clip_pooled, captured["h"][:, len(ids) - 1].float())


def test_pad_text_and_negative_zeros():
    x = torch.randn(1, 5, 8)
    padded, mask = pad_text(x)
    assert padded.shape == (1, 512, 8) and mask.sum() == 5 and torch.equal(padded[:, :5], x)
    assert padded[:, 5:].abs().sum() == 0 and mask[0, :5].all() and not mask[0, 5:].any()
    neg = PromptEmbedding(x, torch.ones(1, 3)).zeros_like()
    assert neg.llama.shape == x.shape and neg.llama.abs().sum() == 0 and neg.clip_pooled.abs().sum() == 0
    with pytest.raises(ValueError, match="at most 512 fit"):
        pad_text(torch.zeros(1, 600, 2))


def test_siglip_states_and_preprocessing(comps):
    """SigLIP gets the image resized (bicubic) to its size, scaled to [-1, 1]; states are last_hidden_state."""
    image = np.zeros((64, 96, 3), np.uint8)
    image[:, :48] = 255
    captured = {}
    model = comps.image_encoder.model

    def grab_output(module, args, output):
        captured["o"] = output.last_hidden_state

    def grab_pixels(module, args, kwargs):
        captured["px"] = kwargs["pixel_values"]

    handle = model.register_forward_hook(grab_output)
    pre = model.register_forward_pre_hook(grab_pixels, with_kwargs=True)
    try:
        states = comps.image_encoder.encode(image)
    finally:
        handle.remove()
        pre.remove()
    size = model.config.image_size
    assert captured["px"].shape == (1, 3, size, size)
    assert captured["px"].min() >= -1.0 and captured["px"].max() <= 1.0
    assert captured["px"][0, :, :, 0].mean() == pytest.approx(1.0) and captured["px"][
        0, :, :, -1
    ].mean() == pytest.approx(-1.0)
    n_tokens = (size // model.config.patch_size) ** 2
    assert states.shape == (1, n_tokens, model.config.hidden_size)
    assert torch.equal(states, captured["o"].float())


def test_prompt_cache_round_trip_on_disk(tmp_path):
    cache = PromptCache(tmp_path)
    emb = PromptEmbedding(torch.randn(1, 4, 8), torch.randn(1, 3))
    cache.put("enc-a", "hello", emb)
    fresh = PromptCache(tmp_path)  # as a new process would see it
    got = fresh.get("enc-a", "hello")
    assert torch.equal(got.llama, emb.llama) and torch.equal(got.clip_pooled, emb.clip_pooled)
    assert fresh.get("enc-b", "hello") is None and fresh.get("enc-a", "hello!") is None
    (next(tmp_path.glob("*.safetensors"))).write_bytes(b"damaged")
    assert PromptCache(tmp_path).get("enc-a", "hello") is None  # a damaged entry is a miss, not a crash
