"""LoRA adapters on the transformer blocks' Linears, merged back into plain Linears for export.

Contract:
  * `apply_lora(model, rank, alpha)` freezes the model and wraps the `LORA_TARGETS` Linears inside the
    double- and single-stream blocks (attention and MLP projections) in `LoRALinear`:
    y = base(x) + (alpha / rank) * up(down(x)), `up` starting at zero, so the wrapped model computes
    exactly what it computed before. Only the adapters train.
  * `LoRALinear.weight` reads as the merged matrix, so code that uses a Linear's weight directly (the
    single blocks split `proj_out.weight` into column blocks) still sees the adaptation.
  * `lora_state_dict(model)` holds the adapters alone (what a LoRA run checkpoints).
  * `merge_lora(model)` replaces every `LoRALinear` with a plain Linear holding base + delta: the
    result has the official key layout and loads like any other checkpoint.

The adapters here are the trainer's own; loading LoRA files made elsewhere (community formats, one
delta per target module) belongs in this module too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from framepack.config import RequestError

LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
)  # fmt: skip


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * up(down(x)), the base frozen; `up` starts at zero (y unchanged).

    `weight` reads as the merged matrix, so code that uses a Linear's weight directly (the single
    blocks split `proj_out.weight` into column blocks) still sees, and trains, the adaptation.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        dev = base.weight.device
        self.lora_down = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=torch.float32))
        self.lora_up = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        delta = (self.lora_up @ self.lora_down) * self.scale  # (out, in)
        return self.base.weight + delta.to(self.base.weight.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(F.linear(x, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))  # (..., out) via rank r
        return self.base(x) + low * self.scale

    def merged(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)  # fmt: skip
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def _blocks_linears(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[nn.Module, str, str]]:
    """(parent, attribute, full name) of the target Linears inside the double and single blocks."""
    found = []
    for name, module in model.named_modules():
        if not name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            continue
        if isinstance(module, nn.Linear) and any(name.endswith("." + t) for t in targets):
            parent_name, _, attr = name.rpartition(".")
            found.append((model.get_submodule(parent_name), attr, name))
    return found


def _replace(parent: nn.Module, attr: str, module: nn.Module) -> None:
    if isinstance(parent, nn.ModuleList):
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: tuple[str, ...] = LORA_TARGETS,
               seed: int = 0) -> list[str]:  # fmt: skip
    """Freeze `model` and wrap the target Linears of its blocks in LoRALinear; returns their names."""
    model.requires_grad_(False)
    torch.manual_seed(seed)  # the `down` matrices' init
    names = []
    for parent, attr, name in _blocks_linears(model, targets):
        _replace(parent, attr, LoRALinear(getattr(parent, attr), rank, float(alpha if alpha is not None else rank)))
        names.append(name)
    if not names:
        raise ValueError(f"no Linear matched the LoRA targets {targets}")
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear with a plain Linear holding the merged weight (official key layout)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            _replace(model.get_submodule(parent_name) if parent_name else model, attr, module.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors alone (keys containing `.lora_`)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def lora_file_tensors(model: nn.Module, values: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapters as a kohya/musubi-tuner LoRA file (`lora_unet_<module>.lora_down.weight` [r, in],
    `.lora_up.weight` [out, r], `.alpha`), which this loader and the other FramePack tools read.
    `values`: parameter name -> tensor to write instead of the live parameter (e.g. EMA weights)."""
    values = values or {}
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            key = "lora_unet_" + name.replace(".", "_")
            down = values.get(name + ".lora_down", module.lora_down).detach().float().cpu().contiguous()
            up = values.get(name + ".lora_up", module.lora_up).detach().float().cpu().contiguous()
            out[key + ".lora_down.weight"], out[key + ".lora_up.weight"] = down, up
            out[key + ".alpha"] = torch.tensor(module.scale * module.rank)
    if not out:
        raise ValueError("the model has no LoRA adapters to export")
    return out


# =============================================================================== LoRA files
# Community LoRA files -> one weight delta per target Linear of the packed transformer. Pure tensor
# code: reading files, hashing and restoring weights live in framepack/lora.py.
#
# Keys are split into (module path, tensor kind). Module paths are looked up in a name table built
# from the model's own modules (diffusers names) plus the HunyuanVideo originals in both spellings,
# each with its dots turned into underscores for the kohya `lora_unet_` form (never reversed by string
# replacement: module names contain underscores). Fused HunyuanVideo modules (img_attn_qkv,
# linear1) map onto several targets, each taking a block of the delta's rows.


class LoraError(RequestError):
    """A LoRA file that cannot be applied; the message names the file, the keys and what was expected."""


# Key suffix -> the role of the tensor it names.
_KINDS = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
    "lora_down": "down", "lora_up": "up",  # the trainer's adapters (parameters without `.weight`)
    "alpha": "alpha", "diff": "diff", "diff_b": "diff_b",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "lokr_w1": "lokr_w1", "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b",
}  # fmt: skip
# Kinds that exist in the wild but cannot be applied exactly here: a clear error, never a silent skip.
_UNSUPPORTED = {
    "lokr_w1_a": "LoKr with a factorised w1 (lokr_w1_a/lokr_w1_b)", "lokr_w1_b": "LoKr with a factorised w1 "
    "(lokr_w1_a/lokr_w1_b)", "lokr_t2": "LoKr Tucker (lokr_t2)", "hada_t1": "LoHa Tucker (hada_t1/hada_t2)",
    "hada_t2": "LoHa Tucker (hada_t1/hada_t2)", "dora_scale": "DoRA (dora_scale)",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector)", "lora_magnitude_vector.weight":
    "DoRA (lora_magnitude_vector)", "lora_mid.weight": "LoCon Tucker (lora_mid)",
    "lora_A.bias": "LoRA with biases (lora_A.bias)", "lora_B.bias": "LoRA with biases (lora_B.bias)",
}  # fmt: skip
_SUFFIXES = sorted([*_KINDS, *_UNSUPPORTED], key=len, reverse=True)
_FLAT_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")  # the module path with dots as underscores
_DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")


def split_key(key: str) -> tuple[str, str] | None:
    """'lora_unet_x_y.lora_down.weight' -> ('lora_unet_x_y', 'lora_down.weight'); None: not a LoRA key."""
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


@dataclass(frozen=True)
class Route:
    """Where one file module's delta goes: `rows` (start, stop) of it belong to `target` (None: all)."""

    target: str
    rows: tuple[int, int] | None = None


class TargetTable:
    """The model's Linears (diffusers names -> (out, in)) and every spelling that maps onto them."""

    def __init__(self, shapes: dict[str, tuple[int, int]], num_layers: int, num_single_layers: int) -> None:
        self.shapes = shapes
        self.dotted: dict[str, tuple[str, tuple[Route, ...]]] = {}  # name -> (spelling, routes)
        for name in shapes:
            self.dotted[name] = ("diffusers", (Route(name),))
        for i in range(num_layers):
            self._hunyuan_double(i)
        for i in range(num_single_layers):
            self._hunyuan_single(i)
        self.flat: dict[str, str] = {}
        for name in self.dotted:
            flat = name.replace(".", "_")
            if flat in self.flat:  # 'img_attn.qkv' (ComfyUI) and 'img_attn_qkv' (official): the same module
                if self.dotted[self.flat[flat]][1] != self.dotted[name][1]:
                    raise RuntimeError(f"module names {name} and {self.flat[flat]} flatten alike")
                continue
            self.flat[flat] = name

    @classmethod
    def of(cls, model: nn.Module) -> TargetTable:
        shapes = {}
        for name, m in model.named_modules():
            if hasattr(m, "in_features") and hasattr(m, "out_features") and not isinstance(m, LoRALinear):
                shapes[name] = (int(m.out_features), int(m.in_features))
        return cls(shapes, len(model.transformer_blocks), len(model.single_transformer_blocks))

    def _add(self, name: str, spelling: str, routes: list[tuple[str, int | None]]) -> None:
        """routes: (target, rows) with rows counted from the previous route's end (None: the whole)."""
        out, start = [], 0
        for target, rows in routes:
            if target not in self.shapes:
                return
            if rows is None:
                out.append(Route(target))
            else:
                out.append(Route(target, (start, start + rows)))
                start += rows
        self.dotted[name] = (spelling, tuple(out))

    def _hunyuan_double(self, i: int) -> None:
        b = f"transformer_blocks.{i}."
        if b + "attn.to_q" not in self.shapes:
            return
        d = self.shapes[b + "attn.to_q"][0]
        pairs = {
            "img_attn_qkv": [(b + "attn.to_q", d), (b + "attn.to_k", d), (b + "attn.to_v", d)],
            "txt_attn_qkv": [(b + "attn.add_q_proj", d), (b + "attn.add_k_proj", d), (b + "attn.add_v_proj", d)],
            "img_attn_proj": [(b + "attn.to_out.0", None)], "txt_attn_proj": [(b + "attn.to_add_out", None)],
            "img_mlp.fc1": [(b + "ff.net.0.proj", None)], "img_mlp.fc2": [(b + "ff.net.2", None)],
            "txt_mlp.fc1": [(b + "ff_context.net.0.proj", None)], "txt_mlp.fc2": [(b + "ff_context.net.2", None)],
            "img_mod.linear": [(b + "norm1.linear", None)], "txt_mod.linear": [(b + "norm1_context.linear", None)],
        }  # fmt: skip
        comfy = {"img_attn_qkv": "img_attn.qkv", "txt_attn_qkv": "txt_attn.qkv", "img_attn_proj": "img_attn.proj",
                 "txt_attn_proj": "txt_attn.proj", "img_mlp.fc1": "img_mlp.0", "img_mlp.fc2": "img_mlp.2",
                 "txt_mlp.fc1": "txt_mlp.0", "txt_mlp.fc2": "txt_mlp.2", "img_mod.linear": "img_mod.lin",
                 "txt_mod.linear": "txt_mod.lin"}  # fmt: skip
        for name, routes in pairs.items():
            self._add(f"double_blocks.{i}.{name}", "hunyuan", routes)
            self._add(f"double_blocks.{i}.{comfy[name]}", "comfyui", routes)

    def _hunyuan_single(self, i: int) -> None:
        b = f"single_transformer_blocks.{i}."
        if b + "attn.to_q" not in self.shapes:
            return
        d, m = self.shapes[b + "attn.to_q"][0], self.shapes[b + "proj_mlp"][0]
        linear1 = [(b + "attn.to_q", d), (b + "attn.to_k", d), (b + "attn.to_v", d), (b + "proj_mlp", m)]
        self._add(f"single_blocks.{i}.linear1", "shared", linear1)  # the same in the ComfyUI spelling
        self._add(f"single_blocks.{i}.linear2", "shared", [(b + "proj_out", None)])
        self._add(f"single_blocks.{i}.modulation.linear", "hunyuan", [(b + "norm.linear", None)])
        self._add(f"single_blocks.{i}.modulation.lin", "comfyui", [(b + "norm.linear", None)])

    def lookup(self, module: str) -> tuple[str, str, tuple[Route, ...]] | None:
        """A file's module path -> (key style, spelling, routes), or None when it names nothing here."""
        for prefix in _FLAT_PREFIXES:
            if module.startswith(prefix):
                name = self.flat.get(module[len(prefix) :])
                return None if name is None else ("kohya", *self.dotted[name])
        style, rest = "plain", module
        stripped = True
        while stripped:
            stripped = False
            for prefix in _DOTTED_PREFIXES:
                if rest.startswith(prefix):
                    rest, style, stripped = rest[len(prefix) :], "prefixed", True
        found = self.dotted.get(rest)
        return None if found is None else (style, *found)


# ------------------------------------------------------------------------------------ factors
def _matrix(t: torch.Tensor) -> torch.Tensor:
    """fp32 2-D view of a Linear factor (1x1 conv factors [out, in, 1, 1] accepted)."""
    t = t.float()
    while t.dim() > 2 and t.shape[-1] == 1:
        t = t.squeeze(-1)
    return t


class Factor:
    """One module's delta as stored in the file. `delta(rows)` computes rows [start, stop) of it in fp32."""

    kind = "?"
    rank: int | None = None
    alpha: float | None = None
    scale: float = 1.0
    shape: tuple[int, int]
    has_weight = True

    def delta(self, rows: tuple[int, int] | None, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def add_to(self, total: torch.Tensor | None, rows, coeff: float, scratch: torch.Tensor | None) -> torch.Tensor:
        """total + coeff * delta(rows), in place; with no total yet, coeff * delta (into `scratch`, an
        fp32 buffer of the target's shape, when given: no fresh allocation per module)."""
        device = scratch.device if scratch is not None else total.device if total is not None else torch.device("cpu")
        d = self.delta(rows, device)
        if total is not None:
            return total.add_(d, alpha=coeff)
        return torch.mul(d, coeff, out=scratch) if scratch is not None else d * coeff

    def bias_delta(self, rows: tuple[int, int] | None, device: torch.device) -> torch.Tensor | None:
        return None


def _rows(t: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    return t if rows is None else t[rows[0] : rows[1]]


class LowRank(Factor):
    """delta = up @ down * alpha / rank (kohya lora_up/lora_down, PEFT lora_B/lora_A)."""

    kind = "lora"

    def __init__(self, up: torch.Tensor, down: torch.Tensor, alpha: float | None) -> None:
        self.up, self.down = _matrix(up), _matrix(down)
        self.rank = self.down.shape[0]
        if self.up.dim() != 2 or self.down.dim() != 2 or self.up.shape[1] != self.rank:
            raise ValueError(f"up {list(up.shape)} and down {list(down.shape)} do not form a rank-r product")
        self.alpha = float(alpha) if alpha is not None else float(self.rank)
        self.scale = self.alpha / self.rank
        self.shape = (self.up.shape[0], self.down.shape[1])

    def delta(self, rows, device):
        return (_rows(self.up, rows).to(device) @ self.down.to(device)) * self.scale

    def add_to(self, total, rows, coeff, scratch):
        """One GEMM into the buffer: the scale goes on the small up factor (or the GEMM's alpha)."""
        device = scratch.device if scratch is not None else total.device if total is not None else torch.device("cpu")
        up, down = _rows(self.up, rows).to(device), self.down.to(device)
        if total is not None:
            return total.addmm_(up, down, alpha=self.scale * coeff)
        return torch.mm(up * (self.scale * coeff), down, out=scratch) if scratch is not None else torch.mm(
            up * (self.scale * coeff), down)  # fmt: skip


class LoHa(Factor):
    """LyCORIS LoHa: delta = (w1a @ w1b) * (w2a @ w2b) * alpha / rank."""

    kind = "loha"

    def __init__(self, w1a, w1b, w2a, w2b, alpha: float | None) -> None:
        self.w1a, self.w1b, self.w2a, self.w2b = (_matrix(t) for t in (w1a, w1b, w2a, w2b))
        self.rank = self.w1b.shape[0]
        ok = (self.w1a.shape[1] == self.rank and self.w2a.shape[1] == self.w2b.shape[0]
              and self.w1a.shape[0] == self.w2a.shape[0] and self.w1b.shape[1] == self.w2b.shape[1])  # fmt: skip
        if not ok:
            raise ValueError(f"hada_w1_a {list(w1a.shape)}, hada_w1_b {list(w1b.shape)}, hada_w2_a "
                             f"{list(w2a.shape)}, hada_w2_b {list(w2b.shape)} do not fit together")  # fmt: skip
        self.alpha = float(alpha) if alpha is not None else float(self.rank)
        self.scale = self.alpha / self.rank
        self.shape = (self.w1a.shape[0], self.w1b.shape[1])

    def delta(self, rows, device):
        one = _rows(self.w1a, rows).to(device) @ self.w1b.to(device)
        two = _rows(self.w2a, rows).to(device) @ self.w2b.to(device)
        return one * two * self.scale


class LoKr(Factor):
    """LyCORIS LoKr: delta = kron(w1, w2) * scale; w2 full (scale 1) or w2a @ w2b (scale alpha / rank)."""

    kind = "lokr"

    def __init__(self, w1, w2=None, w2a=None, w2b=None, alpha: float | None = None) -> None:
        self.w1 = _matrix(w1)
        if w2 is not None:
            self.w2 = _matrix(w2)
            self.rank, self.scale = None, 1.0
            self.alpha = float(alpha) if alpha is not None else None
        else:
            w2a, w2b = _matrix(w2a), _matrix(w2b)
            if w2a.shape[1] != w2b.shape[0]:
                raise ValueError(f"lokr_w2_a {list(w2a.shape)} and lokr_w2_b {list(w2b.shape)} do not multiply")
            self.w2 = w2a @ w2b
            self.rank = w2b.shape[0]
            self.alpha = float(alpha) if alpha is not None else float(self.rank)
            self.scale = self.alpha / self.rank
        if self.w1.dim() != 2 or self.w2.dim() != 2:
            raise ValueError(f"lokr_w1 {list(self.w1.shape)} / w2 {list(self.w2.shape)} are not matrices")
        self.shape = (self.w1.shape[0] * self.w2.shape[0], self.w1.shape[1] * self.w2.shape[1])

    def delta(self, rows, device):
        return _rows(torch.kron(self.w1.to(device), self.w2.to(device)), rows) * self.scale


class Full(Factor):
    """ComfyUI `.diff` (the whole weight delta) and/or `.diff_b` (a bias delta)."""

    kind = "diff"

    def __init__(self, diff: torch.Tensor | None, diff_b: torch.Tensor | None, out_in: tuple[int, int]) -> None:
        self.diff = None if diff is None else _matrix(diff)
        self.diff_b = None if diff_b is None else diff_b.float().reshape(-1)
        self.has_weight = self.diff is not None
        self.shape = tuple(self.diff.shape) if self.diff is not None else (self.diff_b.shape[0], out_in[1])

    def delta(self, rows, device):
        return _rows(self.diff, rows).to(device)

    def bias_delta(self, rows, device):
        return None if self.diff_b is None else _rows(self.diff_b, rows).to(device)


@dataclass(frozen=True)
class Part:
    """A target Linear's share of one file module: `factors` (a low-rank-like one and/or a diff) and
    the rows of them that belong to the target."""

    source: str  # the file's module path
    factors: tuple[Factor, ...]
    rows: tuple[int, int] | None

    def delta(self, device: torch.device) -> torch.Tensor | None:
        out = None
        for f in self.factors:
            if f.has_weight:
                d = f.delta(self.rows, device)
                out = d if out is None else out + d
        return out

    def add_to(self, total: torch.Tensor | None, coeff: float, scratch: torch.Tensor | None) -> torch.Tensor | None:
        for f in self.factors:
            if f.has_weight:
                total = f.add_to(total, self.rows, coeff, scratch)
        return total

    def bias_delta(self, device: torch.device) -> torch.Tensor | None:
        out = None
        for f in self.factors:
            d = f.bias_delta(self.rows, device)
            if d is not None:
                out = d if out is None else out + d
        return out


@dataclass
class ParsedLora:
    """What one file adds: target Linear name -> its parts, plus what the file held and where it went."""

    name: str
    formats: tuple[str, ...]
    modules: dict[str, list[Part]]
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]
    scales: tuple[float, ...]
    unmatched: dict[str, list[str]]  # kind (module pattern) -> keys
    filtered: int  # target modules left out by include/exclude
    file_modules: int  # modules the file holds deltas for

    @property
    def unmatched_count(self) -> int:
        return sum(len(v) for v in self.unmatched.values())

    def describe(self) -> dict:
        return {"format": " + ".join(self.formats), "ranks": list(self.ranks), "alphas": list(self.alphas),
                "scales": list(self.scales), "matched_modules": len(self.modules), "file_modules": self.file_modules,
                "filtered_out": self.filtered, "unmatched_keys": self.unmatched_count,
                "unmatched": {k: v[:3] for k, v in self.unmatched.items()}}  # fmt: skip


def _pattern(module: str) -> str:
    """A module path with its block numbers as N: 'double_blocks.3.img_in' -> 'double_blocks.N.img_in'."""
    return re.sub(r"(?<=[._])\d+(?=[._]|$)", "N", module)


# Other architectures' key patterns, for the "made for another model" message.
_OTHER_ARCHS = (
    (re.compile(r"(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|lora_te\d?_)"),
     "Stable Diffusion / SDXL"),
    (re.compile(r"blocks[._]\d+[._](self_attn|cross_attn|ffn)"), "Wan"),
    (re.compile(r"transformer_blocks[._]\d+[._](attn1|attn2)"), "LTX-Video / CogVideoX / Mochi-style DiT"),
)
_ARCH_METADATA = ("ss_base_model_version", "modelspec.architecture", "base_model")
_FOREIGN_ARCH_WORDS = re.compile(r"sdxl|\bsd_?v?[123]|stable.diffusion|flux|(?<![a-z])wan|ltx|cogvideo|mochi|pixart|"
                                 r"kolors", re.IGNORECASE)  # fmt: skip


def _foreign_metadata(metadata: dict[str, str]) -> str | None:
    for key in _ARCH_METADATA:
        value = str(metadata.get(key, ""))
        if value and _FOREIGN_ARCH_WORDS.search(value) and not re.search(r"hunyuan|framepack", value, re.I):
            return f"its metadata says {key}={value!r}"
    return None


def _foreign(metadata: dict[str, str], modules: list[str]) -> str | None:
    why = _foreign_metadata(metadata)
    if why:
        return why
    for pattern, arch in _OTHER_ARCHS:
        hits = [m for m in modules if pattern.search(m)]
        if hits:
            return f"its keys look like a {arch} LoRA (e.g. {hits[0]!r})"
    return None


def _peft_alpha(metadata: dict[str, str]) -> tuple[float | None, dict[str, float]]:
    """lora_alpha (and alpha_pattern) from diffusers'/PEFT's adapter metadata, when a file carries it."""
    import json

    for key in ("lora_adapter_metadata", "transformer.lora_adapter_metadata", "adapter_config"):
        if key in metadata:
            try:
                cfg = json.loads(metadata[key])
            except (TypeError, ValueError):
                continue
            if isinstance(cfg, dict) and "transformer" in cfg and isinstance(cfg["transformer"], dict):
                cfg = cfg["transformer"]
            if isinstance(cfg, dict):
                alpha = cfg.get("lora_alpha")
                pattern = {str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()}
                return (float(alpha) if isinstance(alpha, (int, float)) else None), pattern
    return None, {}


def _finite(key: str, t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.abs().amax())):  # NaN/inf reach the max
        bad = int((~torch.isfinite(t)).sum())
        raise LoraError(f"LoRA {name}: tensor {key} holds {bad} NaN/inf value(s); the file is damaged "
                        "(or was trained into NaN): re-export or re-download it")  # fmt: skip


def _style_name(style: str, spelling: str, kinds: set[str]) -> str:
    if "loha" in kinds:
        return "LyCORIS LoHa"
    if "lokr" in kinds:
        return "LyCORIS LoKr"
    if spelling == "comfyui":
        return "ComfyUI native"
    if spelling in ("hunyuan", "shared"):
        return "HunyuanVideo (kohya spelling)" if style == "kohya" else "HunyuanVideo (PEFT spelling)"
    if "diff" in kinds:
        return "ComfyUI native"
    return "kohya/musubi-tuner" if style == "kohya" else "diffusers/PEFT"


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], table: TargetTable, *, name: str,
               include: str | None = None, exclude: str | None = None) -> ParsedLora:  # fmt: skip
    """Map a LoRA file's tensors onto `table`'s modules. Raises LoraError for anything that cannot be
    applied exactly: a key kind with no exact formula, a shape that does not fit its module, NaN/inf,
    a file that matches no module at all (saying which architecture it looks made for)."""
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unmatched: dict[str, list[str]] = {}
    unsupported: dict[str, list[str]] = {}
    for key, t in tensors.items():
        split = split_key(key)
        if split is None:
            unmatched.setdefault("not a LoRA tensor: " + _pattern(key), []).append(key)
            continue
        module, suffix = split
        if suffix in _UNSUPPORTED:
            unsupported.setdefault(_UNSUPPORTED[suffix], []).append(key)
            continue
        groups.setdefault(module, {})[_KINDS[suffix]] = (key, t)
    if unsupported:
        kinds = "; ".join(f"{what}: {len(keys)} key(s), e.g. {keys[0]}" for what, keys in unsupported.items())
        raise LoraError(f"LoRA {name} uses tensor kinds that cannot be applied exactly: {kinds}. Accepted: LoRA "
                        "(lora_up/lora_down, lora_A/lora_B, alpha), LoHa (hada_w1_a/b, hada_w2_a/b), LoKr "
                        "(lokr_w1 with lokr_w2 or lokr_w2_a/b) and ComfyUI diffs (diff, diff_b)")  # fmt: skip
    why = _foreign_metadata(metadata)
    if why:  # a Flux LoRA, say, has HunyuanVideo-like key names and even the same shapes
        raise LoraError(f"LoRA {name} is not for FramePack/HunyuanVideo: {why}")
    peft_alpha, alpha_pattern = _peft_alpha(metadata)
    inc = _regex(include, "--lora-include") if include else None
    exc = _regex(exclude, "--lora-exclude") if exclude else None
    modules: dict[str, list[Part]] = {}
    formats, shared_formats, ranks, alphas, scales = set(), set(), set(), set(), set()
    filtered: set[str] = set()
    matched_modules = 0  # file modules that name a module here
    for module, parts in groups.items():
        found = table.lookup(module)
        if found is None:
            unmatched.setdefault(_pattern(module), []).extend(k for k, _ in parts.values())
            continue
        matched_modules += 1
        style, spelling, routes = found
        for key, t in parts.values():
            _finite(key, t, name)
        alpha = float(parts["alpha"][1].float().reshape(-1)[0]) if "alpha" in parts else None
        if alpha is None and peft_alpha is not None:
            alpha = next((a for pat, a in alpha_pattern.items() if module.endswith(pat)), peft_alpha)
        factors = _factors(module, parts, alpha, table.shapes[routes[0].target], name)
        out_total = sum(r.rows[1] - r.rows[0] for r in routes) if routes[0].rows else table.shapes[routes[0].target][0]
        in_dim = table.shapes[routes[0].target][1]
        for f in factors:
            if tuple(f.shape) != (out_total, in_dim):
                raise LoraError(
                    f"LoRA {name}: {module} gives a delta of shape {list(f.shape)} but "
                    f"{' + '.join(r.target for r in routes)} expects [{out_total}, {in_dim}] "
                    "(a LoRA for a model of another size?)"
                )
        kinds = {f.kind for f in factors}
        label = "FramePack trainer" if "framepack_lora" in metadata else _style_name(style, spelling, kinds)
        (shared_formats if spelling == "shared" else formats).add(label)  # shared names: the others decide
        for f in factors:
            if f.rank is not None:
                ranks.add(f.rank)
            if f.alpha is not None:
                alphas.add(f.alpha)
            if f.has_weight:
                scales.add(f.scale)
        for route in routes:
            if (inc is not None and not inc.search(route.target)) or (exc is not None and exc.search(route.target)):
                filtered.add(route.target)
                continue
            modules.setdefault(route.target, []).append(Part(module, tuple(factors), route.rows))
    if not matched_modules:
        shown = sorted(groups)[:1] or sorted(tensors)[:1]
        why = _foreign(metadata, list(groups) or list(tensors))
        if why:
            raise LoraError(f"LoRA {name} is not for FramePack/HunyuanVideo: {why}; no key matched a transformer "
                            "module")  # fmt: skip
        raise LoraError(f"LoRA {name} matches no module of this transformer ({len(tensors)} tensors; keys look like "
                        f"{shown[0]!r}). Accepted: kohya lora_unet_*, diffusers/PEFT (transformer./diffusion_model./"
                        "no prefix), HunyuanVideo double_blocks/single_blocks (kohya, PEFT or ComfyUI spelling), "
                        "LyCORIS LoHa/LoKr")  # fmt: skip
    if not modules:
        raise LoraError(f"LoRA {name}: every one of its {len(filtered)} target modules was left out by "
                        f"--lora-include {include!r} / --lora-exclude {exclude!r}; nothing would change")  # fmt: skip
    return ParsedLora(name, tuple(sorted(formats or shared_formats)), modules, tuple(sorted(ranks)),
                      tuple(sorted(alphas)), tuple(sorted(scales)), unmatched, len(filtered),
                      matched_modules)  # fmt: skip


def _regex(pattern: str, flag: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise LoraError(f"{flag} {pattern!r} is not a valid regular expression: {err}") from None


def _factors(module: str, parts: dict[str, tuple[str, torch.Tensor]], alpha: float | None,
             out_in: tuple[int, int], name: str) -> tuple[Factor, ...]:  # fmt: skip
    roles = set(parts) - {"alpha"}
    t = {k: v for k, (_, v) in parts.items()}
    families = [fam for fam, keys in (("lora", {"up", "down"}), ("loha", {"hada_w1_a", "hada_w1_b", "hada_w2_a",
                "hada_w2_b"}), ("lokr", {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"})) if roles & keys]  # fmt: skip
    if len(families) > 1:
        raise LoraError(f"LoRA {name}: {module} mixes {' and '.join(families)} tensors; one kind per module")
    factors: list[Factor] = []
    try:
        if families == ["lora"]:
            missing = {"up", "down"} - roles
            if missing:
                raise LoraError(f"LoRA {name}: {module} has no {'/'.join(sorted(missing))} matrix (lora_up/lora_B "
                                "and lora_down/lora_A come in pairs)")  # fmt: skip
            factors.append(LowRank(t["up"], t["down"], alpha))
        elif families == ["loha"]:
            need = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
            if need - roles:
                raise LoraError(f"LoRA {name}: LoHa module {module} lacks {', '.join(sorted(need - roles))}")
            factors.append(LoHa(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], alpha))
        elif families == ["lokr"]:
            if "lokr_w1" not in roles or not ("lokr_w2" in roles or {"lokr_w2_a", "lokr_w2_b"} <= roles):
                raise LoraError(f"LoRA {name}: LoKr module {module} needs lokr_w1 and lokr_w2 (or lokr_w2_a + "
                                f"lokr_w2_b); it has {', '.join(sorted(roles))}")  # fmt: skip
            factors.append(LoKr(t["lokr_w1"], t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b"), alpha))
    except ValueError as err:
        if isinstance(err, LoraError):
            raise
        raise LoraError(f"LoRA {name}: {module}: {err}") from None
    if "diff" in roles or "diff_b" in roles:
        factors.append(Full(t.get("diff"), t.get("diff_b"), out_in))
    if not factors:
        raise LoraError(f"LoRA {name}: {module} has only an alpha, no weights")
    return tuple(factors)


# ------------------------------------------------------------------------------------- merging
def merged_weight(base: torch.Tensor, parts: list[tuple[Part, float]],
                  scratch: torch.Tensor | None = None) -> torch.Tensor | None:  # fmt: skip
    """base + sum(weight * delta) in fp32 (the deltas summed first, then added once: 0.5 A + 0.5 B is
    the same as a file holding their sum), or None when no part changes the weight. `scratch`: an fp32
    buffer of the weight's shape to compute in (the merger reuses one for every module)."""
    total = None
    for part, weight in parts:
        total = part.add_to(total, weight, scratch)
    return None if total is None else total.add_(base.to(total.device))


def merged_bias(base: torch.Tensor | None, parts: list[tuple[Part, float]], name: str) -> torch.Tensor | None:
    """base + sum(weight * bias delta) in fp32, or None when no part has a bias delta. LoraError for a
    bias delta on Linear `name` that has no bias (base None)."""
    total = None
    for part, weight in parts:
        d = part.bias_delta(base.device if base is not None else torch.device("cpu"))
        if d is not None:
            total = d * weight if total is None else total.add_(d, alpha=weight)
    if total is None:
        return None
    if base is None:
        raise LoraError(f"a LoRA has a bias delta (diff_b) for {name}, which has no bias")
    return base.float() + total
