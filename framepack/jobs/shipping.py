"""Job folders sent to a worker that cannot see the head's outputs folder, and what it made sent back.

A worker on a node without the shared outputs folder gets the job's folder as a `bundle` (every file,
by path relative to the folder, except the head's own records) and runs it in a scratch folder of its
own. After every finished section, and at the end, `FolderSync.changes()` gives what changed since the
last time (new or modified files, removed ones); the head applies it to the real job folder with
`apply_changes`: each file written beside its place and renamed over it, the resume state last, so a
head that dies half way through keeps a state that is not newer than the video (the order the engine
itself writes in). LoRA files travel once per worker (`LoraShipment`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from framepack.jobs.records import RECORD, STATE_DIR

LEASE = ".worker-lease"  # which run of the job may write its folder (framepack.jobs.ray_runner)
HEAD_ONLY = frozenset({RECORD, LEASE})  # the head's files in a job folder: never sent, never overwritten


class ShippingError(Exception):
    """A bundle or change set that does not fit the job folder (a path outside it)."""


def _files(folder: Path) -> Iterable[tuple[str, Path]]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            rel = path.relative_to(folder).as_posix()
            if rel not in HEAD_ONLY:
                yield rel, path


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def bundle(folder: Path) -> dict[str, bytes]:
    """Every file of a job folder (inputs, resume state, partial video, checkpoints) by relative path."""
    return {rel: path.read_bytes() for rel, path in _files(folder)}


def moved(rel: str, data: bytes, moves: Iterable[tuple[Path | str, Path | str]]) -> bytes:
    """A shipped file as it reads in its new place: in JSON files (resume state, sidecar, checkpoint
    index) the paths inside each (old, new) folder pair's old folder name the new one; other files are
    unchanged."""
    moves = [(old, new) for old, new in moves if old and new and str(old) != str(new)]
    if not rel.endswith(".json") or not moves:
        return data
    text = data.decode("utf-8")
    escape = lambda p: json.dumps(os.path.abspath(p))[1:-1]  # noqa: E731  (as the path appears inside a string)
    for old, new in moves:
        pattern = re.compile(re.escape(escape(old)) + r'(?=[/"\\])')
        text = pattern.sub(lambda _, n=new: escape(n), text)
    return text.encode("utf-8")


def _target(folder: Path, rel: str) -> Path:
    """The file `rel` names inside `folder`; ShippingError for anything that would leave it."""
    parts = PurePosixPath(rel).parts
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts) or "\x00" in rel:
        raise ShippingError(f"refusing the shipped path {rel!r}: not a plain path inside the job folder")
    return folder.joinpath(*parts)


def unpack(folder: Path, files: dict[str, bytes], moves: Iterable[tuple[Path | str, Path | str]] = ()) -> None:
    """Write a bundle into an empty scratch folder (`moves`: the head's folders whose paths in the JSON
    files become the worker's: the job folder, the LoRA folder)."""
    moves = list(moves)
    for rel, data in files.items():
        path = _target(folder, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(moved(rel, data, moves))


@dataclass
class Changes:
    root: str  # the worker's folder they were made in (its paths in JSON files become the head's)
    lora_root: str | None = None  # the worker's LoRA folder (likewise)
    files: dict[str, bytes] = field(default_factory=dict)  # new or modified, by relative path
    deleted: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.files or self.deleted)

    @property
    def bytes(self) -> int:
        return sum(len(d) for d in self.files.values())


class FolderSync:
    """What changed in a scratch job folder since the last `changes()` (the first call: since `start`)."""

    def __init__(self, folder: Path, lora_folder: Path | None = None) -> None:
        self.folder, self.lora_folder = folder, lora_folder
        self._seen = {rel: _stamp(path) for rel, path in _files(folder)}

    def changes(self) -> Changes:
        now = {rel: (path, _stamp(path)) for rel, path in _files(self.folder)}
        out = Changes(str(self.folder), str(self.lora_folder) if self.lora_folder else None)
        for rel, (path, stamp) in now.items():
            if self._seen.get(rel) != stamp:
                out.files[rel] = path.read_bytes()
        out.deleted = sorted(set(self._seen) - set(now))
        self._seen = {rel: stamp for rel, (_, stamp) in now.items()}
        return out


def apply_changes(folder: Path, changes: Changes, lora_folder: Path | None = None) -> None:
    """Make the head's job folder match the worker's: files first, the resume state's last, then removals.
    `lora_folder`: the head's, which the worker's LoRA paths become."""
    moves = [(changes.root, folder), (changes.lora_root, lora_folder)]
    state = f"{STATE_DIR}/"
    order = sorted(changes.files, key=lambda rel: (rel.startswith(state), rel))
    for rel in order:
        path = _target(folder, rel)
        if rel in HEAD_ONLY:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.shipping")
        tmp.write_bytes(moved(rel, changes.files[rel], moves))
        os.replace(tmp, path)
    for rel in changes.deleted:
        if rel not in HEAD_ONLY:
            path = _target(folder, rel)
            path.unlink(missing_ok=True)
            for parent in path.parents:  # folders the worker emptied (the resume state of a finished job)
                if parent == folder or not parent.is_relative_to(folder):
                    break
                try:
                    parent.rmdir()
                except OSError:  # not empty
                    break


class LoraShipment:
    """The LoRA files a worker has been sent (by name in the LoRA folder, size and mtime), so each one
    travels once per worker; `missing(worker, paths)` gives the ones to send now."""

    def __init__(self, lora_folder: Path) -> None:
        self.root = lora_folder
        self._sent: dict[str, set[tuple[str, int, int]]] = {}

    def missing(self, worker: str, paths: Iterable[str]) -> dict[str, bytes]:
        sent = self._sent.setdefault(worker, set())
        out = {}
        for p in paths:
            path = Path(p)
            rel = path.relative_to(self.root).as_posix()
            key = (rel, *_stamp(path))
            if key not in sent:
                out[rel] = path.read_bytes()
                sent.add(key)
        return out

    def forget(self, worker: str) -> None:
        self._sent.pop(worker, None)
