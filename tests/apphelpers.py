"""Helpers for the app tests (job queue, API, UI, faults): tiny pipelines loaded once per test process,
a start image, bounded polling, and servers on 127.0.0.1 ephemeral ports that are always stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

_PIPES: dict[str, Any] = {}
_PIPES_LOCK = threading.Lock()

# Small and fast on 2 CPU cores: 2 steps, the tiny model's 64 px bucket; seconds chooses the section count.
FAST = {"prompt": "a red square slides", "steps": 2, "seconds": 1.2}


def home(tmp_path_factory) -> str:
    """FRAMEPACK_HOME shared by the app tests: the tiny model is generated once, prompts are cached."""
    return str(tmp_path_factory.getbasetemp() / "framepack-home-app")


def tiny_loader(model: str):
    """The JobQueue loader for tests: each tiny model is loaded once per test process."""
    from framepack.pipeline import load_pipeline

    with _PIPES_LOCK:
        if model not in _PIPES:
            _PIPES[model] = load_pipeline(model, device="cpu")
        return _PIPES[model]


def tiny_queue(folder: Path):
    """A JobQueue on the tiny models in `folder` (a generator for fixtures: yields it, then leaves no work
    behind for the next test and closes it)."""
    from framepack.jobs import JobQueue

    q = JobQueue(folder, loader=tiny_loader, models=["tiny", "tiny-f1"])
    yield q
    for job in q.list(["queued", "running"]):
        q.cancel(job.id)
    q.close()


def png_bytes(size: int = 64, seed: int = 0) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    x = np.full((size, size, 3), 30, np.uint8)
    x[size // 4 : size // 2, size // 8 : size // 2] = rng.integers(100, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, size: int = 64) -> Path:
    path.write_bytes(png_bytes(size))
    return path


def sse_events(client, url: str) -> list[dict]:
    """{type, id, data} of every Server-Sent Event of a stream, in order; ends when the server closes it."""
    import json

    events, current = [], {}
    with client.stream("GET", url, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                current["type"] = line[7:]
            elif line.startswith("id: "):
                current["id"] = int(line[4:])
            elif line.startswith("data: "):
                current["data"] = json.loads(line[6:])
            elif line == "" and current:
                events.append(current)
                current = {}
    return events


def cancel_after_first_section(queue, job_id: str, timeout: float = 60) -> None:
    """Follow a queued job's events and cancel it as soon as its first section is done."""
    seq = 0
    while True:
        events = queue.wait_events(job_id, seq, timeout=timeout)
        assert events, f"no progress within {timeout} s"
        seq = events[-1]["seq"]
        if any(e["type"] == "section" for e in events):
            queue.cancel(job_id)
            return


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class ThreadServer:
    """An ASGI app served by uvicorn in a thread on 127.0.0.1 (ephemeral port); `stop()` ends it."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        from framepack.app.api import bind, url_of

        self.sock = bind("127.0.0.1", 0)
        self.url = url_of(self.sock)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 20, "the test server to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


class ServerProcess:
    """`framepack serve` in a child process on an ephemeral loopback port."""

    def __init__(self, outputs: Path, env_home: str, *extra: str) -> None:
        env = {**os.environ, "FRAMEPACK_HOME": env_home, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "framepack.app.cli", "serve", "--model", "tiny", "--port", "0",
               "--outputs", str(outputs), *extra]  # fmt: skip
        self.log = outputs.parent / f"server-{time.monotonic_ns()}.log"
        self._log_fh = open(self.log, "w")  # closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log_fh, text=True, env=env)
        self.url = self._read_url(timeout=60)

    def _read_url(self, timeout: float) -> str:
        found: list[str] = []

        def read() -> None:
            for line in self.proc.stdout:
                m = re.search(r"(http://127\.0\.0\.1:\d+)/api/", line)
                if m:
                    found.append(m.group(1))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            self.stop()
            raise AssertionError(f"the server did not start within {timeout} s: {self.log.read_text()[-2000:]}")
        return found[0]

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log_fh.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self._log_fh.closed:
            self._log_fh.close()


def write_tiny_lora(path: Path, seed: int = 5) -> Path:
    """A kohya LoRA on the tiny transformer's first block's to_q (a 32 x 32 Linear), rank 4."""
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    key = "lora_unet_transformer_blocks_0_attn_to_q"
    save_file({f"{key}.lora_down.weight": torch.randn(4, 32, generator=g),
               f"{key}.lora_up.weight": torch.randn(32, 4, generator=g), f"{key}.alpha": torch.tensor(4.0)},
              str(path))  # fmt: skip
    return path
