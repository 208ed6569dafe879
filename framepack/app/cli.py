"""`framepack` command line: generate, download, selftest. A thin adapter over the engine."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from framepack.app.cli_parallel import add_gpus_arg, check_ranks, ranks_asked, ranks_for, run_follower_if_torchrun
from framepack.config import CONTROLS, LORAS


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that describe a user's mistake: printed as one line, never as a traceback."""
    from framepack.config import RequestError
    from framepack.images import ImageError
    from framepack.memory import MemoryBudgetError
    from framepack.models.attention import AttentionBackendError
    from framepack.parallel import ParallelError
    from framepack.weights import CheckpointError

    return (RequestError, ImageError, CheckpointError, AttentionBackendError, MemoryBudgetError, ParallelError)


def _add_generate(sub) -> None:

    from framepack.config import REQUEST_FIELDS, GenerationRequest
    from framepack.registry import REGISTRY

    p = sub.add_parser("generate", help="image-to-video generation", description="Generate a video from an image.")
    groups = add_request_flags(p, GenerationRequest, REQUEST_FIELDS)
    p.add_argument("--model", default=None, choices=sorted(REGISTRY), help="default: original (tiny with --from none)")
    p.add_argument("--from", dest="from_json", help="re-run the request stored in a result .json (flags override)")
    c = groups[CONTROLS]
    c.add_argument("--prompts-file", help="timestamped prompts, one '[TIME: prompt]' or 'TIME: prompt' per line")
    c.add_argument("--keyframe", action="append", metavar="TIME=IMAGE", help=REQUEST_FIELDS["keyframes"].help)
    add_run_args(p, groups[LORAS])
    add_gpus_arg(p)
    add_checkpoint_args(p)
    p.set_defaults(func=_generate)


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """The section checkpoints kept beside the video, for `framepack branch` (generate, branch)."""
    p.add_argument("--checkpoints", default="all", metavar="all|N|none",
                   help="section checkpoints kept beside the video (hidden folder .NAME.sections) so `framepack "
                   "branch` can re-roll or continue from any finished section: all (default), the last N, or none; "
                   "each holds one section's latents, ~3.5 MiB at the 640 bucket: more than the MP4 grows)")
    p.add_argument("--no-checkpoints", dest="checkpoints", action="store_const", const="none",
                   help="the same as --checkpoints none")  # fmt: skip


def add_request_flags(p: argparse.ArgumentParser, cls, *tables: dict) -> dict:
    """One flag per field of request class `cls` in the field tables (help, ranges, choices from them);
    returns the argument groups by name."""
    import typing

    groups: dict = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for table in tables:
        for name, info in table.items():
            if info.group and info.group not in groups:
                groups[info.group] = p.add_argument_group(info.group)
            if info.cli:
                _add_request_flag(groups.get(info.group, p), name, info, fields[name].default, hints[name])
    return groups


def add_run_args(p: argparse.ArgumentParser, loras) -> None:
    """LoRA files, device, memory and progress flags shared by `generate` and `edit`."""
    from framepack.config import REQUEST_FIELDS

    loras.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]", help=REQUEST_FIELDS["loras"].help)
    loras.add_argument("--lora-dir", help="folder of LoRA files: bare names and recorded hashes are looked up here "
                       "(default <FRAMEPACK_HOME>/loras)")  # fmt: skip
    _add_device_args(p)
    p.add_argument(
        "--preserved-memory",
        type=float,
        metavar="GB",
        help="device memory to leave free (official default 6; default: automatic)",
    )
    _add_speed_args(p)
    p.add_argument("--keep-text-encoders", action="store_true", help="keep LLaMA/CLIP loaded after encoding")
    p.add_argument("--memory", choices=["auto", "managed", "off"], default="auto",
                   help="device memory management (auto: on accelerators)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_device_args(p: argparse.ArgumentParser) -> None:
    """Where models run and where their weights come from (generate, serve/ui, calibrate-cache)."""
    p.add_argument("--device", help="cuda, cpu or mps (default: cuda when available)")
    p.add_argument("--models-dir", help="local copies of the weight repos, laid out as DIR/<org>/<name>")
    p.add_argument("--offline", action="store_true", help="never download; use cached or local weights only")


def _add_speed_args(p: argparse.ArgumentParser) -> None:
    """fp8 and compile: how the transformer computes (generate, edit, serve/ui)."""
    from framepack.config import FP8_MODES

    p.add_argument("--fp8", nargs="?", const="storage", choices=FP8_MODES, default=None,
                   help="transformer block weights in fp8 (half the memory; lossy): storage = dequantised to bf16 "
                   "for each matmul (any GPU; the default of a bare --fp8), compute = fp8 matmuls (Hopper and "
                   "later; elsewhere an exact emulation of their rounding, slower)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer's block classes (each "
                   "class compiled once, shared by its blocks; the first section pays the compile time)")  # fmt: skip


def _add_request_flag(p, name: str, info, default, kind) -> None:
    """`--field-name` (or the field's own flag) for a GenerationRequest field of type `kind`; unset flags
    stay None, so `--from` and the request's defaults fill them."""
    import typing

    kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # X | None -> X
    if isinstance(default, bool):
        shown = "on" if default else "off"
    else:
        shown = f"{default:g}" if isinstance(default, float) else default if default not in (None, "") else None
    help_text = info.help + (f" (default {shown})" if shown is not None else "")
    flag = info.flag or "--" + name.replace("_", "-")
    if kind is bool and flag.startswith("--no-"):  # a negative switch: --no-2x, and --with-2x to undo a preset's
        p.add_argument(flag, dest=name, action="store_const", const=True, default=None, help=help_text)
        p.add_argument("--with-" + flag[len("--no-"):], dest=name, action="store_const", const=False,
                       help=f"the opposite of {flag}")  # fmt: skip
    elif kind is bool:
        p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        p.add_argument(flag, dest=name, type=kind, choices=info.choices, default=None, help=help_text)


def stored_settings(args: argparse.Namespace, kind: str) -> tuple[dict, str | None]:
    """The request dict (without `overwrite`: replacing files is asked each time) and model name of
    `--from`, which must be a result of this `kind` of job; ({}, None) without --from."""
    from framepack.config import RequestError
    from framepack.oneframe import read_settings

    if not args.from_json:
        return {}, None
    stored, model = read_settings(args.from_json)
    if stored.get("kind", "video") != kind:
        command, what = ("edit", "a frame edit") if kind == "video" else ("generate", "a video")
        raise RequestError(f"{args.from_json} holds the settings of {what}: re-run it with "
                           f"`framepack {command} --from {args.from_json}`")  # fmt: skip
    return {k: v for k, v in stored.items() if k not in ("overwrite", "kind")}, model


def lora_overrides(args: argparse.Namespace) -> dict:
    from framepack.lora import parse_lora_arg

    return {"loras": tuple(parse_lora_arg(text) for text in args.lora)} if args.lora else {}


def _build_request(args: argparse.Namespace):
    from framepack.config import GenerationRequest

    base, model = stored_settings(args, "video")
    fields = {f.name for f in dataclasses.fields(GenerationRequest)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.prompts_file:
        overrides["prompt"] = _read_prompts_file(args.prompts_file)
    if args.keyframe:
        overrides["keyframes"] = tuple(_parse_keyframe(k) for k in args.keyframe)
    overrides.update(lora_overrides(args))
    request = GenerationRequest.from_json_dict({**base, **overrides})
    return request.validate(), args.model or model or "original"


def _read_prompts_file(path: str) -> str:
    """Lines 'TIME: prompt' or '[TIME: prompt]' -> the bracketed timestamped-prompt form."""
    from framepack.config import RequestError

    try:
        lines = [line.strip() for line in open(path, encoding="utf-8") if line.strip() and not line.startswith("#")]
    except OSError as err:
        raise RequestError(f"cannot read prompts file {path}: {err.strerror or err}") from None
    def block(line: str) -> str:  # 'TIME: prompt' -> '[TIME: prompt]', brackets in the prompt escaped
        return line if line.startswith("[") else "[" + line.replace("[", "\\[").replace("]", "\\]") + "]"

    return " ".join(block(line) for line in lines)


def _parse_keyframe(text: str) -> tuple[float, str]:
    from framepack.config import RequestError

    when, sep, path = text.partition("=")
    try:
        seconds = float(when.strip().rstrip("s"))
    except ValueError:
        seconds = None
    if not sep or seconds is None or not path:
        raise RequestError(f"--keyframe takes TIME=IMAGE, such as 2.5=pose.png; got {text!r}")
    return seconds, path


class _Progress:
    """tqdm bar over all steps of all sections: 'section i/N', step, ETA."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar, self.t0 = quiet, None, time.perf_counter()

    def __call__(self, event) -> None:
        from tqdm import tqdm

        from framepack.events import JobPlanned, LorasApplied, SectionDone, StageStarted, StepProgress

        if isinstance(event, JobPlanned):  # times are snapped to section boundaries: say where they landed
            print(f"{event.sections} sections, {event.frames} frames", file=sys.stderr)
            if len(event.prompt_times) > 1:
                for t, prompt in event.prompt_times:
                    print(f"  prompt from {t:.2f}s: {prompt}", file=sys.stderr)
            for what, t in event.anchors:
                print(f"  {what} at {t:.2f}s", file=sys.stderr)
        if isinstance(event, LorasApplied):  # what each file matched, and what it held that was not applied
            for line in event.lines:
                print(line, file=sys.stderr)
        if self.quiet:
            return
        if isinstance(event, StepProgress):
            if self.bar is None:
                self.bar = tqdm(total=event.sections * event.steps, unit="step", dynamic_ncols=True)
            self.bar.set_description_str(f"section {event.section + 1}/{event.sections}", refresh=False)
            self.bar.set_postfix_str(f"step {event.step}/{event.steps}", refresh=False)
            self.bar.update(event.section * event.steps + event.step - self.bar.n)  # redraws once
        elif isinstance(event, SectionDone):
            msg = f"section {event.section + 1}/{event.sections} done: {event.frames} frames ({event.seconds:.2f} s)"
            (self.bar.write if self.bar else print)(f"{msg} -> {event.video}")
        elif isinstance(event, StageStarted) and event.section is None:
            print(f"{event.stage} ...", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _generate(args: argparse.Namespace) -> int:
    from framepack.checkpoints import KeepPolicy
    from framepack.outputs import check_output, disk_needed
    from framepack.pipeline import check_request
    from framepack.registry import get_spec

    request, model = _build_request(args)
    world = ranks_asked(args)
    if world > 1 and run_follower_if_torchrun(args, model, runtime_options(args)):
        return 0  # a torchrun rank above 0: it followed rank 0 to the end (rank 0 checks and writes the video)
    if world > 1:
        check_ranks(args, world)  # before anything loads: the devices are there
    plan = check_request(request, get_spec(model))  # fail fast on bad inputs or output, before loading weights
    if request.loras:  # every file there and a safetensors file, before the weights load
        from framepack.lora import LoraLibrary

        LoraLibrary(args.lora_dir).check(request.loras)
    check_output(request)
    keep = KeepPolicy.parse(args.checkpoints)
    needed = disk_needed(plan.frames, *plan.inputs.size, request.window)
    pipe = load_for(args, model)

    def start(on_event, cancel):
        return pipe.generate(request, on_event=on_event, cancel=cancel, checkpoints=keep)

    if world == 1:
        return run_video(args, needed, start)
    with ranks_for(args, pipe, model, world):
        return run_video(args, needed, start)


def run_video(args: argparse.Namespace, needed: int, start) -> int:
    """Run `start(on_event, cancel)` (a video job) with the progress bar and Ctrl-C handling; print
    the outcome. The exit code: 0 finished, 1 stopped early or failed, 130 interrupted."""
    from framepack.events import CancelToken
    from framepack.outputs import disk_full_message, is_disk_full
    from framepack.pipeline import GenerationFailed, GenerationInterrupted

    cancel = CancelToken()
    progress = _Progress(args.quiet)
    try:
        with cancel_on_ctrl_c(cancel, "the video of the finished sections"):
            result = start(progress, cancel)
    except GenerationInterrupted as stop:
        progress.close()
        r = stop.result
        kept = f"{r.video} holds the {r.frames} frames finished" if r.video else "no section had finished"
        print(f"interrupted: {kept}; settings in {r.metadata}", file=sys.stderr)
        return 130
    except GenerationFailed as err:
        progress.close()
        r = err.result
        why = disk_full_message(Path(r.metadata).parent, needed) if is_disk_full(err) else str(err.__cause__ or err)
        kept = f"{r.video} holds the {r.frames} frames finished" if r.video else "no section had finished"
        print(f"error: generation failed: {why}\n{kept}; settings in {r.metadata}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    took = result.timings.get("total_s", 0.0)
    if result.video is None:
        print(f"{result.status}: no section finished; details in {result.metadata}")
        return 1
    mem = f"peak host RAM {result.peak_rss_bytes / 2**30:.2f} GiB" if result.peak_rss_bytes else ""
    if result.peak_vram_bytes is not None:
        mem += f", peak VRAM {result.peak_vram_bytes / 2**30:.2f} GiB"
    cache_line = _cache_summary(result.metadata)
    if cache_line:
        print(cache_line, file=sys.stderr)
    print(
        f"{result.status}: {result.video} — {result.frames} frames ({result.seconds:.2f} s at 30 fps), "
        f"{result.width}x{result.height}, {result.sections_done}/{result.sections} sections in {took:.1f} s; "
        f"{mem}; settings in {result.metadata}"
    )
    return 0 if result.status == "finished" else 1


def load_for(args: argparse.Namespace, model: str):
    """The pipeline of `model` with the run flags (device, memory, fp8, LoRA folder, offline)."""
    from framepack.pipeline import PipelineLoader

    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    return PipelineLoader(device=args.device, models_dir=args.models_dir, download=not args.offline,
                          options=runtime_options(args), announce=True)(model)  # fmt: skip


def runtime_options(args: argparse.Namespace):
    from framepack.config import RuntimeOptions

    return RuntimeOptions(preserved_memory_gb=args.preserved_memory, fp8=args.fp8,
                          keep_text_encoders=args.keep_text_encoders, memory=args.memory,
                          lora_dir=args.lora_dir, compile=args.compile)  # fmt: skip


@contextlib.contextmanager
def cancel_on_ctrl_c(cancel, kept: str):
    """Ctrl-C cancels after the current step; a second stops at once (`kept` is still written); later
    ones wait for that writing to finish."""
    presses = []

    def on_sigint(signum, frame):
        presses.append(1)
        if len(presses) == 1:
            print("\ncancelling after this step (Ctrl-C again to stop at once) ...", file=sys.stderr)
            cancel.cancel()
        elif len(presses) == 2:
            print(f"\nstopping now; writing {kept} ...", file=sys.stderr)
            raise KeyboardInterrupt
        else:
            print("\nstill writing; one moment ...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _cache_summary(sidecar: Path) -> str | None:
    """'step cache magcache (threshold 0.1, table ...): 61/100 forward calls computed; per section 16+9, ...'."""
    try:
        cache = json.loads(Path(sidecar).read_text()).get("step_cache")
    except (OSError, ValueError):
        return None
    if not cache:
        return None
    settings = [f"threshold {cache.get('threshold')}"]
    if cache.get("name") == "magcache":
        settings += [f"K {cache.get('k')}", f"retention {cache.get('retention')}", f"table: {cache.get('table')}"]
    per = ", ".join(f"{s['computed']}+{s['skipped']}" for s in cache.get("sections", []))
    return (f"step cache {cache['name']} ({', '.join(settings)}): {cache['computed']}/{cache['calls']} forward calls "
            f"computed; per section computed+skipped: {per}")


def _calibrate(args: argparse.Namespace) -> int:
    from framepack.cachetables import calibrate, user_dir
    from framepack.pipeline import load_pipeline

    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    print(f"loading model {args.model!r} ...", file=sys.stderr)
    pipe = load_pipeline(args.model, device=args.device, models_dir=args.models_dir, download=not args.offline)
    folder = Path(args.out_dir) if args.out_dir else user_dir()
    path, ratios = calibrate(pipe, image=args.image, prompt=args.prompt, steps=args.steps, resolution=args.resolution,
                             seed=args.seed, folder=folder)  # fmt: skip
    print(f"MagCache table for {args.model}, {args.steps} steps: {', '.join(f'{r:.4f}' for r in ratios)}")
    print(f"written to {path}; jobs of this model use the nearest calibrated table (named in their sidecar)")
    return 0


def _add_calibrate(sub) -> None:
    from framepack.registry import REGISTRY

    p = sub.add_parser("calibrate-cache", help="measure a MagCache ratio table for a model, resolution and step count",
                       description="Run one uncached section and record the block stack's residual magnitude "
                       "ratios per step (a MagCache table) into <FRAMEPACK_HOME>/magcache.")  # fmt: skip
    p.add_argument("--model", default="original", choices=sorted(REGISTRY))
    p.add_argument("--resolution", type=int, help="bucket base (default: the model's)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--image", help="start image (default: a synthetic gradient)")
    p.add_argument("--prompt", default="the object moves to the right")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", help="where the table goes (default <FRAMEPACK_HOME>/magcache)")
    _add_device_args(p)
    p.set_defaults(func=_calibrate)


def _download(args: argparse.Namespace) -> int:
    from framepack.registry import get_spec, resolve_spec

    spec = get_spec(args.model)
    if args.models_dir:
        from huggingface_hub import snapshot_download

        for repo in sorted({s.repo for s in spec.sources.values()}):
            subs = sorted({s.subfolder for s in spec.sources.values() if s.repo == repo and s.subfolder})
            patterns = [f"{s}/*" for s in subs] or ["*.json", "*.safetensors"]
            path = snapshot_download(repo, allow_patterns=patterns, local_dir=Path(args.models_dir) / repo)
            print(f"{repo} -> {path}")
        return 0
    for name, path in resolve_spec(spec, download=True).items():
        print(f"{name:18s} {path}")
    return 0


def _selftest(args: argparse.Namespace) -> int:
    """Build the tiny transformer, save it as a sharded checkpoint, load it back and run one section step."""
    import torch

    from framepack import load_transformer, save_transformer
    from framepack.config import TINY
    from framepack.models.transformer import FramePackTransformer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = save_transformer(FramePackTransformer(TINY), f"{tmp}/tiny", max_shard_bytes=200_000)
        model = load_transformer(path, dtype=torch.float32)
        c, h, w = TINY.in_channels, 16, 16
        kw = dict(
            hidden_states=torch.randn(1, c, 9, h, w),
            timestep=torch.tensor([1000.0]),
            encoder_hidden_states=torch.randn(1, 512, TINY.text_embed_dim),
            encoder_attention_mask=torch.arange(512)[None] < 20,
            pooled_projections=torch.randn(1, TINY.pooled_projection_dim),
            guidance=torch.tensor([10000.0]),
            latent_indices=torch.arange(1, 10)[None],
            clean_latents=torch.randn(1, c, 2, h, w),
            clean_latent_indices=torch.tensor([[0, 10]]),
            clean_latents_2x=torch.randn(1, c, 2, h, w),
            clean_latent_2x_indices=torch.tensor([[11, 12]]),
            clean_latents_4x=torch.randn(1, c, 16, h, w),
            clean_latent_4x_indices=torch.arange(13, 29)[None],
            image_embeddings=torch.randn(1, 729, TINY.image_proj_dim),
        )
        with torch.no_grad():
            out = model(**kw).sample
        shards = len(list(path.glob("*.safetensors")))
    ok = out.shape == kw["hidden_states"].shape and bool(torch.isfinite(out).all())
    print(
        f"tiny FramePack transformer: saved in {shards} shards, loaded, one packed-context step "
        f"{tuple(out.shape)} {out.dtype} in {time.perf_counter() - t0:.2f} s: {'OK' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


# ------------------------------------------------------------------------------ serve / ui
def _add_app_args(p: argparse.ArgumentParser, *, port: int) -> None:
    """Options shared by `serve` and `ui`: the job queue, the model, security, runtime."""
    from framepack.registry import REGISTRY

    p.add_argument("--port", type=int, default=port, help=f"TCP port (default {port}; 0: any free port)")
    p.add_argument("--model", default="original", choices=sorted(REGISTRY),
                   help="default model for jobs (the others of its family can be chosen per job)")  # fmt: skip
    p.add_argument("--outputs", default="outputs", help="folder for the job queue, videos and resume state")
    p.add_argument("--token", default=os.environ.get("FRAMEPACK_TOKEN"),
                   help="require this token (Bearer header / ?token=; UI password); env FRAMEPACK_TOKEN")  # fmt: skip
    p.add_argument("--no-auth", action="store_true", help="allow a non-loopback bind without a token (unsafe)")
    p.add_argument("--max-upload-mb", type=float, default=32, help="largest accepted image upload (default 32)")
    _add_device_args(p)
    p.add_argument("--preserved-memory", type=float, metavar="GB", help="device memory to leave free (default auto)")
    _add_speed_args(p)
    p.add_argument("--memory", choices=["auto", "managed", "off"], default="auto", help="device memory management")
    p.add_argument("--lora-dir", help="folder of LoRA files offered by the UI's picker and searched for bare "
                   "names and recorded hashes (default <FRAMEPACK_HOME>/loras)")  # fmt: skip
    add_checkpoint_args(p)
    p.add_argument("--gpus", type=int, metavar="N", help="run every job on N GPUs at once (sequence parallel, "
                   "as `generate --gpus N`; --device cpu: N CPU ranks); with --ray, each worker owns N "
                   "GPUs")  # fmt: skip
    ray = p.add_argument_group("scale out on Ray (pip install -e \".[cluster]\")")
    ray.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                     help="run jobs on Ray GPU worker actors, one per GPU: alone, a local Ray instance on this "
                     "machine; ADDRESS: a running cluster (auto, HOST:6379, ray://HOST:10001)")  # fmt: skip
    ray.add_argument("--workers", type=int, metavar="N", help="Ray worker actors (default: one per GPU of the cluster)")
    ray.add_argument("--ray-files", choices=["auto", "shared", "ship"], default="auto",
                     help="how workers reach the outputs folder: shared (the same path on every node, e.g. NFS), "
                     "ship (the job folder travels with the job, results come back after every section), auto "
                     "(default: shared where a worker sees the folder, else ship)")  # fmt: skip


def _app_models(default: str) -> list[str]:
    """The models jobs may pick: the default model's family (the real ones, or the built-in tiny ones)."""
    from framepack.registry import REGISTRY

    builtin = REGISTRY[default].builtin
    return [default] + sorted(n for n, spec in REGISTRY.items() if spec.builtin == builtin and n != default)


def _open_queue(args: argparse.Namespace):
    from framepack.config import RuntimeOptions
    from framepack.jobs import JobError, JobQueue
    from framepack.pipeline import PipelineLoader

    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    options = RuntimeOptions(preserved_memory_gb=args.preserved_memory, fp8=args.fp8, memory=args.memory,
                             lora_dir=args.lora_dir, compile=args.compile)  # fmt: skip

    loader = PipelineLoader(device=args.device, models_dir=args.models_dir, download=not args.offline,
                            options=options, announce=True)  # fmt: skip

    if args.gpus is not None and args.gpus < 1:
        raise JobError(f"--gpus must be at least 1, got {args.gpus}")
    group = args.gpus if args.gpus is not None and args.gpus > 1 else 1
    if group > 1:  # every job on a group of GPUs (framepack.parallel); with --ray: each worker owns a group
        from framepack.app.cli_parallel import RankGroupLoader, device_kind

        kind = device_kind(args)
        if args.ray is None:
            from framepack.parallel import check_devices

            check_devices(group, kind)
        loader = RankGroupLoader(loader, group, kind)
    runner = None
    if args.ray is not None or args.workers is not None:
        from framepack.jobs.ray_runner import RayRunner, RaySettings

        if args.ray is None:
            raise JobError("--workers sets the Ray worker count: use it with --ray")
        settings = RaySettings(address=None if args.ray == "local" else args.ray, workers=args.workers,
                               files=args.ray_files, gpus_per_worker=0 if args.device == "cpu" else group)  # fmt: skip
        runner = RayRunner.factory(loader, settings)
    queue = JobQueue(args.outputs, loader=loader, models=_app_models(args.model), default_model=args.model,
                     lora_dir=args.lora_dir, checkpoints=args.checkpoints, runner=runner,
                     requeue_running=runner is not None)  # fmt: skip
    for problem in queue.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if runner is not None:
        r = queue.runner
        print(f"Ray: {r.slots} worker{'s' if r.slots != 1 else ''} ({r.connection} {r.address}); "
              f"outputs {args.ray_files}; `ray status` shows the cluster", file=sys.stderr)  # fmt: skip
    return queue


def _check_exposure(host: str, args: argparse.Namespace, *, public: bool = False) -> int | None:
    """Loopback needs nothing; anything else needs --token or an explicit --no-auth. Returns an exit code
    to stop with, or None to go on."""
    from framepack.app.api import is_loopback

    if args.max_upload_mb <= 0:
        print("error: --max-upload-mb must be positive", file=sys.stderr)
        return 2
    if is_loopback(host) and not public:
        return None
    where = "a public share link" if public else f"{host}, reachable from the network"
    if args.token:
        print(f"serving on {where}; requests need the token", file=sys.stderr)
        return None
    if args.no_auth:
        print(f"WARNING: serving on {where} WITHOUT authentication (--no-auth): anyone who can reach it can "
              "run jobs and read every output", file=sys.stderr)  # fmt: skip
        return None
    print(f"error: serving on {where} needs --token TOKEN (or FRAMEPACK_TOKEN), or --no-auth to run without "
          "one", file=sys.stderr)  # fmt: skip
    return 2


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="HTTP API over the job queue (/api/, schema at /api/openapi.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    _add_app_args(p, port=8000)
    p.set_defaults(func=_serve)


def _add_ui(sub) -> None:
    p = sub.add_parser("ui", help="the desktop UI (Gradio) with the HTTP API on the same server")
    p.add_argument("--server", default="127.0.0.1", help="address to bind (default 127.0.0.1; the official: 0.0.0.0)")
    p.add_argument("--share", action="store_true", help="also make a public Gradio share link (needs a token)")
    p.add_argument("--inbrowser", action="store_true", help="open the page in the default browser")
    _add_app_args(p, port=7860)
    p.set_defaults(func=_ui)


def _app_missing() -> str | None:
    """None when the app's extra dependencies import; else the message saying how to install them."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "multipart", "gradio") if importlib.util.find_spec(m) is None]
    return f"the app needs {', '.join(missing)}: pip install 'framepack[app]'" if missing else None


def _start_server(args: argparse.Namespace, host: str, *, public: bool = False):
    """What `serve` and `ui` do before serving: app extras present, exposure allowed, queue opened.
    Returns the open JobQueue, or the exit code when one of those fails."""
    if (missing := _app_missing()) is not None:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    from framepack.jobs import JobError
    from framepack.parallel import ParallelError

    if (code := _check_exposure(host, args, public=public)) is not None:
        return code
    try:
        return _open_queue(args)
    except (JobError, ParallelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    queue = _start_server(args, args.host)
    if isinstance(queue, int):
        return queue
    from framepack.app import api

    try:
        app = api.create_app(queue, token=args.token, max_upload_bytes=int(args.max_upload_mb * 2**20))
        sock = api.bind(args.host, args.port)
        print(f"FramePack API on {api.url_of(sock)}/api/ (docs: /api/docs); model {args.model}, outputs "
              f"{queue.outputs}", flush=True)  # fmt: skip
        api.run(app, sock)
    finally:
        queue.close()
    return 0


def _ui(args: argparse.Namespace) -> int:
    queue = _start_server(args, args.server, public=args.share)
    if isinstance(queue, int):
        return queue
    from framepack.app import api, ui

    try:
        app = api.create_app(queue, token=args.token, max_upload_bytes=int(args.max_upload_mb * 2**20))
        ui.mount(app, queue, token=args.token)
        sock = api.bind(args.server, args.port)
        url = api.url_of(sock)
        print(f"FramePack UI on {url}/ (API: {url}/api/); model {args.model}, outputs {queue.outputs}", flush=True)
        if args.share:
            threading.Thread(target=_print_share_link, args=(args.server, sock.getsockname()[1]), daemon=True).start()
        if args.inbrowser:
            import webbrowser

            threading.Timer(1.0, webbrowser.open, (f"{url}/",)).start()
        api.run(app, sock)
    finally:
        queue.close()
    return 0


def _print_share_link(host: str, port: int) -> None:
    from framepack.app import ui

    try:
        print(f"public share link: {ui.share(host, port)}", flush=True)
    except Exception as err:  # no internet, or the share service is down: the local server goes on
        print(f"warning: no share link ({err})", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ train
def _add_lora(sub) -> None:
    from framepack.registry import REGISTRY

    p = sub.add_parser("lora", help="LoRA files: inspect what a file holds and what it matches")
    lsub = p.add_subparsers(dest="lora_command", required=True)
    i = lsub.add_parser("inspect", help="detected format, ranks, alphas, matched modules, keys not applied",
                        description="Read a LoRA file and map it onto a model's transformer, without loading "
                        "any weights (the model's shapes only).")  # fmt: skip
    i.add_argument("file")
    i.add_argument("--model", default="original", choices=sorted(REGISTRY),
                   help="the model it is for (default original)")  # fmt: skip
    i.add_argument("--lora-include", help="regex: only modules whose name matches")
    i.add_argument("--lora-exclude", help="regex: leave out modules whose name matches")
    i.add_argument("--lora-dir", help="LoRA folder for bare names (default <FRAMEPACK_HOME>/loras)")
    i.add_argument("--modules", action="store_true", help="also list every matched module and its rows")
    i.set_defaults(func=_lora_inspect)


def _lora_inspect(args: argparse.Namespace) -> int:
    from framepack.config import LoraRef
    from framepack.lora import LoraLibrary, read_lora_file, sha256_file
    from framepack.models.lora import TargetTable, parse_lora
    from framepack.registry import get_spec, transformer_config
    from framepack.weights import build_empty

    library = LoraLibrary(args.lora_dir)
    path = library.resolve(LoraRef(args.file))
    tensors, metadata = read_lora_file(path)
    config = transformer_config(get_spec(args.model))
    table = TargetTable.of(build_empty(config))
    parsed = parse_lora(tensors, metadata, table, name=path.name, include=args.lora_include,
                        exclude=args.lora_exclude)  # fmt: skip
    info = parsed.describe()
    print(f"file:      {path} ({path.stat().st_size / 2**20:.1f} MiB, sha256 {sha256_file(path)})")
    print(f"format:    {info['format']}")
    print(f"tensors:   {len(tensors)} in {parsed.file_modules} file modules")
    print(f"rank:      {', '.join(map(str, parsed.ranks)) or 'full (no low-rank factors)'}")
    print(f"alpha:     {', '.join(f'{a:g}' for a in parsed.alphas) or '-'}")
    print(f"scale:     {', '.join(f'{s:.6g}' for s in parsed.scales)} (alpha / rank; applied x the --lora weight)")
    blocks = (config.num_layers, config.num_single_layers)
    print(f"matched:   {len(parsed.modules)} target modules of {len(table.shapes)} Linears in {args.model} "
          f"({blocks[0]} double + {blocks[1]} single blocks)")  # fmt: skip
    if parsed.filtered:
        print(f"left out:  {parsed.filtered} modules by --lora-include / --lora-exclude")
    if parsed.unmatched:
        print(f"not applied: {parsed.unmatched_count} key(s) that map to no module of this transformer:")
        for kind, keys in parsed.unmatched.items():
            print(f"  {kind}: {len(keys)} key(s), e.g. {keys[0]}")
    else:
        print("not applied: none (every key was mapped)")
    if args.modules:
        for target, parts in parsed.modules.items():
            rows = ", ".join(f"{p.source}" + (f" rows {p.rows[0]}:{p.rows[1]}" if p.rows else "") for p in parts)
            print(f"  {target} <- {rows}")
    return 0


def _add_edit(sub) -> None:
    """`framepack edit ...` (one-frame image editing): defined in framepack.app.cli_edit."""
    from framepack.app.cli_edit import register

    register(sub)


def _add_branch(sub) -> None:
    """`framepack branch ...` (re-roll, change the prompt from a section on, continue): framepack.app.cli_branch."""
    from framepack.app.cli_branch import register

    register(sub)


def _add_train(sub) -> None:
    """`framepack train ...` (toy family, section trainer, packaging): defined in framepack.train.commands."""
    from framepack.train.commands import register

    register(sub)


def build_parser() -> argparse.ArgumentParser:
    """Every `framepack` command and its flags."""
    from framepack.registry import REGISTRY

    parser = argparse.ArgumentParser(prog="framepack", description="FramePack image-to-video generation")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_edit(sub)
    _add_branch(sub)
    d = sub.add_parser("download", help="prefetch a model's weights (HF cache, or --models-dir)")
    d.add_argument("model", choices=sorted(REGISTRY))
    d.add_argument("--models-dir", help="download into DIR/<org>/<name> instead of the HF cache")
    d.set_defaults(func=_download)
    s = sub.add_parser("selftest", help="check the install on the built-in tiny transformer (offline, seconds)")
    s.set_defaults(func=_selftest)
    _add_serve(sub)
    _add_ui(sub)
    _add_train(sub)
    _add_lora(sub)
    _add_calibrate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:  # a user's mistake: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
