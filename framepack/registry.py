"""Named models: where each component's weights come from and which section schedule the model uses.

    original   lllyasviel/FramePackI2V_HY (inverted anti-drifting schedule)
    f1         lllyasviel/FramePack_F1_I2V_HY_20250503 (forward schedule)
    tiny       the built-in tiny random family (inverted), generated locally, for tests and smoke runs
    tiny-f1    the same weights with the forward schedule
    toy        the toy family, trained in this project (`TRAINING_COMMANDS`) and shipped in framepack/toy
    toy-f1     the same weights with the forward schedule

Variants are `dataclasses.replace` of one another. Weights are found, in order: under a models
directory (`--models-dir` / FRAMEPACK_MODELS_DIR, laid out as DIR/<org>/<name>), in the standard
Hugging Face cache (HF_HOME, HF_HUB_OFFLINE and tokens respected), or downloaded with progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from framepack.weights import CheckpointError

HUNYUAN = "hunyuanvideo-community/HunyuanVideo"
REDUX = "lllyasviel/flux_redux_bfl"
MODELS_DIR_ENV = "FRAMEPACK_MODELS_DIR"


@dataclass(frozen=True)
class Source:
    repo: str
    subfolder: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        return self.repo + (f"/{self.subfolder}" if self.subfolder else "")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    schedule: str  # "inverted" | "forward" (framepack.sections)
    transformer: Source
    text_encoder: Source = Source(HUNYUAN, "text_encoder")  # LLaMA (LLaVA-LLaMA-3-8B text tower)
    tokenizer: Source = Source(HUNYUAN, "tokenizer")
    text_encoder_2: Source = Source(HUNYUAN, "text_encoder_2")  # CLIP ViT-L/14 text
    tokenizer_2: Source = Source(HUNYUAN, "tokenizer_2")
    vae: Source = Source(HUNYUAN, "vae")
    feature_extractor: Source = Source(REDUX, "feature_extractor")  # SigLIP preprocessing
    image_encoder: Source = Source(REDUX, "image_encoder")  # SigLIP so400m
    default_resolution: int = 640  # bucket base
    prompt_crop: int | None = 95  # template tokens before the prompt; None: count them with the tokenizer
    builtin: bool = False  # generated locally (framepack.tiny), never downloaded
    download_size: str = "about 30 GB"
    extras: dict = field(default_factory=dict)

    @property
    def sources(self) -> dict[str, Source]:
        names = ("transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae",
                 "feature_extractor", "image_encoder")  # fmt: skip
        return {n: getattr(self, n) for n in names}


ORIGINAL = ModelSpec("original", "inverted", Source("lllyasviel/FramePackI2V_HY"))
F1 = replace(ORIGINAL, name="f1", schedule="forward", transformer=Source("lllyasviel/FramePack_F1_I2V_HY_20250503"))
TINY_MODEL = ModelSpec(
    "tiny",
    "inverted",
    transformer=Source("framepack-tiny/transformer"),
    text_encoder=Source("framepack-tiny/encoders", "text_encoder"),
    tokenizer=Source("framepack-tiny/encoders", "tokenizer"),
    text_encoder_2=Source("framepack-tiny/encoders", "text_encoder_2"),
    tokenizer_2=Source("framepack-tiny/encoders", "tokenizer_2"),
    vae=Source("framepack-tiny/encoders", "vae"),
    feature_extractor=Source("framepack-tiny/image", "feature_extractor"),
    image_encoder=Source("framepack-tiny/image", "image_encoder"),
    default_resolution=64,
    prompt_crop=None,
    builtin=True,
    download_size="none (generated locally in about a second)",
)
TINY_F1 = replace(TINY_MODEL, name="tiny-f1", schedule="forward")
# The toy family, trained from scratch on the procedural toy world (framepack.train): its weights ship
# in the package folder framepack/toy (FRAMEPACK_TOY_DIR points elsewhere); both share one transformer.
TOY_DIR_ENV = "FRAMEPACK_TOY_DIR"
TOY_MODEL = replace(
    TINY_MODEL,
    name="toy",
    transformer=Source("transformer"),
    text_encoder=Source("encoders", "text_encoder"),
    tokenizer=Source("encoders", "tokenizer"),
    text_encoder_2=Source("encoders", "text_encoder_2"),
    tokenizer_2=Source("encoders", "tokenizer_2"),
    vae=Source("encoders", "vae"),
    feature_extractor=Source("image", "feature_extractor"),
    image_encoder=Source("image", "image_encoder"),
    download_size="none (ships with the package)",
    extras={"package_dir": "toy"},
)
TOY_F1 = replace(TOY_MODEL, name="toy-f1", schedule="forward")

# The commands that train and package the shipped toy model (`toy` / `toy-f1`), in order, with their
# seeds. The README's "Training and the toy model" lists them with measured times. The second `data`
# command extends the first dataset (clips 400..899; existing clips are kept), and the second run
# continues from the first run's exported (EMA) weights with a fresh warmup + cosine schedule. Then the
# VAE run continues (its own checkpoint, to 2000 steps), which rewrites the family's VAE: the data is
# encoded again into a new folder and a third run continues from the second run's weights on it; a
# fourth continues from the third on the same data, and a fifth from the fourth with 75% of its samples
# on the inverted (original) schedule; the sixth grows the fifth's weights by 4 single- and 1
# double-stream blocks (closed gates: same output at first) and trains the deeper model the same way,
# and the seventh grows the sixth's by 4 more single-stream blocks and trains it again.
TRAINING_COMMANDS = (
    "framepack train family --out runs/toy/family",
    "framepack train vae --family runs/toy/family --out runs/toy/vae --steps 500 --seed 0",
    "framepack train data --family runs/toy/family --out runs/toy/data --clips 400 --sections 1-6 --seed 0",
    "framepack train transformer --data runs/toy/data --out runs/toy/transformer --steps 5000 --seed 0",
    "framepack train data --family runs/toy/family --out runs/toy/data --clips 900 --sections 1-6 --seed 0",
    "framepack train transformer --data runs/toy/data --out runs/toy/transformer2"
    " --init runs/toy/transformer/transformer --steps 12000 --lr 3e-4 --warmup 200 --seed 1",
    "framepack train vae --family runs/toy/family --out runs/toy/vae --steps 2000 --seed 0 --resume",
    "framepack train data --family runs/toy/family --out runs/toy/data2 --clips 900 --sections 1-6 --seed 0",
    "framepack train transformer --data runs/toy/data2 --out runs/toy/transformer3"
    " --init runs/toy/transformer2/transformer --steps 9000 --lr 3e-4 --warmup 200 --seed 2",
    "framepack train transformer --data runs/toy/data2 --out runs/toy/transformer4"
    " --init runs/toy/transformer3/transformer --steps 12000 --lr 3e-4 --warmup 200 --seed 3",
    "framepack train transformer --data runs/toy/data2 --out runs/toy/transformer5"
    " --init runs/toy/transformer4/transformer --steps 14000 --lr 3e-4 --warmup 200 --seed 4 --schedule-weights 3,1",
    "framepack train transformer --data runs/toy/data2 --out runs/toy/transformer6"
    " --init runs/toy/transformer5/transformer --add-single-layers 4 --add-double-layers 1"
    " --steps 10000 --lr 3e-4 --warmup 200 --seed 5 --schedule-weights 3,1",
    "framepack train transformer --data runs/toy/data2 --out runs/toy/transformer7"
    " --init runs/toy/transformer6/transformer --add-single-layers 4"
    " --steps 8000 --lr 3e-4 --warmup 200 --seed 6 --schedule-weights 3,1",
    "framepack train package --family runs/toy/family --transformer runs/toy/transformer7/transformer",
)

REGISTRY: dict[str, ModelSpec] = {m.name: m for m in (ORIGINAL, F1, TINY_MODEL, TINY_F1, TOY_MODEL, TOY_F1)}


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(REGISTRY)}") from None


def models_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    value = explicit or os.environ.get(MODELS_DIR_ENV)
    return Path(value).expanduser() if value else None


def _local_copy(src: Source, root: Path | None) -> Path | None:
    if root is None:
        return None
    base = root / src.repo
    path = base / src.subfolder if src.subfolder else base
    return path if path.exists() else None


def _from_hf(sources: list[Source], download: bool) -> Path:
    """Cached (or freshly downloaded) snapshot of one repo holding `sources` (same repo, same revision)."""
    from huggingface_hub import snapshot_download

    repo, revision = sources[0].repo, sources[0].revision
    patterns = sorted({f"{s.subfolder}/*" if s.subfolder else "*.json" for s in sources})
    if any(s.subfolder is None for s in sources):
        patterns.append("*.safetensors")
    return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=not download))


def _packaged_root(spec: ModelSpec) -> Path:
    """The folder of a model trained in this project (framepack/<package_dir>, or $FRAMEPACK_TOY_DIR)."""
    root = Path(os.environ.get(TOY_DIR_ENV) or Path(__file__).resolve().parent / spec.extras["package_dir"])
    if not (root / "manifest.json").exists() or not (root / "transformer").is_dir():
        raise CheckpointError(
            f"model {spec.name!r} is trained in this project and its weights are not in {root} yet. Train and "
            f"package it with (see the README, 'Training and the toy model'):\n"
            + "\n".join(f"  {c}" for c in TRAINING_COMMANDS)
            + f"\nor set {TOY_DIR_ENV} to a packaged folder."
        )
    return root


def packaged_dir(name: str = "toy") -> Path:
    """The folder holding a model trained in this project (`toy`, `toy-f1`: one folder), with a clear
    CheckpointError naming the training commands if it has not been packaged."""
    spec = get_spec(name)
    if not spec.extras.get("package_dir"):
        raise ValueError(
            f"model {name!r} is not trained in this project; packaged models: "
            + ", ".join(n for n, s in REGISTRY.items() if s.extras.get("package_dir"))
        )
    return _packaged_root(spec)


def resolve_spec(
    spec: ModelSpec, *, models_root: str | os.PathLike | None = None, download: bool = True
) -> dict[str, Path]:
    """Local path of every component of `spec`, or one CheckpointError naming all that are missing."""
    if spec.builtin:
        from framepack.tiny import ensure_tiny

        root = _packaged_root(spec) if spec.extras.get("package_dir") else ensure_tiny()
        return {n: root / s.repo / (s.subfolder or "") for n, s in spec.sources.items()}

    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    local_root = models_dir(models_root)
    paths: dict[str, Path] = {}
    by_repo: dict[tuple[str, str | None], list[tuple[str, Source]]] = {}
    for name, src in spec.sources.items():
        local = _local_copy(src, local_root)
        if local is not None:
            paths[name] = local
        else:
            by_repo.setdefault((src.repo, src.revision), []).append((name, src))
    missing, errors = [], []
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    for (repo, _), items in by_repo.items():
        try:
            snap = _from_hf([s for _, s in items], download=download and not offline)
        except LocalEntryNotFoundError:
            missing.append(f"{repo} ({', '.join(s.subfolder or 'weights' for _, s in items)})")
            continue
        except (HfHubHTTPError, OSError) as err:
            errors.append(f"{repo}: {err}")
            continue
        for name, src in items:
            paths[name] = snap / src.subfolder if src.subfolder else snap
    if missing or errors:
        where = f" or under {local_root}" if local_root else ""
        lines = [f"model {spec.name!r} needs weights that are not in the local Hugging Face cache{where}:"]
        lines += [f"  - {m}" for m in missing] + [f"  - {e}" for e in errors]
        lines.append(
            f"Get them ({spec.download_size}) with `framepack download {spec.name}` on a machine with internet "
            f"access (HF_HUB_OFFLINE={'1' if offline else 'unset'} here), or copy each repo to DIR/<org>/<name> "
            f"and pass --models-dir DIR (or set {MODELS_DIR_ENV})."
        )
        raise CheckpointError("\n".join(lines))
    return paths


def transformer_config(spec: ModelSpec):
    """The transformer config of a model without loading (or downloading) its weights: the built-in
    families' from their config.json, the official models' is `config.FRAMEPACK_HY` (both share it)."""
    from framepack.config import FRAMEPACK_HY
    from framepack.weights import open_checkpoint

    if spec.builtin:
        return open_checkpoint(resolve_spec(spec)["transformer"]).config
    return FRAMEPACK_HY
