"""LoRA files at inference: found, read and checked, merged into the loaded transformer, taken out again.

    ref = LoraRef(path, weight, sha256)     a request's LoRA (`--lora FILE[:WEIGHT]`, the API's `loras`)
    library.load(refs, table, inc, exc)     resolve (path, a name in the LoRA folder, or the sha256 a
                                            sidecar recorded) -> read -> `models.lora.parse_lora`:
                                            every community format -> one delta per target Linear
    merger.apply(loaded)                    the model = its original weights + sum(weight x delta)

Switching from one LoRA set to another never re-reads the checkpoint as a whole: only the Linears whose
recipe changes are recomputed, each from its original weight read back from the memory-mapped
checkpoint (`weights.CheckpointTensors`; a model built in memory keeps a copy of each weight the first
time a LoRA touches it instead). Every merge computes in one reused fp32 buffer as large as the
largest module that changes, and the checkpoint pages of a module are dropped once it is written, so
host memory grows by about one module's fp32 weight (a few with fp8: quantising needs temporaries),
never a copy of the transformer (measured: benchmarks/lora_switch.py). With fp8 the merge runs in fp32 on the
original high-precision weight and is quantised afterwards. A job with no LoRA after one with LoRAs
gets the original weights back bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from framepack.config import LoraRef, framepack_home
from framepack.models.lora import LoraError, ParsedLora, TargetTable, merged_bias, merged_weight, parse_lora
from framepack.models.quant import FP8Linear

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def default_lora_dir() -> Path:
    return framepack_home() / "loras"


def parse_lora_arg(text: str) -> LoraRef:
    """'style.safetensors:0.8' -> (style.safetensors, 0.8); a trailing ':number' is the weight, anything
    else stays part of the path (so 'C:/loras/x.safetensors' and 'a:b.safetensors' are paths)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            weight = None
        if weight is not None and math.isfinite(weight):
            return LoraRef(head, weight)
    return LoraRef(text)


_HASHES: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256 (remembered per path, size and modification time)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _header(path: Path):
    """The safetensors header of a LoRA file (weights.SafetensorsHeader); LoraError for a pickle or
    anything that is not a readable safetensors file."""
    from framepack.weights import CheckpointError, read_header

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(f"LoRA {path.name} is a {path.suffix} pickle; only .safetensors files are loaded (a pickle "
                        "can run code when opened): convert it to .safetensors first")  # fmt: skip
    try:
        return read_header(path)
    except CheckpointError as err:
        raise LoraError(f"LoRA {path.name} is not a usable safetensors file: {err}") from None


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file's tensors and metadata; LoraError for anything that is not a readable safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    header = _header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraError(f"LoRA {path.name} cannot be read as safetensors: {err}") from None
    if not tensors:
        raise LoraError(f"LoRA {path.name} holds no tensors")
    return tensors, dict(header.metadata)


@dataclass
class LoadedLora:
    """One request LoRA, found and parsed: what the merger applies and the sidecar records."""

    path: Path
    sha256: str
    weight: float
    parsed: ParsedLora
    include: str | None = None
    exclude: str | None = None

    @property
    def key(self) -> tuple:
        """Identifies the deltas (the same file with the same module filters gives the same parts)."""
        return self.sha256, self.include, self.exclude

    @property
    def ref(self) -> LoraRef:
        return LoraRef(str(self.path), self.weight, self.sha256)

    def describe(self) -> dict:
        return {"file": self.path.name, "path": str(self.path), "sha256": self.sha256, "weight": self.weight,
                **self.parsed.describe()}  # fmt: skip

    def summary(self) -> str:
        p = self.parsed
        ranks = "/".join(str(r) for r in p.ranks) or "full"
        alphas = "/".join(f"{a:g}" for a in p.alphas) or "-"
        scales = "/".join(f"{s:.4g}" for s in p.scales) or "-"
        line = (f"LoRA {self.path.name} x{self.weight:g}: {' + '.join(p.formats)}, rank {ranks}, alpha {alphas} "
                f"(scale {scales}), {len(p.modules)} modules")  # fmt: skip
        if p.filtered:
            line += f" ({p.filtered} left out by include/exclude)"
        if p.unmatched:
            kinds = ", ".join(f"{k} x{len(v)}" for k, v in list(p.unmatched.items())[:3])
            more = f", +{len(p.unmatched) - 3} more kinds" if len(p.unmatched) > 3 else ""
            line += f"; {p.unmatched_count} key(s) not applied: {kinds}{more}"
        return line


class LoraLibrary:
    """The LoRA folder: bare names and recorded hashes are looked up here; parsed files are cached."""

    def __init__(self, folder: str | os.PathLike | None = None, cache_size: int = 8) -> None:
        self.folder = (Path(folder).expanduser() if folder is not None else default_lora_dir()).absolute()
        self._parsed: OrderedDict[tuple, ParsedLora] = OrderedDict()
        self._cache_size = cache_size

    def files(self) -> list[Path]:
        """The .safetensors files under the folder (sorted by relative path)."""
        if not self.folder.is_dir():
            return []
        return sorted((p for p in self.folder.rglob("*.safetensors") if p.is_file() and not p.name.startswith(".")),
                      key=lambda p: str(p.relative_to(self.folder)).lower())  # fmt: skip

    def resolve(self, ref: LoraRef) -> Path:
        """The file a LoraRef names: its path (absolute, or relative to the working folder or the LoRA
        folder) when the file there has the recorded hash, else the folder's file with that hash."""
        given = Path(ref.path).expanduser()
        candidates = [given] if given.is_absolute() else [given, self.folder / given]
        changed = None
        for c in candidates:
            if c.is_file():
                if ref.sha256 is None or sha256_file(c) == ref.sha256:
                    return c
                changed = c
        if ref.sha256 is not None:
            for f in self.files():
                if sha256_file(f) == ref.sha256:
                    return f
            if changed is not None:
                raise LoraError(f"LoRA {changed} is not the file this job used (its sha256 differs from the recorded "
                                f"{ref.sha256[:12]}...), and no file in {self.folder} has that hash")  # fmt: skip
            raise LoraError(f"LoRA {ref.path} not found, and no file in the LoRA folder {self.folder} has its "
                            f"recorded sha256 {ref.sha256[:12]}...")  # fmt: skip
        if given.exists():
            raise LoraError(f"LoRA {ref.path} is not a file")
        where = "" if given.is_absolute() else f" (looked in the working folder and in the LoRA folder {self.folder})"
        raise LoraError(f"LoRA file not found: {ref.path}{where}")

    def check(self, refs: tuple[LoraRef, ...]) -> None:
        """Cheap checks before any model loads: every file exists and is a readable safetensors file."""
        for ref in refs:
            _header(self.resolve(ref))

    def load(self, refs: tuple[LoraRef, ...], table: TargetTable, include: str | None = None,
             exclude: str | None = None) -> list[LoadedLora]:  # fmt: skip
        out = []
        for ref in refs:
            path = self.resolve(ref)
            sha = sha256_file(path)
            key = (sha, include, exclude, id(table))
            parsed = self._parsed.get(key)
            if parsed is None:
                tensors, metadata = read_lora_file(path)
                parsed = parse_lora(tensors, metadata, table, name=path.name, include=include, exclude=exclude)
                self._parsed[key] = parsed
                while len(self._parsed) > self._cache_size:
                    self._parsed.popitem(last=False)
            self._parsed.move_to_end(key)
            out.append(LoadedLora(path, sha, float(ref.weight), parsed, include, exclude))
        return out


class KeptWeights:
    """Original weights of a model built in memory (no checkpoint to read them back from): a copy of
    each tensor the first time a LoRA touches it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.kept: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.kept:
            owner, _, attr = name.rpartition(".")
            module = self.model.get_submodule(owner)
            if isinstance(module, FP8Linear):
                raise LoraError("LoRAs on fp8 weights need the model loaded from its checkpoint (the merge runs "
                                "on the high-precision weights); this one was built in memory")  # fmt: skip
            self.kept[name] = getattr(module, attr).detach().clone()
        return self.kept[name]


class LoraMerger:
    """Keeps a transformer's Linears at original + the applied LoRA set; `apply` switches sets."""

    def __init__(self, model: nn.Module, originals) -> None:
        self.model = model
        self.originals = originals  # weights.CheckpointTensors or KeptWeights: .get(param name)
        self.order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        self.recipe: dict[str, tuple] = {}  # target -> ((lora key, weight), ...) merged into it now

    @property
    def active(self) -> bool:
        return bool(self.recipe)

    @torch.no_grad()
    def apply(self, loaded: list[LoadedLora]) -> dict:
        """Make the model original + sum(weight x delta) of `loaded` (zero weights count as absent)."""
        t0 = time.perf_counter()
        wanted: dict[str, list] = {}
        for lora in loaded:
            if lora.weight == 0:
                continue
            for target, parts in lora.parsed.modules.items():
                wanted.setdefault(target, []).append((lora.key, lora.weight, parts))
        recipes = {t: tuple((k, w) for k, w, _ in entries) for t, entries in wanted.items()}
        changed = sorted((t for t in set(recipes) | set(self.recipe) if recipes.get(t) != self.recipe.get(t)),
                         key=self.order.__getitem__)  # fmt: skip
        scratch = self._scratch(changed)
        for target in changed:
            parts = [(p, w) for _, w, ps in wanted.get(target, []) for p in ps]
            self._write(target, parts, scratch)
            if target in recipes:
                self.recipe[target] = recipes[target]
            else:
                self.recipe.pop(target, None)
        if changed and hasattr(self.model, "clear_section_cache"):
            self.model.clear_section_cache()
        return {"modules_changed": len(changed), "modules_merged": len(recipes),
                "seconds": round(time.perf_counter() - t0, 4)}  # fmt: skip

    def _scratch(self, targets: list[str]) -> torch.Tensor | None:
        """One fp32 buffer as large as the largest module to change: every merge computes in it (no
        fresh allocation, and no page faults, per module)."""
        if not targets:
            return None
        modules = [self.model.get_submodule(t) for t in targets]
        size = max(m.out_features * m.in_features for m in modules)
        device = modules[0].weight.device
        return torch.empty(size, dtype=torch.float32, device=device)

    def _write(self, target: str, parts: list, scratch: torch.Tensor | None) -> None:
        module = self.model.get_submodule(target)
        original = self.originals.get(target + ".weight")
        if scratch is not None:
            scratch = scratch[: module.out_features * module.in_features].view(module.out_features, module.in_features)
        weight = merged_weight(original, parts, scratch)
        if isinstance(module, FP8Linear):
            module.set_weight_(weight if weight is not None else original)  # quantised after the fp32 merge
        else:
            module.weight.copy_(weight if weight is not None else original)  # in place: streamed views stay valid
        bias = self.originals.get(target + ".bias") if module.bias is not None else None
        merged = merged_bias(bias, parts, target)
        if module.bias is not None:
            module.bias.copy_(merged if merged is not None else bias)
        release = getattr(self.originals, "release", None)
        if release is not None:  # the checkpoint's mapped pages of this module: read, so out of RSS again
            release(target + ".weight")
            if module.bias is not None:
                release(target + ".bias")
