"""How the front ends word a job's progress: stage labels (the official page's, spec §7) and one line
per job (the UI's progress text and the API's `progress.text`). The job layer keeps only the numbers."""

from __future__ import annotations

from framepack.config import EditRequest

# The official page's wording for the stages before sampling (spec §7), where it has one.
STAGE_LABELS = {"loading": "Loading the model", "text encoding": "Text encoding",
                "image processing": "Image processing", "vae encoding": "VAE encoding",
                "image encoding": "Image encoding (SigLIP)", "sampling": "Sampling", "decoding": "Decoding",
                "writing": "Writing"}  # fmt: skip


def stage_label(stage: str | None) -> str:
    return STAGE_LABELS.get(stage or "", (stage or "starting").capitalize())


def describe_progress(progress: dict) -> str:
    """One human line for a job's latest progress (used by the UI and the API's `progress.text`)."""
    stage = progress.get("stage")
    if not stage:
        return ""
    if progress.get("kind") == EditRequest.kind:  # one frame: no sections or frames to count
        step = f" step {progress['step']}/{progress['steps']}" if stage == "sampling" and progress.get("steps") else ""
        return f"Frame edit · {stage_label(stage).lower()}{step}"
    frames, seconds = progress.get("frames") or 0, progress.get("seconds") or 0.0
    so_far = f"{frames} frames ({seconds:.2f} s) so far" if frames else "no frames yet"
    if progress.get("sections") and progress.get("section") is not None:
        where = f"Section {progress['section'] + 1}/{progress['sections']}"
        if stage == "sampling" and progress.get("steps"):
            return f"{where} · sampling step {progress['step']}/{progress['steps']} · {so_far}"
        return f"{where} · {stage_label(stage).lower()} · {so_far}"
    return f"{stage_label(stage)} ..."
