"""`framepack branch`: a new video from another's state after K finished sections, with changed settings
from section K+1 on (framepack.branching). Re-roll = `--at K-1 --seed S`; change the prompt from
section K on = `--at K-1 --prompt P`; continue = `--at last --seconds T`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

from framepack.config import CONTROLS, LORAS


def register(sub) -> None:
    from framepack.app.cli import add_checkpoint_args, add_request_flags, add_run_args
    from framepack.branching import BRANCH_FIELDS
    from framepack.config import REQUEST_FIELDS, GenerationRequest

    table = {k: v for k, v in REQUEST_FIELDS.items() if k in (*BRANCH_FIELDS, "output", "overwrite")}
    table["output"] = dataclasses.replace(table["output"], help="output folder or a path ending in .mp4 (default: "
                                          "beside the parent, named PARENT-bK.mp4)")  # fmt: skip
    table["seed"] = dataclasses.replace(table["seed"], help="a new seed for the sections the branch makes (default: "
                                        "the parent's, continuing its noise: the branch remakes the parent)")
    p = sub.add_parser(
        "branch", help="re-roll a section, change the prompt from a section on, or continue a video",
        description="Start a new video from a finished (or stopped) video's state after K sections, in generation "
        "order, changing settings from section K+1 on; sections 1..K are not computed again and their frames are "
        "copied from the parent. F1 generates forward: a branch keeps the beginning and remakes the end. The "
        "original model generates back to front: a branch keeps the END of the video and remakes the part before "
        "it. Flags left out keep the parent's values.",
    )  # fmt: skip
    p.add_argument("parent", help="the parent: a video's .json sidecar or .mp4 (its checkpoints are in the hidden "
                   "folder beside it), or a queue job id (with --outputs)")  # fmt: skip
    p.add_argument("--at", required=True, help="keep this many finished sections of the parent (0 = remake all), "
                   "or 'last': the most the changes allow (continue)")  # fmt: skip
    p.add_argument("--outputs", default="outputs", help="the queue's outputs folder, for a job id (default ./outputs)")
    groups = add_request_flags(p, GenerationRequest, table)
    groups[CONTROLS].add_argument("--prompts-file", help="timestamped prompts for the new sections, one "
                                  "'[TIME: prompt]' or 'TIME: prompt' per line")  # fmt: skip
    add_run_args(p, groups[LORAS])
    add_checkpoint_args(p)
    # What a branch cannot change is still accepted as a flag, so that it gets an error naming what can.
    for name, info in REQUEST_FIELDS.items():
        flag = info.flag or "--" + name.replace("_", "-")
        if name not in table and info.cli and not flag.startswith("--no-"):
            p.add_argument(flag, dest=f"fixed_{name}", default=None, help=argparse.SUPPRESS)
    taken = set(p._option_string_actions)
    for name in ("image", "keyframe", "model"):
        if f"--{name}" not in taken:
            p.add_argument(f"--{name}", dest=f"fixed_{name}", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_branch)


def parent_path(text: str, outputs: str) -> tuple[Path, str | None]:
    """A parent's file and its name for messages: a path, or a queue job id inside `outputs`."""
    from framepack.jobs import JOBS_DIR, VIDEO

    path = Path(text).expanduser()
    if path.exists() or os.sep in text or text.endswith((".json", ".mp4")):
        return path, None
    return Path(outputs).expanduser() / JOBS_DIR / text / VIDEO, f"job {text}"


def branch_changes(args: argparse.Namespace) -> dict:
    """The request fields given on the command line (the rest stay the parent's)."""
    from framepack.app.cli import _read_prompts_file, lora_overrides
    from framepack.branching import BRANCH_FIELDS, check_changeable
    from framepack.config import RequestError

    check_changeable(k[len("fixed_"):] for k, v in vars(args).items() if k.startswith("fixed_") and v is not None)
    changes = {k: getattr(args, k) for k in (*BRANCH_FIELDS, "output", "overwrite")
               if getattr(args, k, None) is not None}  # fmt: skip
    if args.prompts_file:
        if "prompt" in changes:
            raise RequestError("give --prompt or --prompts-file, not both")
        changes["prompt"] = _read_prompts_file(args.prompts_file)
    changes.update({k: [dataclasses.asdict(r) for r in v] for k, v in lora_overrides(args).items()})
    return changes


def default_output(parent: Path, at: int) -> Path:
    """PARENT-bK.mp4 beside the parent (-bK-2, -bK-3, ... if taken)."""
    name, n = parent.with_name(f"{parent.stem}-b{at}.mp4"), 2
    while name.exists() or name.with_suffix(".json").exists():
        name, n = parent.with_name(f"{parent.stem}-b{at}-{n}.mp4"), n + 1
    return name


def describe(plan) -> str:
    """What the branch keeps and makes, in the schedule's terms."""
    from framepack.sections import make_schedule

    index = plan.parent.store.index
    schedule = make_schedule(index["schedule"], index["window"])
    kept = schedule.frames(plan.at) - 1 if plan.at else 0
    where = "beginning" if schedule.grows_at == "end" else "end"
    changed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in plan.changed.items()) or "nothing"
    return (f"branch of {plan.parent.name} after {plan.at} of its {plan.parent.sections_done} section(s): keeps its "
            f"{where} (~{kept / 30:.2f} s, the last {schedule.overlap()} frames of it cross-fade into the new "
            f"sections), makes sections {plan.at + 1}..{plan.sections}; changed: {changed}")  # fmt: skip


def _branch(args: argparse.Namespace) -> int:
    from framepack.app.cli import load_for, run_video
    from framepack.branching import find_parent, plan_branch, prepare
    from framepack.checkpoints import KeepPolicy
    from framepack.config import RequestError
    from framepack.outputs import check_output, disk_needed
    from framepack.registry import get_spec

    path, name = parent_path(args.parent, args.outputs)
    parent = find_parent(path, name)
    at: int | str = args.at
    if at != "last":
        try:
            at = int(at)
        except ValueError:
            raise RequestError(f"--at takes a number of sections or 'last', got {args.at!r}") from None
    changes = branch_changes(args)
    spec = get_spec(parent.model)
    plan = plan_branch(parent, at, changes, spec)
    request = plan.request
    if request.output is None:
        request = dataclasses.replace(request, output=str(default_output(parent.video, plan.at)))
        plan = dataclasses.replace(plan, request=request)
    keep = KeepPolicy.parse(args.checkpoints)
    out = check_output(request)
    if request.loras:
        from framepack.lora import LoraLibrary

        LoraLibrary(args.lora_dir).check(request.loras)
    print(describe(plan), file=sys.stderr)
    state = Path(tempfile.mkdtemp(prefix=f".{out.video.stem}.", suffix=".branch", dir=out.video.parent))
    try:
        prepare(plan, state, out.video, replaces=out.replaces, keep=keep)
        pipe = load_for(args, parent.model)
        h, w = plan.checkpoint.history.start.shape[-2:]  # latent size
        needed = disk_needed(_frames(plan), h * 8, w * 8, request.window)
        return run_video(args, needed, lambda on_event, cancel: pipe.generate(
            request, on_event=on_event, cancel=cancel, state_dir=state, checkpoints=keep))  # fmt: skip
    finally:
        shutil.rmtree(state, ignore_errors=True)  # what a stopped branch made is in its MP4 and checkpoints


def _frames(plan) -> int:
    from framepack.sections import make_schedule

    index = plan.parent.store.index
    return make_schedule(index["schedule"], index["window"]).frames(plan.sections)
