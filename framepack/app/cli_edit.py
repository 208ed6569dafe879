"""`framepack edit`: one-frame image editing with the original model (framepack.oneframe). A thin
adapter: flags from the request field tables, the engine does the rest."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys

from framepack.config import FRAME_EDIT, LORAS

# A path is an optional Windows drive ("C:") and no other colon; '@N' and ':MASK' follow the image.
_CONTROL = re.compile(r"^(?P<image>(?:[A-Za-z]:)?[^:]+?)(?:@(?P<index>\d+))?(?::(?P<mask>(?:[A-Za-z]:)?[^:]+))?$")


def register(sub) -> None:
    from framepack.app.cli import add_request_flags, add_run_args
    from framepack.config import EDIT_FIELDS, REQUEST_FIELDS, VIDEO_ONLY, EditRequest
    from framepack.registry import REGISTRY

    shared = {k: v for k, v in REQUEST_FIELDS.items() if k not in VIDEO_ONLY}
    shared["prompt"] = dataclasses.replace(shared["prompt"], help="what the edited frame shows (one prompt)")
    shared["output"] = dataclasses.replace(shared["output"], help="output folder (default ./outputs) or a path "
                                           "ending in .png")  # fmt: skip
    shared["overwrite"] = dataclasses.replace(shared["overwrite"], help="replace an existing --out FILE.png (and its "
                                              ".json) once the new image is complete")  # fmt: skip
    p = sub.add_parser(
        "edit", help="one-frame image editing with the original model (1f, kisekaeichi, multi-control)",
        description="Make one frame: the start image some time later, following the prompt, optionally with "
        "reference images (kisekaeichi: outfit transfer). Writes a PNG (settings in a text chunk) and a JSON "
        "sidecar. The original model only (F1 is trained forward).",
    )  # fmt: skip
    groups = add_request_flags(p, EditRequest, shared, EDIT_FIELDS)
    groups[FRAME_EDIT].add_argument("--control", action="append", metavar="IMG[@INDEX][:MASK]",
                                    help=EDIT_FIELDS["controls"].help + "; e.g. --control dress.png@10:dress-mask.png")
    p.add_argument("--model", default=None, choices=sorted(REGISTRY), help="default: original (tiny and toy work)")
    p.add_argument("--from", dest="from_json", help="re-run the edit stored in a result .png or .json (flags override)")
    add_run_args(p, groups[LORAS])
    p.set_defaults(func=_edit)


def parse_control(text: str):
    """'ref.png@10:mask.png' -> EditControl('ref.png', 10, 'mask.png'); index and mask optional (a ':'
    after a drive letter is part of a Windows path, not a mask)."""
    from framepack.config import EditControl, RequestError

    m = _CONTROL.match(text.strip())
    if not m or not m.group("image"):
        raise RequestError(f"--control takes IMG[@INDEX][:MASK], such as dress.png@10:dress-mask.png; got {text!r}")
    index = m.group("index")
    return EditControl(m.group("image"), int(index) if index is not None else None, m.group("mask"))


def build_edit_request(args: argparse.Namespace):
    from framepack.app.cli import lora_overrides, stored_settings
    from framepack.config import VIDEO_ONLY, EditRequest

    base, model = stored_settings(args, "edit")
    fields = {f.name for f in dataclasses.fields(EditRequest)} - set(VIDEO_ONLY)
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.control:
        overrides["controls"] = tuple(parse_control(c) for c in args.control)
    overrides.update(lora_overrides(args))
    request = EditRequest.from_json_dict({**base, **overrides})
    return request.validate(), args.model or model or "original"


def describe_layout(request) -> str:
    """'target at 9; start image at 0; zero post latent at 10; 2x context at 11-12; 4x context at 13-28'."""
    parts = []
    for what, idx in request.layout().positions(request.window).items():
        name = "start image" if what == "control 1" else what
        parts.append(f"{name} at {idx[0]}" + (f"-{idx[-1]}" if len(idx) > 1 else ""))
    return "; ".join(parts)


def _edit(args: argparse.Namespace) -> int:
    from framepack.app.cli import _Progress, cancel_on_ctrl_c, load_for
    from framepack.events import CancelToken, JobPlanned
    from framepack.oneframe import check_edit
    from framepack.pipeline import GenerationInterrupted
    from framepack.registry import get_spec

    request, model = build_edit_request(args)
    plan = check_edit(request, get_spec(model))  # every input and index checked before the weights load
    if request.loras:
        from framepack.lora import LoraLibrary

        LoraLibrary(args.lora_dir).check(request.loras)
    from framepack.outputs import check_output

    check_output(request, ".png")
    print(f"layout: {describe_layout(request)}", file=sys.stderr)
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    pipe = load_for(args, model)
    cancel = CancelToken()
    bar = _Progress(args.quiet)

    def progress(event) -> None:
        if not isinstance(event, JobPlanned):  # the layout and notes are printed above
            bar(event)

    try:
        with cancel_on_ctrl_c(cancel, "nothing (an edit is one image)"):
            result = pipe.edit(request, on_event=progress, cancel=cancel)
    except GenerationInterrupted:
        bar.close()
        print("interrupted: no image written", file=sys.stderr)
        return 130
    finally:
        bar.close()
    if result.image is None:
        print(f"{result.status}: no image written")
        return 1
    seen = ", ".join(str(p) for p in result.controls)
    extra = f"; control images as the model saw them: {seen}" if seen else ""
    took = result.timings.get("total_s", 0)
    print(f"{result.status}: {result.image} — {result.width}x{result.height} in {took:.1f} s; settings in "
          f"{result.metadata} (and in the PNG){extra}")  # fmt: skip
    return 0
