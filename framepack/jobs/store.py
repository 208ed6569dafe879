"""The job store: the one source of truth for which jobs exist and where they stand.

    OUTPUTS/jobs.sqlite3        the queue and history (SQLite, WAL: readers never wait for the worker)
    OUTPUTS/jobs.lock           held (flock) by the one process serving this folder
    OUTPUTS/jobs/<id>/job.json  a copy of the job's record, rewritten on every state change

Every operation is a short transaction on one connection behind the queue's lock, so concurrent callers
always see a consistent queue; no job is lost or claimed twice. A damaged database is moved aside and
rebuilt from the job folders' job.json; a missing or damaged job folder or record is reported in that
job's entry (state "failed" with an error) and in `problems`, never fatal. An outcome the disk refuses
to take (a full disk) is kept in memory (`finish`) and written as soon as it can be (`flush`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from framepack.jobs.records import (
    DB_NAME,
    INPUT,
    RECORD,
    RESUMABLE,
    STATES,
    Job,
    JobError,
    JobNotFound,
    StorageFull,
)
from framepack.outputs import disk_full_message, is_disk_full, write_atomically
from framepack.outputs import job_id as new_job_id

ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    options TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    progress TEXT NOT NULL DEFAULT '{}',
    result TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    video TEXT,
    metadata TEXT,
    parent TEXT,
    branch TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, seq);
"""
_COLUMNS = ("id", "seq", "state", "model", "request", "options", "created", "started", "finished", "progress",
            "result", "error", "video", "metadata", "parent", "branch")  # fmt: skip
_JSON_COLUMNS = ("request", "options", "progress", "result")


class JobStore:
    """Jobs in SQLite (WAL) plus each job folder's job.json. `lock` is the queue's (shared with its event
    log, so state changes and their events stay in order); `live(job_id)` gives a running job's latest
    progress, fresher than the database's."""

    def __init__(self, outputs: Path, jobs_dir: Path, *, default_model: str, lock: threading.RLock,
                 live: Callable[[str], dict | None]) -> None:  # fmt: skip
        self.outputs, self.jobs_dir = outputs, jobs_dir
        self.default_model = default_model
        self._lock, self._live = lock, live
        self.problems: list[str] = []
        self.storage_problem: str | None = None  # why writes wait (a full disk), for the front ends
        self._unsaved: dict[str, dict] = {}  # job id -> columns of a finished run not yet in the database
        self._db = self._open_db()

    # ------------------------------------------------------------------------------- reading
    def get(self, job_id: str) -> Job:
        with self._lock:
            row = self._row(job_id)
            position = None
            if row["state"] == "queued":
                position = self._db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < ?", (row["seq"],)
                ).fetchone()[0]
            return self._job(row, position)

    def list(self) -> list[Job]:
        """Queued jobs first in run order, then the others, running first, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
            out, position = [], 0
            for row in rows:
                if row["state"] == "queued":
                    out.append(self._job(row, position))
                    position += 1
            others = [self._job(r, None) for r in rows if r["state"] != "queued"]
        others.sort(key=lambda j: (j.state != "running", -j.created))
        return out + others

    def queued_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq")]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT id, state FROM jobs").fetchall()
            states = [self._unsaved.get(i, {}).get("state", state) for i, state in rows]
        return {state: states.count(state) for state in sorted(set(states))}

    # ------------------------------------------------------------------------------- writing
    def insert(self, job_id: str, model: str, stored: dict, options: dict, parent: str | None,
               branch: dict | None = None) -> Job:  # fmt: skip
        """A new queued job (its folder exists), last in the queue; its record written."""
        with self._lock:
            with self.write() as db:
                db.execute(
                    "INSERT INTO jobs (id, seq, state, model, request, options, created, parent, branch)"
                    " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                    (job_id, self.next_seq(db), model, json.dumps(stored), json.dumps(options), time.time(), parent,
                     json.dumps(branch) if branch else None),
                )  # fmt: skip
            job = self.get(job_id)
            self.save_record(job)
            return job

    def update(self, job_id: str, **columns: Any) -> Job:
        """Set columns of a job (JSON columns given as dicts) and rewrite its record."""
        values = {k: json.dumps(v) if k in _JSON_COLUMNS else v for k, v in columns.items()}
        with self._lock:
            with self.write() as db:
                cols = ", ".join(f"{c} = ?" for c in values)
                db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*values.values(), job_id))
            job = self.get(job_id)
            self.save_record(job)
            return job

    def requeue(self, job_ids: list[str]) -> None:
        """Give these jobs the next queue positions, in this order (records rewritten)."""
        with self._lock:
            with self.write() as db:
                base = self.next_seq(db)
                db.executemany("UPDATE jobs SET seq = ? WHERE id = ?", [(base + i, j) for i, j in enumerate(job_ids)])
            for j in job_ids:  # the new order is in every record too, so a rebuilt database keeps it
                self.save_record(self.get(j))

    def return_to_queue(self, job_id: str) -> Job:
        """A claimed job goes back to the front of the queue (its run was lost with its worker): it runs
        next and, from its resume state, continues after its last finished section."""
        with self._lock:
            with self.write() as db:
                first = db.execute("SELECT MIN(seq) FROM jobs WHERE state = 'queued'").fetchone()[0]
                seq = self.next_seq(db) if first is None else first - 1
                db.execute("UPDATE jobs SET state = 'queued', seq = ?, started = NULL, finished = NULL, error = NULL"
                           " WHERE id = ?", (seq, job_id))  # fmt: skip
            self._unsaved.pop(job_id, None)
            job = self.get(job_id)
            self.save_record(job)
            return job

    def claim(self, ready: Callable[[str], bool]) -> Job | None:
        """The first queued job, marked running in one transaction (never claimed twice); None if there
        is none or `ready(job_id)` says it must wait (for disk space)."""
        with self._lock:
            row = self._db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None or not ready(row[0]):
                return None
            with self.write() as db:
                db.execute("UPDATE jobs SET state = 'running', started = ?, progress = '{}' WHERE id = ?",
                           (time.time(), row[0]))  # fmt: skip
            job = self.get(row[0])
        self.save_record(job)
        return job

    def finish(self, job_id: str, changes: dict) -> None:
        """A run's outcome. Kept in memory until it is in the database (a full disk can refuse the write):
        the job is never left "running", and `flush` writes it as soon as the disk allows."""
        with self._lock:
            self._unsaved[job_id] = {k: json.dumps(v) if k in _JSON_COLUMNS else v for k, v in changes.items()}
            if not self.flush():
                self.save_record(self.get(job_id))

    def flush(self) -> bool:
        """Write the outcomes a full disk held back; False while the database still cannot be written."""
        with self._lock:
            for job_id, changes in list(self._unsaved.items()):
                try:
                    with self.write() as db:
                        cols = ", ".join(f"{c} = ?" for c in changes)
                        db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*changes.values(), job_id))
                except (sqlite3.Error, StorageFull) as err:
                    self.storage_problem = f"the job database cannot be written ({err}); outcomes wait in memory"
                    return False
                del self._unsaved[job_id]
                self.save_record(self.get(job_id))
            return True

    def delete(self, job_id: str) -> None:
        with self._lock:
            with self.write() as db:
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            self._unsaved.pop(job_id, None)

    def save_progress(self, job_id: str, progress: dict) -> None:
        """The latest progress, best effort (a full disk only loses the database's copy)."""
        with contextlib.suppress(sqlite3.Error, StorageFull), self.write() as db:
            db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(progress), job_id))

    def save_record(self, job: Job) -> None:
        """job.json in the job's folder: lets a lost or damaged database be rebuilt."""
        folder = self.jobs_dir / job.id
        if not folder.is_dir():
            return
        record = {k: v for k, v in job.to_dict().items() if k not in ("position", "resumable")}  # with seq
        text = json.dumps(record, indent=1) + "\n"
        with contextlib.suppress(OSError):
            write_atomically(folder / RECORD, lambda tmp: tmp.write_text(text))

    def new_folder(self) -> Path:
        for _ in range(100):
            folder = self.jobs_dir / new_job_id()
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            return folder
        raise JobError("could not find a free job id")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction. IMMEDIATE takes the write lock up front, so a second process on
        the same file waits (busy_timeout) instead of failing half way."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")  # a full disk fails here: roll back, or every later write fails
                except BaseException:
                    if self._db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as err:
                if is_disk_full(err):
                    raise StorageFull(f"{disk_full_message(self.outputs)} (the job database cannot grow)") from err
                raise

    def next_seq(self, db: sqlite3.Connection) -> int:
        return db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]

    # ------------------------------------------------------------------------------- recovery
    def recover(self, output_of: Callable[[Job], str | None], *, requeue: bool = False) -> None:
        """At startup: jobs left running died with their process (interrupted, or with `requeue` back at
        the front of the queue); re-import folders the database lacks; report jobs whose folder or files
        are gone (`output_of(job)`: its result file, when done)."""
        with self.write() as db:
            died = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = 'running' ORDER BY seq")]
            if not requeue:
                db.execute(
                    "UPDATE jobs SET state = 'interrupted', finished = ?, error = ? WHERE state = 'running'",
                    (time.time(), "the server stopped while this job was running; resume to continue"),
                )
        for job_id in reversed(died) if requeue else died:
            if requeue:
                self.return_to_queue(job_id)
                self.problems.append(f"job {job_id} was running when the server stopped: back in the queue, it "
                                     "resumes from its last finished section")  # fmt: skip
            else:
                self.problems.append(f"job {job_id} was running when the server stopped: now interrupted (resumable)")
                self.save_record(self.get(job_id))
        known = {r[0]: r for r in self._db.execute("SELECT id, state FROM jobs")}
        for folder in sorted(p for p in self.jobs_dir.iterdir() if p.is_dir()):
            if folder.name not in known and ID.match(folder.name):
                self._import_folder(folder)
        for job_id, state in known.values():
            folder = self.jobs_dir / job_id
            error, output = None, output_of(self.get(job_id)) if state == "done" else None
            if not folder.is_dir():
                error = f"the job folder {folder} is missing"
            elif state in ("queued", "interrupted") and not (folder / INPUT).is_file():
                error = f"the job's input image {folder / INPUT} is missing"
            elif output and not (self.jobs_dir / output).is_file():
                what = "video" if output.endswith(".mp4") else "image"
                error = f"the job's {what} {self.jobs_dir / output} is missing"
            if error:
                self.problems.append(f"job {job_id}: {error}")
                with self.write() as db:
                    db.execute("UPDATE jobs SET state = 'failed', error = ? WHERE id = ?", (error, job_id))
                self.save_record(self.get(job_id))
        for job in self.list():
            if job.terminal and job.error and job.error.startswith("the job's record"):
                self.problems.append(f"job {job.id}: {job.error}")

    def _import_folder(self, folder: Path) -> None:
        seq = None  # the record's queue position (a reorder survives the rebuild), else after the others
        try:
            record = json.loads((folder / RECORD).read_text())
            if not isinstance(record, dict) or not isinstance(record.get("request"), dict):
                raise ValueError("not a job record")
            state = record.get("state")
            state = "interrupted" if state == "running" else state if state in STATES else "failed"
            values = (folder.name, state, str(record.get("model") or self.default_model),
                      json.dumps(record["request"]), json.dumps(record.get("options") or {}),
                      float(record.get("created") or folder.stat().st_mtime), record.get("started"),
                      record.get("finished"), json.dumps(record.get("progress") or {}),
                      json.dumps(record.get("result") or {}), record.get("error"), record.get("video"),
                      record.get("metadata"), record.get("parent"),
                      json.dumps(record["branch"]) if isinstance(record.get("branch"), dict) else None)  # fmt: skip
            seq = record.get("seq")
            self.problems.append(f"job {folder.name}: re-imported from its {RECORD}")
        except (OSError, ValueError, TypeError) as err:
            error = f"the job folder {folder} has no readable {RECORD} ({err})"
            self.problems.append(f"job {folder.name}: {error}")
            values = (folder.name, "failed", self.default_model, "{}", "{}", folder.stat().st_mtime, None, None,
                      "{}", "{}", error, None, None, None, None)  # fmt: skip
        with self.write() as db:
            seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0 else self.next_seq(db)
            db.execute(
                "INSERT INTO jobs (id, seq, state, model, request, options, created, started, finished, progress,"
                " result, error, video, metadata, parent, branch)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (values[0], seq, *values[1:]),
            )

    # ------------------------------------------------------------------------------- internals
    def _open_db(self) -> sqlite3.Connection:
        path = self.outputs / DB_NAME
        try:
            db = _connect(path)
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("integrity check failed")
            return db
        except sqlite3.DatabaseError as err:
            with contextlib.suppress(Exception):
                db.close()
            aside = path.with_name(f"{DB_NAME}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(path) + suffix)
                if src.exists():
                    os.replace(src, Path(str(aside) + suffix))
            self.problems.append(f"the job database {path} was damaged ({err}); moved to {aside.name} and "
                                 "rebuilt from the job folders")  # fmt: skip
            return _connect(path)

    def _row(self, job_id: str) -> sqlite3.Row:
        if not isinstance(job_id, str) or not ID.match(job_id):
            raise JobNotFound(f"no job {job_id!r}")
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return row

    def _job(self, row: sqlite3.Row, position: int | None) -> Job:
        fields = dict(zip(_COLUMNS, tuple(row)))
        fields.update(self._unsaved.get(fields["id"], {}))  # an outcome the full disk did not let us write yet
        problem = None
        for name in _JSON_COLUMNS:
            try:
                value = json.loads(fields[name] or "{}")
                if not isinstance(value, dict):
                    raise ValueError(f"expected an object, found {type(value).__name__}")
                fields[name] = value
            except ValueError as err:
                fields[name] = {}
                problem = f"the job's record is damaged ({name}: {err})"
        state = fields["state"] if fields["state"] in STATES else "failed"
        if state != fields["state"]:
            problem = f"the job's record has an unknown state {fields['state']!r}"
        if problem:
            state = "failed"
        live = self._live(fields["id"])
        progress = dict(live) if live is not None else fields["progress"]
        folder = self.jobs_dir / fields["id"]
        resumable = state in RESUMABLE and problem is None and (folder / INPUT).is_file()
        return Job(
            id=fields["id"], state=state, model=fields["model"], request=fields["request"], options=fields["options"],
            created=fields["created"], started=fields["started"], finished=fields["finished"],
            position=position if state == "queued" else None, progress=progress, result=fields["result"],
            error=problem or fields["error"], video=fields["video"], metadata=fields["metadata"],
            parent=fields["parent"], resumable=resumable, seq=fields["seq"], branch=_branch_info(fields["branch"]),
        )  # fmt: skip


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) and short.
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses nothing it committed
    db.execute("PRAGMA busy_timeout=10000")
    db.executescript(_SCHEMA)
    if "branch" not in {r[1] for r in db.execute("PRAGMA table_info(jobs)")}:  # a database of an older version
        db.execute("ALTER TABLE jobs ADD COLUMN branch TEXT")
    return db


def _branch_info(text: str | None) -> dict | None:
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class FolderLock:
    """One process per outputs folder (flock on jobs.lock): two workers on one queue would run jobs twice."""

    def __init__(self, path: Path) -> None:
        self._fh: Any = open(path, "a+")  # held open (and locked) for the queue's lifetime
        try:
            import fcntl
        except ImportError:  # Windows: no flock; one server per folder is then the user's responsibility
            return
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "another process"
            self.close()
            raise JobError(f"{path.parent} is already served by {holder}; use another --outputs folder") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"pid {os.getpid()}\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the file releases the flock
            self._fh = None
