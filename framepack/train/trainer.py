"""The section trainer: flow-matching training of the packed transformer on sections cut from clips.

Contract. For a clip's cached latents (1 + w*N frames at latent window w, the start frame first),
`section_sample(schedule, latents, N, i)` rebuilds exactly what inference feeds the transformer for
the i-th section in generation order: it starts the engine's schedule from the clip's start latent,
appends the ground-truth latents of the sections generated before it (in generation order: for the
inverted schedule those lie *after* it in time), and calls the schedule's own `context()`. No index
layout is re-stated here; the target is that section's ground-truth window.

Each training sample then draws (all from one seeded generator, so a resumed run repeats an
uninterrupted one):
  t ~ U(0, 1) (or logit-normal), sigma = shift(t) with inference's resolution-dependent shift at
      the window's token count (`sampling.flow_shift_mu`), so training sees the noise levels the
      sampler visits;
  x_t = (1 - sigma) x0 + sigma eps, target velocity eps - x0, timestep = 1000 sigma;
  a distilled-guidance scale uniform in a range (x1000 into the guidance embedder): only a
      condition here (there is no CFG teacher to distil), so any --gs works at inference;
  caption dropout to the empty prompt's embedding (the engine's negative prompt, for real CFG);
  for samples of a schedule that works without its start frame (`Schedule.start_optional`: F1),
      rarely, "no start frame" (start latent and image embedding zeroed): the recent-past-only mode
      the quality benchmark uses as its no-anti-drifting baseline.

One-frame samples (schedule "one-frame", as musubi-tuner trains its one-frame LoRAs): the target is
one ground-truth latent k (1..window) of a clip, packed by the engine's `OneFrameSchedule` with the
start latent at index 0, the target at index k and the edit preset's zero post / 2x / 4x parts (2x and
4x present or absent together, drawn per batch); the shift is inference's at one frame's tokens. A
one-frame sample has one noisy frame, so such a batch is all one-frame (drawn once per batch with
the schedule's share); the other batches mix the video schedules per sample.

One model learns both schedules (samples are mixed per batch, evenly unless `schedule_weights`
says otherwise): their layouts differ (the inverted window sits before its clean context in RoPE
time, the forward window after it), so the model can tell them apart, the two registry entries share
one set of weights (half the package), and the data is used twice.

Options: AdamW with gradient clipping, warmup + cosine (or constant) LR, EMA of the weights, bf16
autocast, gradient checkpointing (the model's flag), LoRA (`framepack.models.lora`: adapters on the
attention and MLP projections of the blocks, merged into plain Linears for export in the official key
layout), and checkpoints holding the model (or LoRA) state, optimizer, EMA and every RNG state. A
trained `init` model can be grown deeper first (`grow_depth`: copies of blocks with closed gates, same
output).
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from framepack.models.lora import apply_lora, lora_file_tensors, lora_state_dict, merge_lora
from framepack.models.transformer import FramePackTransformer
from framepack.sampling import flow_shift_mu
from framepack.sections import Context, FrameLayout, OneFrameSchedule, Schedule, make_schedule
from framepack.train.checkpoints import (
    CsvLog,
    checkpoint_path,
    latest,
    load_state,
    prune,
    rng_state,
    save_state,
    set_rng_state,
)
from framepack.train.data import LatentDataset
from framepack.train.lr import warmup_cosine

CONTEXT_KEYS = ("latent_indices", "clean_latents", "clean_latent_indices", "clean_latents_2x",
                "clean_latent_2x_indices", "clean_latents_4x", "clean_latent_4x_indices")  # fmt: skip


# ------------------------------------------------------------------------------------ samples
def section_sample(schedule: Schedule, latents: torch.Tensor, count: int, index: int,
                   start: torch.Tensor | None = None) -> tuple[Context, torch.Tensor]:  # fmt: skip
    """(inference context, ground-truth window) of the `index`-th generated section of a clip.

    latents: (1, C, 1 + w*count, h, w) in video order; start: (1, C, 1, h, w) the start image's latent
    as inference encodes it (default: latents[:, :, :1]).
    """
    w = schedule.window
    if latents.shape[2] != 1 + w * count:
        raise ValueError(
            f"a clip of {count} sections at window {w} has {1 + w * count} latents, got {latents.shape[2]}"
        )
    sections = schedule.sections(count)
    history = schedule.start(latents[:, :, :1] if start is None else start)
    for s in sections[:index]:  # what inference has generated before this section (generation order)
        a, b = s.latent_range
        history = schedule.append(history, s, latents[:, :, a:b])
    section = sections[index]
    a, b = section.latent_range
    return schedule.context(history, section), latents[:, :, a:b]


def one_frame_sample(latents: torch.Tensor, start: torch.Tensor | None, target: int, window: int,
                     with_2x_4x: bool) -> tuple[Context, torch.Tensor]:  # fmt: skip
    """(inference context, ground truth) of a one-frame edit of a clip: its latent `target` (video order,
    1..window) as the edited frame, the start latent as control 1 (`OneFrameSchedule`, edit preset)."""
    schedule = OneFrameSchedule(window, FrameLayout(target, (0,), x2=with_2x_4x, x4=with_2x_4x))
    history = schedule.start(latents[:, :, :1] if start is None else start)
    return schedule.context(history, schedule.sections(1)[0]), latents[:, :, target : target + 1]


def shifted_sigma(t: torch.Tensor, mu: float) -> torch.Tensor:
    """sigma = e^mu / (e^mu + 1/t - 1): the time shift `sampling.flow_sigmas` applies to its t grid."""
    return 1.0 / (1.0 + (1.0 / t - 1.0) * math.exp(-mu))


def sample_t(n: int, generator: torch.Generator, mode: str) -> torch.Tensor:
    if mode == "uniform":
        t = torch.rand(n, generator=generator, dtype=torch.float64)
    elif mode == "logit-normal":
        t = torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64))
    else:
        raise ValueError(f"sigma sampling must be 'uniform' or 'logit-normal', got {mode!r}")
    return t.clamp(1e-4, 1.0)


def _schedule_share(names: tuple[str, ...], weights: tuple[float, ...]) -> list[float] | None:
    """Cumulative share of each schedule from relative weights; None when all shares are equal."""
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"schedules must be distinct and at least one, got {list(names)}")
    if not weights:
        return None
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} schedule weights for {len(names)} schedules {list(names)}: "
                         "give one weight per schedule, in the same order")  # fmt: skip
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"schedule weights must be positive numbers, got {list(weights)}")
    if len(set(weights)) == 1:
        return None
    total, acc, out = sum(weights), 0.0, []
    for w in weights:
        acc += w / total
        out.append(acc)
    return out


# ------------------------------------------------------------------------------------ models
def init_from_scratch(model: FramePackTransformer, seed: int) -> FramePackTransformer:
    """DiT-style initialisation: Xavier-uniform Linears and patch embedders, zero biases, and zero
    adaLN modulations (every gate closed: each block starts as the identity) and output projection
    (the first prediction is 0), which trains faster and more stably than PyTorch's defaults."""
    g = torch.Generator().manual_seed(seed)

    def xavier(w: torch.Tensor) -> None:
        fan_out, fan_in = w.shape[0], w[0].numel()
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w.copy_((torch.rand(w.shape, generator=g) * 2 - 1) * bound)

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                xavier(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
            if name.rpartition(".")[2] in ("norm1", "norm1_context", "norm", "norm_out") and hasattr(m, "linear"):
                m.linear.weight.zero_()
                m.linear.bias.zero_()
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
    return model


def _insert_after(n: int, k: int) -> list[int]:
    """Which of `n` blocks each of `k` new blocks follows: spread evenly, in order."""
    return [(2 * i + 1) * n // (2 * k) for i in range(k)]


def grow_depth(model: FramePackTransformer, single: int = 0, double: int = 0) -> FramePackTransformer:
    """A deeper model that computes exactly what `model` computes (function-preserving growth).

    Each new block is a copy of an existing block, inserted right after it, with its residual gates
    zeroed (the single block's gate; the double block's attention and MLP gates of both streams),
    so it starts as the identity: x + 0 * f(x). Training opens the gates first (their gradient is
    f(x), not zero) and then adapts the copy. The copies are spread evenly over the stack. Used to
    give a trained model more capacity without starting again (`--add-single-layers`)."""
    if single < 0 or double < 0:
        raise ValueError(f"layers to add must be >= 0, got single={single}, double={double}")
    cfg = model.config
    if (single and cfg.num_single_layers == 0) or (double and cfg.num_layers == 0):
        raise ValueError("cannot grow a block stack that is empty: there is no block to copy")
    d = cfg.inner_dim

    def stack(blocks: nn.ModuleList, k: int, gates: dict[str, tuple[int, ...]]) -> nn.ModuleList:
        after, out = _insert_after(len(blocks), k), []
        for i, block in enumerate(blocks):
            out.append(block)
            for _ in range(after.count(i)):
                twin = copy.deepcopy(block)
                with torch.no_grad():
                    for name, chunks in gates.items():
                        lin = twin.get_submodule(name).linear
                        for c in chunks:
                            lin.weight[c * d : (c + 1) * d].zero_()
                            lin.bias[c * d : (c + 1) * d].zero_()
                out.append(twin)
        return nn.ModuleList(out)

    bigger = copy.deepcopy(model)  # everything but the two block stacks carries over as it is
    bigger.clear_section_cache()
    bigger.config = dataclasses.replace(
        cfg, num_layers=cfg.num_layers + double, num_single_layers=cfg.num_single_layers + single
    )
    bigger.transformer_blocks = stack(bigger.transformer_blocks, double, {"norm1": (2, 5), "norm1_context": (2, 5)})
    bigger.single_transformer_blocks = stack(bigger.single_transformer_blocks, single, {"norm": (2,)})
    return bigger


def build_model(cfg: TrainConfig) -> FramePackTransformer:
    """From `cfg.init` (a registry model name or a transformer folder/file), else a fresh `cfg.model`."""
    from framepack.weights import load_transformer

    if cfg.init:
        source = cfg.init
        from framepack.registry import REGISTRY, resolve_spec

        if source in REGISTRY:
            source = resolve_spec(REGISTRY[source])["transformer"]
        model = load_transformer(source, dtype=torch.float32)
        if cfg.add_single_layers or cfg.add_double_layers:
            if cfg.lora_rank > 0:  # LoRA freezes the modulations, so the new blocks' gates would stay shut
                raise ValueError("adding layers needs full training: with --lora-rank the new blocks' gates "
                                 "(not LoRA targets) stay closed; drop --lora-rank")  # fmt: skip
            model = grow_depth(model, cfg.add_single_layers, cfg.add_double_layers)
        return model.train().requires_grad_(True)
    from framepack.train.toyfamily import FAMILIES

    if cfg.model not in FAMILIES:
        raise ValueError(f"unknown model config {cfg.model!r}; choose one of {sorted(FAMILIES)} or pass --init")
    if cfg.add_single_layers or cfg.add_double_layers:
        raise ValueError("adding layers grows a trained model: pass --init with the model to grow "
                         "(for a deeper model from scratch, choose a larger --model)")  # fmt: skip
    return init_from_scratch(FramePackTransformer(FAMILIES[cfg.model][1]), cfg.seed).train()


# ------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class TrainConfig:
    data: str  # dataset folder (framepack.train.data)
    out: str  # run folder: checkpoints/, loss.csv, transformer/ (the export)
    model: str = "toy"  # from-scratch architecture (toyfamily.FAMILIES), unless `init` is given
    init: str | None = None  # start from: a registry model name or a transformer folder / .safetensors
    add_single_layers: int = 0  # grow `init` by this many single-stream blocks (grow_depth)
    add_double_layers: int = 0  # ... and double-stream blocks
    steps: int = 15000
    batch_size: int = 8
    lr: float = 4e-4
    lr_schedule: str = "cosine"  # or "constant" (after warmup)
    warmup: int = 250
    min_lr_ratio: float = 0.1  # cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema: float = 0.999  # EMA decay of the exported weights; 0 = off
    schedules: tuple[str, ...] = ("inverted", "forward")
    schedule_weights: tuple[float, ...] = ()  # relative share of each schedule's samples; () = equal
    sigma_sampling: str = "uniform"  # or "logit-normal"
    guidance: tuple[float, float] = (1.0, 12.0)  # distilled guidance scale range
    caption_dropout: float = 0.1
    no_start_probability: float = 0.1  # F1 (start_optional) samples without the start frame (the baseline mode)
    context_noise: float = 0.0  # std of Gaussian noise added to the clean context latents (augmentation)
    precision: str = "fp32"  # or "bf16" (autocast)
    gradient_checkpointing: bool = False
    lora_rank: int = 0  # > 0: train LoRA adapters only
    lora_alpha: float | None = None  # default: the rank
    seed: int = 0
    save_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 25
    probe_every: int = 500
    probe_samples: int = 32
    device: str = "cpu"

    def to_json_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        for k in ("betas", "schedules", "schedule_weights", "guidance"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class Batch:
    kwargs: dict[str, torch.Tensor]  # the transformer's keyword arguments
    target: torch.Tensor  # velocity eps - x0 (B, C, w, h, w)
    sigma: torch.Tensor  # (B,)
    meta: list[dict] = field(default_factory=list)  # per sample: clip, schedule, section, flags


# ------------------------------------------------------------------------------------ the trainer
class SectionTrainer:
    def __init__(self, cfg: TrainConfig, dataset: LatentDataset | None = None,
                 model: FramePackTransformer | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        self.data = dataset if dataset is not None else LatentDataset(cfg.data)
        self.device = torch.device(cfg.device)
        self.schedules = {k: make_schedule(k, self.data.window) for k in cfg.schedules}
        self.schedule_share = _schedule_share(cfg.schedules, cfg.schedule_weights)
        self.model = (model if model is not None else build_model(cfg)).to(self.device)
        self._check_widths()
        if cfg.lora_rank > 0:
            apply_lora(self.model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        self.model.train()
        self.named_params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        decay = [p for n, p in self.named_params if p.ndim >= 2]
        no_decay = [p for n, p in self.named_params if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas,
        )  # fmt: skip
        self.ema = {n: p.detach().clone().float() for n, p in self.named_params} if cfg.ema > 0 else None
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.seconds = 0.0
        self._running: list[float] = []
        c0 = self.data[0].latents
        self.seq_len = self.data.window * c0.shape[3] * c0.shape[4] // 4  # noisy tokens, as the pipeline's shift
        self.mu = flow_shift_mu(self.seq_len)
        self.mu_one_frame = flow_shift_mu(c0.shape[3] * c0.shape[4] // 4)  # one noisy frame's tokens
        self.probe = self._probe_batch() if cfg.probe_samples > 0 else None

    # ---------------------------------------------------------------- data
    def _check_widths(self) -> None:
        c, mc = self.data[0], self.model.config
        got = (c.llama.shape[-1], c.clip_pooled.shape[-1], c.siglip.shape[-1], c.latents.shape[1])
        want = (mc.text_embed_dim, mc.pooled_projection_dim, mc.image_proj_dim, mc.in_channels)
        if got != want:
            raise ValueError(f"dataset widths (text, pooled, image, latent channels) {got} do not match the "
                             f"transformer's {want}: the dataset was built with other encoders")  # fmt: skip

    def draw(self, n: int, generator: torch.Generator, sigmas: torch.Tensor | None = None,
             weighted: bool = True) -> Batch:  # fmt: skip
        """A batch of `n` samples; every random choice comes from `generator`, in a fixed order.
        `weighted=False` ignores the schedule weights (the probe: comparable across runs)."""
        cfg, kinds = self.cfg, list(self.schedules)
        one = OneFrameSchedule.name
        one_frame = one in kinds and kinds[self._pick_schedule(generator, weighted)] == one  # the batch's kind
        with_2x_4x = one_frame and bool(torch.rand((), generator=generator) < 0.5)
        items = []
        for _ in range(n):
            ci = int(torch.randint(len(self.data), (), generator=generator))
            clip = self.data[ci]
            if one_frame:
                kind, no_start = one, False
                si = 1 + int(torch.randint(min(self.data.window, clip.latents.shape[2] - 1), (), generator=generator))
                drop_caption = bool(torch.rand((), generator=generator) < cfg.caption_dropout)
                ctx, x0 = one_frame_sample(clip.latents, clip.start, si, self.data.window, with_2x_4x)
                items.append((ci, kind, si, drop_caption, no_start, ctx, x0, clip))
                continue
            kind = kinds[self._pick_schedule(generator, weighted)]
            while kind == one:  # a video batch: only the video schedules
                kind = kinds[self._pick_schedule(generator, weighted)]
            si = int(torch.randint(clip.sections, (), generator=generator))
            drop_caption = bool(torch.rand((), generator=generator) < cfg.caption_dropout)
            no_start = self.schedules[kind].start_optional and bool(
                torch.rand((), generator=generator) < cfg.no_start_probability)  # fmt: skip
            ctx, x0 = section_sample(self.schedules[kind], clip.latents, clip.sections, si, clip.start)
            items.append((ci, kind, si, drop_caption, no_start, ctx, x0, clip))
        t = sample_t(n, generator, cfg.sigma_sampling) if sigmas is None else None
        mu = self.mu_one_frame if one_frame else self.mu
        sigma = (shifted_sigma(t, mu) if sigmas is None else sigmas.double()).float()  # (B,)
        lo, hi = cfg.guidance
        guidance = (lo + (hi - lo) * torch.rand(n, generator=generator)) * 1000.0
        x0 = torch.cat([it[6] for it in items])  # (B, C, w, h, w)
        eps = torch.randn(x0.shape, generator=generator)
        ctx_noise = None
        if cfg.context_noise > 0:
            shape = (n, *items[0][5].clean_latents.shape[1:])
            ctx_noise = [torch.randn(shape, generator=generator) * cfg.context_noise for _ in range(3)]
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * eps

        kw: dict[str, torch.Tensor] = {}
        for k in CONTEXT_KEYS:
            if getattr(items[0][5], k) is not None:  # a part a one-frame batch leaves out is not passed
                kw[k] = torch.cat([getattr(it[5], k) for it in items])  # latents (B, C, f, h, w), indices (B, f)
        if ctx_noise is not None:
            for k, e in zip(("clean_latents", "clean_latents_2x", "clean_latents_4x"), ctx_noise):
                if k in kw:
                    kw[k] = kw[k] + e[:, :, : kw[k].shape[2]]
        texts = [self.data.uncond if it[3] else it[7] for it in items]
        llama = [t.llama[0] for t in texts]  # (L_b, D) each
        length = max(x.shape[0] for x in llama)
        text = torch.zeros(n, length, llama[0].shape[-1])  # right-padded (B, L, D)
        mask = torch.zeros(n, length, dtype=torch.bool)
        for b, x in enumerate(llama):
            text[b, : x.shape[0]], mask[b, : x.shape[0]] = x, True
        pooled = torch.cat([t.clip_pooled for t in texts])  # (B, D)
        siglip = torch.cat([it[7].siglip for it in items])  # (B, N, D)
        for b, it in enumerate(items):
            if it[4]:  # no start frame: neither its latent nor its image embedding
                kw["clean_latents"][b, :, 0] = 0
                siglip[b] = 0
        kw.update(
            hidden_states=x_t,
            timestep=sigma * 1000.0,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            pooled_projections=pooled,
            guidance=guidance,
            image_embeddings=siglip,
        )
        meta = [{"clip": it[0], "schedule": it[1], "section": it[2], "drop_caption": it[3], "no_start": it[4]}
                for it in items]  # fmt: skip
        return Batch({k: v.to(self.device) for k, v in kw.items()}, (eps - x0).to(self.device), sigma, meta)

    def _pick_schedule(self, generator: torch.Generator, weighted: bool) -> int:
        """Index of the schedule for one sample. Equal shares keep the uniform draw of earlier runs (same
        random stream, so their recorded commands still reproduce them); otherwise one uniform number
        is placed on the cumulative shares."""
        share = self.schedule_share if weighted else None
        if share is None:
            return int(torch.randint(len(self.schedules), (), generator=generator))
        u = float(torch.rand((), generator=generator))
        return min(bisect.bisect_right(share, u), len(share) - 1)

    def _probe_batch(self) -> Batch:
        """A fixed evaluation batch (its own seed, sigmas spread evenly over the shifted schedule, the
        schedules mixed evenly whatever their training weights)."""
        n = self.cfg.probe_samples
        t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        gen = torch.Generator().manual_seed(self.cfg.seed + 1_000_003)
        return self.draw(n, gen, shifted_sigma(t, self.mu), weighted=False)

    # ---------------------------------------------------------------- optimisation
    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        return warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup, floor=cfg.min_lr_ratio,
                             constant=cfg.lr_schedule == "constant")  # fmt: skip

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.cfg.precision != "fp32":
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.cfg.precision!r}")
        return torch.autocast(self.device.type, enabled=False)

    def loss(self, batch: Batch) -> torch.Tensor:
        with self._autocast():
            pred = self.model(**batch.kwargs).sample
        return F.mse_loss(pred.float(), batch.target)

    def train_step(self) -> dict:
        """One optimisation step; returns its loss (before the update), grad norm and LR."""
        lr = self.lr_at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        batch = self.draw(self.cfg.batch_size, self.gen)
        loss = self.loss(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for _, p in self.named_params]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
        self.opt.step()
        if self.ema is not None:
            decay = min(self.cfg.ema, (1 + self.step) / (10 + self.step))  # short memory at the start
            with torch.no_grad():
                for n, p in self.named_params:
                    self.ema[n].lerp_(p.detach().float(), 1 - decay)
        self.step += 1
        return {"loss": loss.item(), "grad_norm": norm.item(), "lr": lr}

    @torch.no_grad()
    def probe_loss(self, batch: Batch | None = None) -> float:
        batch = batch or self.probe
        self.model.eval()
        try:
            return float(self.loss(batch))
        finally:
            self.model.clear_section_cache()
            self.model.train()

    # ---------------------------------------------------------------- state
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        if self.cfg.lora_rank > 0:
            return lora_state_dict(self.model)
        return self.model.state_dict()

    def state_dict(self) -> dict:
        return {
            "config": self.cfg.to_json_dict(),
            "step": self.step,
            "seconds": self.seconds,
            "model": self._trainable_state(),
            "optimizer": self.opt.state_dict(),
            "ema": self.ema,
            "generator": self.gen.get_state(),
            "rng": rng_state(),
            "running": list(self._running),
        }

    def load_state_dict(self, state: dict) -> None:
        strict = self.cfg.lora_rank == 0
        missing, unexpected = self.model.load_state_dict(state["model"], strict=strict)
        if unexpected or (not strict and any(".lora_" in k for k in missing)):
            raise ValueError(f"checkpoint does not fit this model: unexpected {unexpected[:5]}, missing {missing[:5]}")
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema = {k: v.clone() for k, v in state["ema"].items()}
        self.gen.set_state(state["generator"])
        set_rng_state(state["rng"])
        self.step, self.seconds = int(state["step"]), float(state["seconds"])
        self._running = list(state.get("running", []))

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        path = Path(path) if path else checkpoint_path(Path(self.cfg.out) / "checkpoints", self.step)
        save_state(path, self.state_dict())
        if path.parent == Path(self.cfg.out) / "checkpoints":
            prune(path.parent, self.cfg.keep_checkpoints)
        return path

    def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Load `path`, or the newest checkpoint of the run folder; False when there is none."""
        path = Path(path) if path else latest(Path(self.cfg.out) / "checkpoints")
        if path is None or not path.exists():
            return False
        self.load_state_dict(load_state(path))
        return True

    def export_model(self, *, ema: bool = True) -> FramePackTransformer:
        """A stand-alone copy for inference: EMA weights (when kept), LoRA merged, official keys."""
        model = copy.deepcopy(self.model).eval()
        if ema and self.ema is not None:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, v in self.ema.items():
                    params[n].copy_(v)
        merge_lora(model)
        model.gradient_checkpointing = False
        return model.requires_grad_(False)

    def export(self, path: str | os.PathLike, *, ema: bool = True, dtype: torch.dtype | None = None) -> Path:
        from framepack.weights import save_transformer

        path = save_transformer(self.export_model(ema=ema).cpu(), path, dtype=dtype)
        record = {"step": self.step, "seconds": round(self.seconds, 1), "ema": ema and self.ema is not None,
                  "train_config": self.cfg.to_json_dict()}  # fmt: skip
        (Path(path) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        return path

    def export_lora(self, path: str | os.PathLike, *, ema: bool = True) -> Path:
        """The trained adapters alone as a LoRA file (kohya/musubi layout, `framepack_lora` metadata):
        `framepack generate --lora FILE` on the base model gives what the merged export gives."""
        from framepack.weights import save_safetensors

        tensors = lora_file_tensors(self.model, self.ema if ema and self.ema is not None else None)
        cfg = self.cfg
        record = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha or cfg.lora_rank, "step": self.step,
                  "ema": ema and self.ema is not None}  # fmt: skip
        meta = {"framepack_lora": json.dumps(record), "ss_base_model_version": "framepack"}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, path, meta)
        return path

    # ---------------------------------------------------------------- the loop
    def fit(self, *, progress: bool = True) -> Path:
        """Train to `cfg.steps` (continuing from the current step), logging, probing and checkpointing;
        exports the final weights to <out>/transformer and returns that folder."""
        from tqdm import tqdm

        cfg, out = self.cfg, Path(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_json_dict(), indent=2) + "\n")
        log = CsvLog(out / "loss.csv", ["step", "loss", "grad_norm", "lr", "probe_loss", "samples_per_s", "seconds"])
        log.truncate(self.step)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, unit="step", desc="train",
                   dynamic_ncols=True)  # fmt: skip
        t_start, t_window, norms = time.perf_counter() - self.seconds, time.perf_counter(), []
        while self.step < cfg.steps:
            stats = self.train_step()
            self._running.append(stats["loss"])
            norms.append(stats["grad_norm"])
            self.seconds = time.perf_counter() - t_start
            bar.update(1)
            bar.set_postfix_str(f"loss {stats['loss']:.4f}", refresh=False)
            row = {}
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                row = {"step": self.step, "loss": sum(self._running) / len(self._running),
                       "grad_norm": sum(norms) / max(1, len(norms)), "lr": stats["lr"],
                       "samples_per_s": len(self._running) * cfg.batch_size / max(1e-9, now - t_window),
                       "seconds": round(self.seconds, 1)}  # fmt: skip
                self._running, norms, t_window = [], [], now
            if self.probe is not None and (self.step % cfg.probe_every == 0 or self.step == cfg.steps):
                probe = self.probe_loss()
                row = row or {"step": self.step, "seconds": round(self.seconds, 1)}
                row["probe_loss"] = probe
                bar.write(f"step {self.step}: probe loss {probe:.4f}")
            if row:
                log.write(row)
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        bar.close()
        if self.cfg.lora_rank > 0:  # the adapters alone too, for --lora on the base model
            self.export_lora(out / "lora.safetensors")
        return self.export(out / "transformer")
