"""`framepack train ...`: the training front end (a thin adapter over framepack.train).

    framepack train family       write the toy family's tokenizers, frozen encoders and untrained VAE
    framepack train vae          train the family's VAE on toy clips
    framepack train data         cache latents + embeddings: toy clips, or video files with captions
    framepack train transformer  the section trainer (from scratch, full fine-tuning or LoRA)
    framepack train package      family + trained transformer -> a model folder (framepack/toy by default)
    framepack train frame        draw a toy start frame from text ("a red circle on the left")
    framepack train clip         write a toy-world clip as MP4 (to look at the training data)

`register(sub)` adds the group to the main parser (framepack.app.cli). The exact commands that made
the shipped toy model are in the README ("Training and the toy model").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


def _threads(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def _floats(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    return float(lo), float(hi or lo)


def _weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 2,1; got {text!r}") from None


def register(sub) -> None:
    p = sub.add_parser("train", help="train FramePack models (toy family, section trainer, packaging)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    t = p.add_subparsers(dest="train_command", required=True)

    f = t.add_parser("family", help="write the toy family (tokenizers, frozen encoders, untrained VAE)")
    f.add_argument("--out", required=True, help="family folder")
    f.add_argument("--size", choices=["toy", "mini"], default="toy", help="toy (shipped) or mini (tests)")
    f.add_argument("--seed", type=int, default=None, help="default: the shipped family's seed")
    f.set_defaults(func=_family)

    v = t.add_parser("vae", help="train the family's VAE on toy clips (writes <family>/encoders/vae)")
    v.add_argument("--family", required=True)
    v.add_argument("--out", required=True, help="run folder: checkpoints and loss.csv")
    v.add_argument("--steps", type=int, default=2000)
    v.add_argument("--batch", type=int, default=2)
    v.add_argument("--frames", type=int, default=9, help="frames per training clip (4k + 1)")
    v.add_argument("--lr", type=float, default=1e-5)
    v.add_argument("--kl", type=float, default=1e-4, help="KL weight")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    v.add_argument("--threads", type=int)
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=_vae)

    d = t.add_parser("data", help="cache VAE latents and embeddings of training clips")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--family", help="toy family folder (toy clips are generated)")
    src.add_argument("--model", help="registry model whose encoders and VAE to use (with --videos)")
    d.add_argument("--out", required=True, help="dataset folder")
    d.add_argument("--clips", type=int, default=600, help="toy clips to generate")
    d.add_argument("--sections", type=_range, default=(1, 6), help="toy clip lengths in sections, LO-HI")
    d.add_argument("--videos", help="a .jsonl ({video, caption}) or .csv/.tsv (video, caption) list")
    d.add_argument("--resolution", type=int, default=640, help="bucket base for --videos")
    d.add_argument("--max-sections", type=int, default=4, help="longest clip cut from a video, in sections")
    d.add_argument("--window", type=int, default=9)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu")
    d.add_argument("--threads", type=int)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_data)

    r = t.add_parser("transformer", help="the section trainer")
    _transformer_args(r)
    r.set_defaults(func=_transformer)

    k = t.add_parser("package", help="family + trained transformer -> model folder (default framepack/toy)")
    k.add_argument("--family", required=True)
    k.add_argument("--transformer", required=True, help="exported transformer folder (<run>/transformer)")
    k.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "toy"))
    k.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    k.set_defaults(func=_package)

    fr = t.add_parser("frame", help="draw a toy start frame from text")
    fr.add_argument(
        "text", help='e.g. "a red circle on the left", "a blue square at the top right on a navy background"'
    )
    fr.add_argument("--out", required=True, help="PNG path")
    fr.add_argument("--size", type=int, default=64)
    fr.set_defaults(func=_frame)

    c = t.add_parser("clip", help="write a toy-world clip (MP4) and print its caption")
    c.add_argument("seed", type=int)
    c.add_argument("--sections", type=int, default=2)
    c.add_argument("--out", required=True, help="MP4 path")
    c.add_argument("--size", type=int, default=64)
    c.set_defaults(func=_clip)


def _transformer_args(r: argparse.ArgumentParser) -> None:
    from framepack.train.trainer import TrainConfig

    dflt = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    r.add_argument("--data", required=True, help="dataset folder (framepack train data)")
    r.add_argument("--out", required=True, help="run folder: checkpoints/, loss.csv, transformer/")
    r.add_argument("--model", default=dflt["model"], help="architecture for training from scratch: toy or mini")
    r.add_argument("--init", help="start from a registry model (e.g. f1) or a transformer folder/.safetensors")
    r.add_argument(
        "--add-single-layers",
        type=int,
        default=0,
        metavar="N",
        help="grow the --init model by N single-stream blocks (copies, gates closed: same output)",
    )
    r.add_argument(
        "--add-double-layers", type=int, default=0, metavar="N", help="grow the --init model by N double-stream blocks"
    )
    r.add_argument("--steps", type=int, default=dflt["steps"])
    r.add_argument("--batch", type=int, default=dflt["batch_size"])
    r.add_argument("--lr", type=float, default=dflt["lr"])
    r.add_argument("--lr-schedule", choices=["cosine", "constant"], default=dflt["lr_schedule"])
    r.add_argument("--warmup", type=int, default=dflt["warmup"])
    r.add_argument("--weight-decay", type=float, default=dflt["weight_decay"])
    r.add_argument("--grad-clip", type=float, default=dflt["grad_clip"])
    r.add_argument("--ema", type=float, default=dflt["ema"], help="EMA decay (0: off)")
    r.add_argument("--schedules", default=",".join(dflt["schedules"]), help="inverted,forward (mixed per batch)")
    r.add_argument(
        "--schedule-weights",
        type=_weights,
        default=dflt["schedule_weights"],
        help="relative share of each schedule's samples, same order (e.g. 2,1); default equal",
    )
    r.add_argument("--sigma-sampling", choices=["uniform", "logit-normal"], default=dflt["sigma_sampling"])
    r.add_argument("--guidance", type=_floats, default=dflt["guidance"], help="distilled guidance range LO,HI")
    r.add_argument("--caption-dropout", type=float, default=dflt["caption_dropout"])
    r.add_argument("--no-start-probability", type=float, default=dflt["no_start_probability"])
    r.add_argument("--context-noise", type=float, default=dflt["context_noise"])
    r.add_argument("--precision", choices=["fp32", "bf16"], default=dflt["precision"])
    r.add_argument("--gradient-checkpointing", action="store_true")
    r.add_argument("--lora-rank", type=int, default=0, help="> 0: train LoRA adapters only")
    r.add_argument("--lora-alpha", type=float)
    r.add_argument("--seed", type=int, default=dflt["seed"])
    r.add_argument("--save-every", type=int, default=dflt["save_every"])
    r.add_argument("--log-every", type=int, default=dflt["log_every"])
    r.add_argument("--probe-every", type=int, default=dflt["probe_every"])
    r.add_argument("--device", default=dflt["device"])
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    r.add_argument("--threads", type=int)
    r.add_argument("--quiet", action="store_true")


# ------------------------------------------------------------------------------------ handlers
def _family(args: argparse.Namespace) -> int:
    from framepack.train import toyfamily as tf

    cfg = tf.FAMILIES[args.size][0]
    root = tf.build_family(args.out, cfg, tf.FAMILY_SEED if args.seed is None else args.seed)
    print(f"toy family ({args.size}) written to {root}; next: framepack train vae --family {root} --out RUN")
    return 0


def _vae(args: argparse.Namespace) -> int:
    from framepack.train import toyfamily as tf

    _threads(args)
    cfg = tf.VAETrainConfig(steps=args.steps, batch_size=args.batch, frames=args.frames, lr=args.lr,
                            kl_weight=args.kl, seed=args.seed)  # fmt: skip
    rec = tf.train_vae(args.family, args.out, cfg, resume=args.resume, progress=not args.quiet)
    print(f"VAE trained in {rec['seconds']:.0f} s: final L1 {rec['final_l1']:.4f} (of 2), scaling factor "
          f"{rec['scaling_factor']:.4f}; written to {args.family}/encoders/vae")  # fmt: skip
    return 0


def _data(args: argparse.Namespace) -> int:
    from framepack.train import data, toyfamily

    _threads(args)
    t0 = time.perf_counter()
    if args.family:
        if not toyfamily.read_manifest(args.family).get("vae", {}).get("trained"):
            print(f"warning: the VAE in {args.family} is not trained yet (framepack train vae)", file=sys.stderr)
        enc = data.load_encoders(toyfamily.family_paths(args.family), device=args.device)
        root = data.build_toy_dataset(args.out, enc, clips=args.clips, sections=args.sections, seed=args.seed,
                                      window=args.window, progress=not args.quiet)  # fmt: skip
    else:
        if not args.videos:
            print("error: --model needs --videos LIST", file=sys.stderr)
            return 2
        from framepack.registry import get_spec, resolve_spec

        spec = get_spec(args.model)
        enc = data.load_encoders(resolve_spec(spec), device=args.device, prompt_crop=spec.prompt_crop)
        items = data.read_video_list(args.videos)
        root = data.build_video_dataset(args.out, enc, items, resolution=args.resolution, window=args.window,
                                        max_sections=args.max_sections, seed=args.seed,
                                        progress=not args.quiet)  # fmt: skip
    n = json.loads((Path(root) / data.INFO).read_text())["clips"]
    print(f"dataset {root}: {n} clips in {time.perf_counter() - t0:.0f} s")
    return 0


def _transformer(args: argparse.Namespace) -> int:
    from framepack.train.trainer import SectionTrainer, TrainConfig

    _threads(args)
    cfg = TrainConfig(
        data=args.data, out=args.out, model=args.model, init=args.init,
        add_single_layers=args.add_single_layers, add_double_layers=args.add_double_layers,
        steps=args.steps, batch_size=args.batch,
        lr=args.lr, lr_schedule=args.lr_schedule, warmup=args.warmup, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, ema=args.ema, schedules=tuple(s for s in args.schedules.split(",") if s),
        schedule_weights=tuple(args.schedule_weights), sigma_sampling=args.sigma_sampling, guidance=args.guidance,
        caption_dropout=args.caption_dropout,
        no_start_probability=args.no_start_probability, context_noise=args.context_noise, precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        seed=args.seed, save_every=args.save_every, log_every=args.log_every, probe_every=args.probe_every,
        device=args.device,
    )  # fmt: skip
    trainer = SectionTrainer(cfg)
    if args.resume and trainer.resume():
        print(f"resumed at step {trainer.step}", file=sys.stderr)
    params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(f"training {params / 1e6:.2f}M parameters on {len(trainer.data)} clips "
          f"({_mix(cfg)} schedules)", file=sys.stderr)  # fmt: skip
    path = trainer.fit(progress=not args.quiet)
    print(f"exported {path} after {trainer.step} steps ({trainer.seconds / 60:.1f} min); loss log {args.out}/loss.csv")
    return 0


def _mix(cfg) -> str:
    if not cfg.schedule_weights:
        return ", ".join(cfg.schedules)
    total = sum(cfg.schedule_weights)
    return ", ".join(f"{k} {w / total:.0%}" for k, w in zip(cfg.schedules, cfg.schedule_weights))


def _package(args: argparse.Namespace) -> int:
    import torch

    from framepack.train import toyfamily as tf

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    training = {}
    record = Path(args.transformer) / "training.json"
    if record.exists():
        training = {"training": json.loads(record.read_text())}
    out = tf.package(args.family, args.transformer, args.out, dtype=dtype, training=training)
    size = tf.folder_bytes(out)
    print(f"packaged {out}: {size / 2**20:.1f} MiB")
    if size > 25 * 2**20:
        print("warning: larger than the 25 MB budget of the shipped toy model", file=sys.stderr)
    return 0


def _frame(args: argparse.Namespace) -> int:
    from PIL import Image

    from framepack.train.toyworld import first_frame

    Image.fromarray(first_frame(args.text, args.size)).save(args.out)
    print(args.out)
    return 0


def _clip(args: argparse.Namespace) -> int:
    from framepack.train.toyworld import make_clip
    from framepack.video import SectionVideoWriter

    clip = make_clip(args.seed, args.sections, size=args.size)
    writer = SectionVideoWriter(args.out, fps=30, crf=10)
    writer.add_final(clip.frames)
    writer.finish()
    print(f"{args.out}: {len(clip.frames)} frames; caption: {clip.caption}")
    return 0
