"""One known LoRA (a random delta per block Linear) written in every spelling the loader accepts.

Factors are dyadic (multiples of 1/8 in -1/2..1/2, scales powers of two), so every product and sum the
formats need is exact in fp32: a loaded file must give the reference delta bit for bit, and a model
merged here (W + delta, one fp32 addition, as the merger does) must equal the merger's model bit for
bit. The reference deltas are float64 computations from the factors, independent of the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file


def dyadic(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-4, 5, shape, generator=gen).double() / 8


@dataclass
class Group:
    """One file module: a HunyuanVideo module (fused or not) and the diffusers targets it covers."""

    hunyuan: str  # official spelling, e.g. double_blocks.0.img_attn_qkv
    comfy: str  # ComfyUI spelling, e.g. double_blocks.0.img_attn.qkv
    targets: list[str]
    down: torch.Tensor  # [r, in] shared by the targets (a fused module has one down matrix)
    ups: list[torch.Tensor] = field(default_factory=list)  # [out_t, r] per target


def _block_groups(num_double: int, num_single: int) -> list[tuple[str, str, list[str]]]:
    out = []
    for i in range(num_double):
        b, h = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out += [
            (h + "img_attn_qkv", h + "img_attn.qkv", [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"]),
            (h + "txt_attn_qkv", h + "txt_attn.qkv", [b + f"attn.add_{x}_proj" for x in "qkv"]),
            (h + "img_attn_proj", h + "img_attn.proj", [b + "attn.to_out.0"]),
            (h + "txt_attn_proj", h + "txt_attn.proj", [b + "attn.to_add_out"]),
            (h + "img_mlp.fc1", h + "img_mlp.0", [b + "ff.net.0.proj"]),
            (h + "img_mlp.fc2", h + "img_mlp.2", [b + "ff.net.2"]),
            (h + "txt_mlp.fc1", h + "txt_mlp.0", [b + "ff_context.net.0.proj"]),
            (h + "txt_mlp.fc2", h + "txt_mlp.2", [b + "ff_context.net.2"]),
            (h + "img_mod.linear", h + "img_mod.lin", [b + "norm1.linear"]),
            (h + "txt_mod.linear", h + "txt_mod.lin", [b + "norm1_context.linear"]),
        ]  # fmt: skip
    for i in range(num_single):
        b, h = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        out += [
            (h + "linear1", h + "linear1", [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"]),
            (h + "linear2", h + "linear2", [b + "proj_out"]),
            (h + "modulation.linear", h + "modulation.lin", [b + "norm.linear"]),
        ]
    return out


class KnownLora:
    """Random dyadic factors for every Linear of every block of `model`; `reference()` is the delta per
    target in float64; the writers give the same LoRA in each format."""

    def __init__(self, model, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.groups: list[Group] = []
        for hy, comfy, targets in _block_groups(len(model.transformer_blocks), len(model.single_transformer_blocks)):
            g = Group(hy, comfy, targets, dyadic((rank, shapes[targets[0]][1]), gen))
            g.ups = [dyadic((shapes[t][0], rank), gen) for t in targets]
            self.groups.append(g)
        self.bias = {t: dyadic((shapes[t][0],), gen) for g in self.groups for t in g.targets}

    def reference(self) -> dict[str, torch.Tensor]:
        return {t: (up @ g.down) * self.scale for g in self.groups for t, up in zip(g.targets, g.ups)}

    # --------------------------------------------------------------------------- writers
    def kohya(self) -> dict[str, torch.Tensor]:
        out = {}
        for g in self.groups:
            for t, up in zip(g.targets, g.ups):
                k = "lora_unet_" + t.replace(".", "_")
                out |= {k + ".lora_down.weight": g.down.float(), k + ".lora_up.weight": up.float(),
                        k + ".alpha": torch.tensor(self.alpha)}  # fmt: skip
        return out

    def peft(self, prefix: str) -> dict[str, torch.Tensor]:
        """lora_A/lora_B, no alpha (so alpha = rank): the scale is folded into B."""
        out = {}
        for g in self.groups:
            for t, up in zip(g.targets, g.ups):
                out |= {
                    f"{prefix}{t}.lora_A.weight": g.down.float(),
                    f"{prefix}{t}.lora_B.weight": (up * self.scale).float(),
                }
        return out

    def hunyuan_kohya(self) -> dict[str, torch.Tensor]:
        out = {}
        for g in self.groups:
            k = "lora_unet_" + g.hunyuan.replace(".", "_")
            out |= {k + ".lora_down.weight": g.down.float(), k + ".lora_up.weight": torch.cat(g.ups).float(),
                    k + ".alpha": torch.tensor(self.alpha)}  # fmt: skip
        return out

    def hunyuan_peft(self) -> dict[str, torch.Tensor]:
        out = {}
        for g in self.groups:
            k = "diffusion_model." + g.hunyuan
            out |= {k + ".lora_A.weight": g.down.float(), k + ".lora_B.weight": (torch.cat(g.ups) * self.scale).float()}
        return out

    def comfy(self, with_bias: bool = False) -> dict[str, torch.Tensor]:
        ref, out = self.reference(), {}
        for g in self.groups:
            k = "diffusion_model." + g.comfy
            out[k + ".diff"] = torch.cat([ref[t] for t in g.targets]).float()
            if with_bias:
                out[k + ".diff_b"] = torch.cat([self.bias[t] for t in g.targets]).float()
        return out

    def loha(self) -> dict[str, torch.Tensor]:
        """(w1a @ w1b) * (w2a @ w2b) * alpha / r with w2a @ w2b all ones: the same delta as LoRA."""
        out, r = {}, self.rank
        for g in self.groups:
            for t, up in zip(g.targets, g.ups):
                k = "lycoris_" + t.replace(".", "_")
                out |= {k + ".hada_w1_a": up.float(), k + ".hada_w1_b": g.down.float(),
                        k + ".hada_w2_a": torch.full((up.shape[0], r), 1 / r),
                        k + ".hada_w2_b": torch.ones(r, g.down.shape[1]),
                        k + ".alpha": torch.tensor(self.alpha)}  # fmt: skip
        return out

    def lokr(self) -> dict[str, torch.Tensor]:
        """kron(w1, w2a @ w2b) * alpha / r with w1 = [[1]]: the same delta as LoRA."""
        out = {}
        for g in self.groups:
            for t, up in zip(g.targets, g.ups):
                k = "lycoris_" + t.replace(".", "_")
                out |= {k + ".lokr_w1": torch.ones(1, 1), k + ".lokr_w2_a": up.float(),
                        k + ".lokr_w2_b": g.down.float(),
                        k + ".alpha": torch.tensor(self.alpha)}  # fmt: skip
        return out

    def trainer(self) -> dict[str, torch.Tensor]:
        """The trainer's adapter names (`transformer_blocks.0.attn.to_q.lora_down`), with alpha."""
        out = {}
        for g in self.groups:
            for t, up in zip(g.targets, g.ups):
                out |= {
                    t + ".lora_down": g.down.float(),
                    t + ".lora_up": up.float(),
                    t + ".alpha": torch.tensor(self.alpha),
                }
        return out

    def spellings(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "kohya": self.kohya(), "peft-transformer": self.peft("transformer."),
            "peft-diffusion_model": self.peft("diffusion_model."), "peft-bare": self.peft(""),
            "hunyuan-kohya": self.hunyuan_kohya(), "hunyuan-peft": self.hunyuan_peft(), "comfyui": self.comfy(),
            "loha": self.loha(), "lokr": self.lokr(), "trainer": self.trainer(),
        }  # fmt: skip


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@torch.no_grad()
def merge_reference(model, deltas: dict[str, torch.Tensor], weight: float = 1.0, bias: dict | None = None) -> None:
    """W + weight * delta in place (one fp32 addition per weight), the reference a loaded LoRA must match."""
    for name, d in deltas.items():
        m = model.get_submodule(name)
        m.weight.copy_(m.weight.float() + (d * weight).float())
        if bias is not None and name in bias:
            m.bias.copy_(m.bias.float() + (bias[name] * weight).float())
