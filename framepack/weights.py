"""Find, check, load and save transformer checkpoints. Model code never touches files; this does.

Accepted sources (`load_transformer`):
  * a directory in diffusers layout: `config.json` + `diffusion_pytorch_model.safetensors`, or shards
    `diffusion_pytorch_model-0000K-of-0000N.safetensors` + `diffusion_pytorch_model.safetensors.index.json`
    (the official `lllyasviel/FramePackI2V_HY` and `FramePack_F1_I2V_HY_20250503` repos);
  * one `.safetensors` file with the same keys (config from its metadata, else inferred from shapes);
  * a Hugging Face repo id, downloaded into the standard HF cache.

Loading builds the model on the meta device, checks every key and shape against the checkpoint
headers before reading any tensor data, then memory-maps each file and copies the tensors one at a
time into their final dtype and device, releasing each tensor's mapped pages right behind it: peak
host RAM stays near one copy of the weights, with no fp32 detour and no second CPU copy.
(Parameters are not left as views of the mapping: safetensors offsets are only 8-byte aligned and
CPU GEMM results depend on alignment, so a zero-copy load would not be bitwise reproducible.)
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from framepack.config import TransformerConfig
from framepack.models.attention import AttentionBackend, select_backend
from framepack.models.transformer import FramePackTransformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_METADATA_KEY = "framepack_transformer_config"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the files/keys and what was expected."""


# ------------------------------------------------------------------------------ safetensors files
@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file: only {size} bytes long")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 512 * 2**20:
                raise CheckpointError(
                    f"{path} is truncated or not a safetensors file: its header claims {n} bytes, "
                    f"the file has {size - 8} after the length field"
                )
            raw = f.read(n)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint file {path}: {err.strerror or err}") from err
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + n, size - 8 - n
    tensors, needed = {}, 0
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path} is corrupt: bad header entry for tensor {name!r}") from err
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(
                f"{path} is corrupt: tensor {name!r} {list(shape)} {info['dtype']} needs {nbytes} bytes "
                f"but its offsets span {end - begin}"
            )
        needed = max(needed, end)
        tensors[name] = TensorInfo(dtype, shape, data_start + begin, nbytes)
    if needed > data_len:
        raise CheckpointError(
            f"{path} is truncated: its header describes {needed} bytes of tensor data but only {data_len} "
            "are present (an interrupted download? delete the file and fetch it again)"
        )
    return SafetensorsHeader(path, tensors, metadata)


class _MappedFile:
    """A private (copy-on-write) memory map of one safetensors file."""

    def __init__(self, header: SafetensorsHeader) -> None:
        self.header = header
        with open(header.path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        base = torch.frombuffer(self.map, dtype=torch.uint8, count=1).data_ptr()
        _MAPPINGS[:] = [m for m in _MAPPINGS if m[2]() is not None]
        _MAPPINGS.append((base, len(self.map), weakref.ref(self.map)))  # lives as long as a tensor uses it

    def tensor(self, name: str) -> torch.Tensor:
        info = self.header.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if info.begin % info.dtype.itemsize:  # unaligned: copy out rather than hand kernels a bad pointer
            raw = bytearray(self.map[info.begin : info.begin + info.nbytes])
            return torch.frombuffer(raw, dtype=info.dtype).view(info.shape)
        flat = torch.frombuffer(self.map, dtype=info.dtype, count=info.nbytes // info.dtype.itemsize, offset=info.begin)
        return flat.view(info.shape)

    def release(self, name: str) -> None:
        """Drop the mapped pages of a tensor that was copied elsewhere (keeps peak RSS at one copy)."""
        info = self.header.tensors[name]
        page = mmap.PAGESIZE
        start = (info.begin + page - 1) // page * page
        end = (info.begin + info.nbytes) // page * page
        if end > start and hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED, start, end - start)


_MAPPINGS: list[tuple[int, int, weakref.ref]] = []  # (base address, length, the mmap) of live mappings


def _mapping_of(tensor: torch.Tensor) -> tuple[int, mmap.mmap] | None:
    ptr = tensor.data_ptr()
    for base, length, ref in _MAPPINGS:
        mm = ref()
        if mm is not None and base <= ptr < base + length:
            return base, mm
    return None


def is_mapped(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a zero-copy view of a memory-mapped checkpoint (see `map_tensors`)."""
    return tensor.device.type == "cpu" and _mapping_of(tensor) is not None


def release_pages(tensor: torch.Tensor) -> bool:
    """If `tensor` lives in a memory-mapped checkpoint, drop its pages from this process's RSS (they
    are re-read from the page cache or disk if touched again). True if it was mapped."""
    found = _mapping_of(tensor) if tensor.device.type == "cpu" else None
    if found is None:
        return False
    base, mm = found
    ptr, n, page = tensor.data_ptr(), tensor.numel() * tensor.element_size(), mmap.PAGESIZE
    start = (ptr - base + page - 1) // page * page
    end = (ptr - base + n) // page * page
    if end > start and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
    return True


def map_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `directory` as a zero-copy view of a private mapping.

    Nothing is read until a tensor is used; the mappings live as long as the tensors do. Used for the
    8B text encoder, which runs once per new prompt: its weights never become a second host copy.
    """
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors files in {directory}")
    out = {}
    for path in files:
        mapped = _MappedFile(read_header(path))
        for name in mapped.header.tensors:
            out[name] = mapped.tensor(name)
    return out


# -------------------------------------------------------------------------------- locating files
@dataclass(frozen=True)
class Checkpoint:
    """Where a transformer's weights are and which config they come with."""

    config: TransformerConfig
    files: tuple[SafetensorsHeader, ...]
    source: str

    def tensor_infos(self) -> dict[str, tuple[SafetensorsHeader, TensorInfo]]:
        out: dict[str, tuple[SafetensorsHeader, TensorInfo]] = {}
        for header in self.files:
            for name, info in header.tensors.items():
                if name in out:
                    raise CheckpointError(
                        f"tensor {name!r} appears in both {out[name][0].path.name} and {header.path.name}"
                    )
                out[name] = (header, info)
        return out

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for h in self.files for i in h.tensors.values())


def _looks_like_repo_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not source.startswith((".", "/", "~"))


def resolve(source: str | os.PathLike, *, revision: str | None = None) -> Path:
    """Local path of a checkpoint: an existing path, or a hub repo id fetched into the HF cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if not _looks_like_repo_id(text):
        raise CheckpointError(f"checkpoint {text!r} not found: no such file or directory")
    return download(text, revision=revision)


def download(repo_id: str, *, revision: str | None = None, subfolder: str | None = None) -> Path:
    """Fetch a transformer repo (config + safetensors only) into the standard HF cache, with progress."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    pattern = f"{subfolder}/" if subfolder else ""
    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=[f"{pattern}*.json", f"{pattern}*.safetensors"],
        )
    except LocalEntryNotFoundError as err:
        raise CheckpointError(
            f"{repo_id} is not in the local Hugging Face cache and cannot be downloaded now "
            f"(offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). Download it on a "
            f"connected machine with `framepack download` or `huggingface-cli download {repo_id}`, "
            "or point to a local copy."
        ) from err
    except HfHubHTTPError as err:
        raise CheckpointError(f"could not download {repo_id}: {err}") from err
    return Path(local) / subfolder if subfolder else Path(local)


def open_checkpoint(source: str | os.PathLike, *, revision: str | None = None) -> Checkpoint:
    """Find the config and safetensors files of a transformer checkpoint and validate their headers."""
    path = resolve(source, revision=revision)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path} is not a .safetensors file (accepted: a directory, a .safetensors file)")
        header = read_header(path)
        config = _config_from_single_file(header)
        return Checkpoint(config, (header,), str(path))

    cfg_path = path / CONFIG_NAME
    if not cfg_path.exists():
        raise CheckpointError(f"{path} has no {CONFIG_NAME}; expected a diffusers-format transformer directory")
    try:
        config_dict = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {err}") from err
    try:
        config = TransformerConfig.from_json_dict(config_dict, source=str(cfg_path))
    except (TypeError, ValueError) as err:
        raise CheckpointError(str(err)) from err

    index_path = path / INDEX_NAME
    if index_path.exists():
        files = _files_from_index(path, index_path)
    elif (path / WEIGHTS_NAME).exists():
        files = (read_header(path / WEIGHTS_NAME),)
    else:
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if len(found) != 1:
            raise CheckpointError(
                f"{path} has no {WEIGHTS_NAME} or {INDEX_NAME}"
                + (f" and several safetensors files ({', '.join(found)}) with no index" if found else "")
            )
        files = (read_header(path / found[0]),)
    return Checkpoint(config, files, str(path))


def _files_from_index(root: Path, index_path: Path) -> tuple[SafetensorsHeader, ...]:
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path} is not a valid index (needs a 'weight_map' object): {err}") from err
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (root / s).exists()]
    if missing:
        raise CheckpointError(f"{index_path.name} lists shard(s) that do not exist in {root}: {', '.join(missing)}")
    headers = tuple(read_header(root / s) for s in shards)
    by_name = {h.path.name: h for h in headers}
    absent = [f"{k} (in {s})" for k, s in weight_map.items() if k not in by_name[s].tensors]
    if absent:
        raise CheckpointError(f"{index_path.name} lists tensors their shard does not contain: {_some(absent)}")
    return headers


def _config_from_single_file(header: SafetensorsHeader) -> TransformerConfig:
    if CONFIG_METADATA_KEY in header.metadata:
        return TransformerConfig.from_json_dict(json.loads(header.metadata[CONFIG_METADATA_KEY]), str(header.path))
    return infer_config({k: v.shape for k, v in header.tensors.items()}, str(header.path))


def infer_config(shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> TransformerConfig:
    """Recover the config of a single-file checkpoint from its tensor shapes (RoPE axes: official split)."""
    try:
        inner, c_in = shapes["x_embedder.proj.weight"][:2]
        head_dim = shapes["single_transformer_blocks.0.attn.norm_q.weight"][0]
        mlp = shapes["single_transformer_blocks.0.proj_mlp.weight"][0]
        text_dim = shapes["context_embedder.proj_in.weight"][1]
        pooled = shapes["time_text_embed.text_embedder.linear_1.weight"][1]
        image_dim = shapes["image_projection.up.weight"][1]
        out_ch = shapes["proj_out.weight"][0] // (shapes["x_embedder.proj.weight"][3] ** 2)
    except KeyError as err:
        raise CheckpointError(f"{source} does not look like a FramePack transformer: no tensor {err}") from err

    def count(prefix: str) -> int:
        return len({k.split(".")[len(prefix.split("."))] for k in shapes if k.startswith(prefix + ".")})

    if head_dim != 128:
        raise CheckpointError(
            f"{source}: cannot infer rope_axes_dim for head dim {head_dim} (only the official 128 = 16+56+56); "
            "use a directory with config.json instead"
        )
    return TransformerConfig(
        in_channels=c_in, out_channels=out_ch, num_attention_heads=inner // head_dim, attention_head_dim=head_dim,
        num_layers=count("transformer_blocks"), num_single_layers=count("single_transformer_blocks"),
        num_refiner_layers=count("context_embedder.token_refiner.refiner_blocks"), mlp_ratio=mlp / inner,
        patch_size=shapes["x_embedder.proj.weight"][3], text_embed_dim=text_dim, pooled_projection_dim=pooled,
        image_proj_dim=image_dim, guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in shapes,
    )  # fmt: skip


# ------------------------------------------------------------------------------------- checking
def _some(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def check_keys(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{k}: checkpoint {list(found[k])}, model expects {list(expected[k])}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"checkpoint {source} does not match the FramePack transformer its config describes:"]
    if missing:
        lines.append(f"  missing {len(missing)} key(s): {_some(missing)}")
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)} key(s): {_some(unexpected)}")
    if mismatched:
        lines.append(f"  {len(mismatched)} shape mismatch(es): {_some(mismatched, 6)}")
    raise CheckpointError("\n".join(lines))


# -------------------------------------------------------------------------------------- loading
def build_empty(config: TransformerConfig, attention: AttentionBackend | None = None) -> FramePackTransformer:
    """The model with parameters on the meta device: no memory, shapes only."""
    with torch.device("meta"):
        return FramePackTransformer(config, attention)


def load_transformer(
    source: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    attention: str | AttentionBackend = "auto",
    revision: str | None = None,
) -> FramePackTransformer:
    """Load a FramePack transformer (see module docstring for accepted sources).

    dtype: bf16 / fp16 / fp32 (None keeps the stored dtype). device: where the parameters live.
    attention: backend name ("auto", "sdpa", "flash", "sage", "xformers") or a chosen backend.
    """
    if dtype is not None and not (dtype.is_floating_point and dtype.itemsize >= 2):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
    backend = attention if isinstance(attention, AttentionBackend) else select_backend(attention)
    ckpt = open_checkpoint(source, revision=revision)
    model = build_empty(ckpt.config, backend)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    infos = ckpt.tensor_infos()
    check_keys(expected, {k: i.shape for k, (_, i) in infos.items()}, ckpt.source)
    not_float = [k for k, (_, i) in infos.items() if not i.dtype.is_floating_point]
    if not_float:
        raise CheckpointError(f"{ckpt.source}: non-floating-point weights {_some(not_float)}")
    state = dict(_read_tensors(ckpt.files, dtype, torch.device(device)))
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False).eval()
    return model


def _read_tensors(
    files: Iterable[SafetensorsHeader], dtype: torch.dtype | None, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    for header in files:
        mapped = _MappedFile(header)
        for name, info in header.tensors.items():
            out = mapped.tensor(name).to(device=device, dtype=dtype or info.dtype, copy=True)
            mapped.release(name)
            yield name, out


class CheckpointTensors:
    """Single tensors of a checkpoint, read again exactly as `load_transformer` made them (same dtype
    conversion), one at a time from a lazy memory map: `get` returns a read-only view of the mapping
    when no conversion is needed, `release` drops its pages after use. LoRA switching restores the
    weights it touched from here instead of keeping a second copy in RAM."""

    def __init__(self, source: str | os.PathLike, dtype: torch.dtype | None) -> None:
        ckpt = open_checkpoint(source)
        self.source, self.dtype = ckpt.source, dtype
        self.infos = ckpt.tensor_infos()
        self._stamps = {h.path: _stamp(h.path) for h in ckpt.files}
        self._maps: dict[Path, _MappedFile] = {}

    def get(self, name: str) -> torch.Tensor:
        header, info = self.infos[name]
        if _stamp(header.path) != self._stamps[header.path]:
            raise CheckpointError(f"{header.path} changed on disk after the model was loaded; the original "
                                  "weights cannot be restored from it (restart to load the new file)")  # fmt: skip
        mapped = self._maps.get(header.path)
        if mapped is None:
            mapped = self._maps[header.path] = _MappedFile(header)
        return mapped.tensor(name).to(dtype=self.dtype or info.dtype)  # stored in that dtype: a view of the map

    def release(self, name: str) -> None:
        """Drop the mapped pages of a tensor `get` returned (read-only use is over)."""
        header, _ = self.infos[name]
        if header.path in self._maps:
            self._maps[header.path].release(name)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


# --------------------------------------------------------------------------------------- saving
def save_transformer(
    model: FramePackTransformer,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` as a diffusers-format directory (sharded above `max_shard_bytes`) or, for a path
    ending in .safetensors, as one file carrying its config in the metadata."""
    path = Path(path)
    tensors = {
        k: (v if dtype is None else v.to(dtype)).detach().cpu().contiguous() for k, v in model.state_dict().items()
    }
    config_json = json.dumps(model.config.to_json_dict(), indent=2)
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, path, {CONFIG_METADATA_KEY: config_json})
        return path
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    (path / CONFIG_NAME).write_text(config_json + "\n")
    if len(shards) == 1:
        save_safetensors(shards[0], path / WEIGHTS_NAME)
        return path
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, path / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return path


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (a .partial sibling, then renamed): never a half-written file."""
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]
