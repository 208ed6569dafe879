"""Branches: a new video that shares the first K finished sections (generation order) of another and
makes the rest with changed settings: re-roll a bad section with a new seed, change the prompt from a
section on, or continue a video with more seconds.

    parent = find_parent(video_or_sidecar)      its request, model and section checkpoints
    plan = plan_branch(parent, at, changes)     the branch's request, checked: what may change, and where
    prepare(plan, state_dir, video)             the branch's resume state (history, RNG, writer) and the
                                                shared segments' packets copied out of the parent's MP4
    Pipeline.generate(plan.request, state_dir=state_dir)   continues from section K+1, as a resume does

What the branch shares: F1 generates forward, so sections 1..K are the video's beginning and the branch
regenerates its end; the original model generates back to front, so its sections 1..K are the video's
*end* and the branch regenerates the part before it. The shared frames are the parent's own packets
(bit-identical), except the `overlap` frames (4 * window - 3) at the edge that the next section
cross-fades with (the official blend, spec §3.3).

What can change (`BRANCH_FIELDS`): the seed (the noise from section K+1 on is drawn from a generator
seeded with it; with the parent's seed the branch continues the parent's generator, so it remakes
the parent exactly), prompts, sampling and guidance settings, step cache, LoRAs, and the length.
Everything the kept sections were made from or the video's encoding depends on (images, resolution,
window, keyframes, crf, the model) cannot. The original model's RoPE padding depends on the video's
length, so a branch with another length keeps only the sections whose padding stays
(`Schedule.conditioning_key`); F1's sections do not depend on the length.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from framepack import jobstate
from framepack.checkpoints import KEEP_ALL, Checkpoint, CheckpointError, KeepPolicy, SectionStore, sections_dir
from framepack.config import GenerationRequest, RequestError
from framepack.video import copy_segment

# Request fields a branch may change; they act from section K+1 on. `output`/`overwrite` say where it goes.
BRANCH_FIELDS = ("seed", "prompt", "negative_prompt", "seconds", "steps", "distilled_guidance", "cfg",
                 "cfg_rescale", "teacache", "teacache_threshold", "cache", "cache_threshold", "magcache_k",
                 "magcache_retention", "sampler", "shift", "prompt_blend", "loras", "lora_include",
                 "lora_exclude")  # fmt: skip
_WHERE = ("output", "overwrite")
_INPUT_FIELDS = ("image", "end_image", "video")


def check_changeable(fields: Iterable[str], also: Iterable[str] = ()) -> None:
    """RequestError naming the fields (besides `also`) that a branch cannot change, and the ones it can."""
    fixed = sorted(set(fields) - set(BRANCH_FIELDS) - set(also))
    if fixed:
        raise RequestError(f"{', '.join(fixed)} cannot change at a branch (the kept sections were made with the "
                           f"parent's); a branch can change: {', '.join(BRANCH_FIELDS)}")  # fmt: skip


@dataclass(frozen=True)
class Parent:
    """A finished (or stopped) video that can be branched: its request, model and checkpoints."""

    name: str  # how messages and the sidecar name it: "job <id>" or the video's path
    video: Path
    store: SectionStore

    @property
    def request(self) -> dict:
        return self.store.index["request"]

    @property
    def model(self) -> str:
        return self.store.index["model"]

    @property
    def sections_done(self) -> int:
        return self.store.index["last"]


def find_parent(path: str | os.PathLike, name: str | None = None) -> Parent:
    """The parent a path names: a video's JSON sidecar or the video itself (its checkpoints are in the
    hidden folder beside it). RequestError / CheckpointError say what is missing."""
    path = Path(path).expanduser()
    if not path.exists():
        raise RequestError(f"cannot branch from {path}: no such file (give a video's .json sidecar or its .mp4)")
    video = path
    if path.suffix.lower() == ".json":
        from framepack.oneframe import read_settings

        stored, _ = read_settings(path)
        if stored.get("kind", "video") != "video":
            raise RequestError(f"{path} is a frame edit's result: only videos can be branched")
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not meta.get("video"):
            raise RequestError(f"{path} describes a job that left no video (status {meta.get('status')}): "
                               "nothing to branch from")  # fmt: skip
        video = path.with_name(meta["video"])
    elif path.suffix.lower() != ".mp4":
        raise RequestError(f"cannot branch from {path}: give a video's .json sidecar or its .mp4")
    label = name or str(video)
    if not video.is_file():
        raise RequestError(f"cannot branch from {label}: its video {video} is gone")
    store = SectionStore.open(sections_dir(video), label)
    layout = store.index.get("video")
    if not layout or layout.get("bytes") != video.stat().st_size:  # (renamed with its folder is fine)
        raise CheckpointError(f"cannot branch from {label}: {video} is not the file its checkpoints describe "
                              "(it was replaced or edited since)")  # fmt: skip
    return Parent(label, video, store)


@dataclass(frozen=True)
class BranchPlan:
    parent: Parent
    at: int  # sections kept (generation order); the branch makes at+1 .. on
    request: GenerationRequest
    changed: dict  # field -> [parent's value, branch's value] (JSON)
    checkpoint: Checkpoint
    sections: int  # the branch's section count
    reseed: dict[str, int]  # sections done -> the seed the noise generator restarts from there (JSON keys)

    def info(self) -> dict:
        """What the sidecar and the job record say about where the branch came from; `reseed` is what the
        engine does with it (pipeline.JobRun), so a branch of a branch remakes its parent too."""
        return {"parent": self.parent.name, "parent_video": str(self.parent.video), "at": self.at,
                "changed": self.changed, "reseed": self.reseed,
                "parent_branch": self.parent.store.index.get("branch")}  # fmt: skip


def _absolute(request: dict, cwd: str | None) -> dict:
    """Relative input paths of the parent's request, resolved where the parent ran."""
    if not cwd:
        return request
    out = dict(request)
    for key in _INPUT_FIELDS:
        if isinstance(out.get(key), str) and out[key] != "<array>" and not os.path.isabs(out[key]):
            out[key] = os.path.join(cwd, out[key])
    if out.get("keyframes"):
        out["keyframes"] = [[t, p if os.path.isabs(p) else os.path.join(cwd, p)] for t, p in out["keyframes"]]
    return out


def plan_branch(parent: Parent, at: int | str, changes: dict, spec, *, base: dict | None = None) -> BranchPlan:
    """Check a branch of `parent` after `at` sections ("last": the latest the changes allow) with
    `changes` (request fields from `BRANCH_FIELDS`, plus output/overwrite). `base`: the parent's request
    to start from, if not the one its checkpoints recorded (the queue's: the same inputs, copied into
    the branch's own folder). RequestError names what was wrong and what is accepted."""
    from framepack.pipeline import check_request

    check_changeable(changes, _WHERE)
    if spec.name != parent.model:
        raise RequestError(f"{parent.name} was made with model {parent.model!r}: a branch continues it with the "
                           "same model")  # fmt: skip
    if base is None:
        base = _absolute(parent.request, parent.store.index.get("cwd"))
        base = {**base, "output": None, "overwrite": False}
    merged = {**base, **changes}
    request = GenerationRequest.from_json_dict(merged).validate()
    if request.image == "<array>":
        raise RequestError(f"{parent.name} was made from an in-memory image: there is no start image to branch with")
    ours, theirs = check_request(request, spec), check_request(GenerationRequest.from_json_dict(base), spec)
    done = parent.sections_done
    pairs = list(zip(ours.sections, theirs.sections[:done]))  # the kept sections as made, and as the branch would
    same = [(ours.schedule.conditioning_key(a), _anchor(ours, a)) == (theirs.schedule.conditioning_key(b),
            _anchor(theirs, b)) for a, b in pairs]  # fmt: skip
    allowed = same.index(False) if False in same else len(same)
    allowed = min(allowed, len(ours.sections) - 1)  # a branch makes at least one section
    if at == "last":
        at = allowed
    if isinstance(at, bool) or not isinstance(at, int) or not 0 <= at <= done:
        raise RequestError(f"--at must be a number of finished sections from 0 to {done} (generation order; 0 = "
                           f"remake all) or 'last', got {at!r}")  # fmt: skip
    if at >= len(ours.sections):
        raise RequestError(f"a branch after {at} sections must make at least one more: this one has "
                           f"{len(ours.sections)} section(s) in all; give more seconds (continue) or an earlier --at")
    if at > allowed:
        raise RequestError(_why_not(parent, ours, theirs, allowed, at))
    checkpoint = parent.store.load(at)
    changed = {}
    parent_json, ours_json = GenerationRequest.from_json_dict(base).to_json_dict(), request.to_json_dict()
    for key in BRANCH_FIELDS:
        if parent_json.get(key) != ours_json.get(key):
            changed[key] = [parent_json.get(key), ours_json.get(key)]
    if "seed" in changed:  # the noise from the branch on comes from the new seed
        reseed = {str(at): request.seed}
    else:  # the parent's noise, including where it restarted after this point (a branch of a branch)
        inherited = (parent.store.index.get("branch") or {}).get("reseed") or {}
        reseed = {k: v for k, v in inherited.items() if int(k) >= at}
    return BranchPlan(parent, at, request, changed, checkpoint, len(ours.sections), reseed)


def _anchor(plan, section) -> str | None:
    """The image pinned into a section's context (end frame, keyframe), by name."""
    return next((a.source for a in plan.anchors if a.video_section == section.video_index), None)


def _why_not(parent: Parent, ours, theirs, allowed: int, at: int) -> str:
    n_ours, n_theirs = len(ours.sections), len(theirs.sections)
    if n_ours != n_theirs and ours.schedule.grows_at == "start":
        return (f"the original model builds a video back to front, and the RoPE padding of its sections depends on "
                f"the video's length: with {n_ours} sections instead of {n_theirs}, only the first {allowed} "
                f"generated section(s) of {parent.name} (the end of the video) were made as this branch would "
                f"make them, so it can keep at most {allowed} (--at 0..{allowed}, or --at last); F1 can branch "
                f"anywhere")  # fmt: skip
    return (f"after {allowed} section(s) the branch's sections would have another context than {parent.name}'s "
            f"(a keyframe or end frame lands elsewhere with this length), so it can keep at most {allowed} "
            f"(--at 0..{allowed})")  # fmt: skip


def section_table(store: SectionStore, file_frames: int) -> list[dict]:
    """Each finished section of a video (generation order): where its frames are in the video file
    (`file_frames` long) and whether a branch can start before it (re-roll from here) or after it.

    Frames in the final video: section i covers latent frames [a, b) -> pixel frames 4a-3 .. 4b-4
    (the first also frame 0, the start image). A video growing at its end holds them from frame 0
    (after an input video's frames); one growing at its start (the original model, back to front)
    holds the end of the final video, so its frames count from the end."""
    from framepack.sections import make_schedule

    index = store.index
    schedule = make_schedule(index["schedule"], index["window"])
    sections, done, kept = schedule.sections(index["sections"]), index["last"], store.kept
    made = sections[:done]
    if schedule.grows_at == "end":
        shift = -(file_frames - (4 * made[-1].latent_range[1] - 3)) if made else 0  # an input video before it
    else:
        shift = schedule.frames(len(sections)) - file_frames
    rows = []
    for s in made:
        a, b = s.latent_range
        first, last = (0 if a == 1 else 4 * a - 3) - shift, 4 * b - 4 - shift
        rows.append({"section": s.index + 1, "video_index": s.video_index, "frames": [max(first, 0),
                     min(max(last, 0), file_frames - 1)], "reroll": s.index in kept,
                     "after": s.index + 1 in kept})  # fmt: skip
    return rows


def prepare(plan: BranchPlan, state_dir: str | os.PathLike, video: str | os.PathLike, *,
            replaces: Path | None = None, keep: KeepPolicy | None = KEEP_ALL) -> None:  # fmt: skip
    """Write the branch's resume state into `state_dir` (a job resumed from it continues after section
    `plan.at` and writes `video`) and, unless `keep` is None, its checkpoints 0..at beside `video`."""
    state_dir, video = Path(state_dir), Path(video)
    parent, cp = plan.parent, plan.checkpoint
    segments = state_dir / jobstate.SEGMENTS
    segments.mkdir(parents=True, exist_ok=True)
    where = {name: (first, frames) for name, first, frames, _ in parent.store.index["video"]["segments"]}
    for name, frames, reorder in cp.writer["segments"]:
        if name not in where or where[name][1] != frames:
            raise CheckpointError(f"{parent.name}: segment {name} of section checkpoint {plan.at} is not in "
                                  f"{parent.video} (its checkpoints and its video disagree)")  # fmt: skip
        try:
            copy_segment(parent.video, where[name][0], frames, reorder, segments / name)
        except ValueError as err:
            raise CheckpointError(f"cannot branch from {parent.name}: {err}") from None
    info = plan.info()
    encode_seed = parent.store.index.get("encode_seed", parent.request.get("seed"))
    if keep is not None:
        header = {"request": plan.request.to_json_dict(), "sections": plan.sections, "branch": info,
                  "cwd": os.getcwd()}  # fmt: skip
        parent.store.copy_to(sections_dir(video), plan.at, header).update(keep=keep.last)
    jobstate.save(state_dir, request=plan.request.to_json_dict(), model=parent.model, sections_done=plan.at,
                  video=video, writer=cp.writer, history=cp.history, rng=cp.rng_state, encode_seed=encode_seed,
                  branch=info, replaces=replaces)  # fmt: skip
