"""One video on several ranks (framepack/parallel.py): Ulysses sequence parallel and CFG parallel over
torch.distributed with gloo, ranks as CPU processes, checked against the single-process result."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from apphelpers import home, wait_until, write_png, write_tiny_lora
from parallelhelpers import TINY4, equality_rank
from safetensors.torch import load_file

from framepack import parallel
from framepack.video import probe


def run_ranks(world: int, target, timeout: float = 180) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = parallel.free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        out = results.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert "error" not in out, out["error"]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_the_transformer_on_several_ranks_equals_one_process(world):
    out = run_ranks(world, equality_rank)
    for case in ("f1", "original", "padded", "batch2", "batch2-cfg", "text-split"):
        assert out[case] < 1e-5, (case, out)  # fp32, 107 image tokens: padded to 108 for either degree
    assert out["calls"] == 6


def test_a_degree_that_does_not_divide_the_heads_is_refused():
    with pytest.raises(parallel.ParallelError, match=r"--gpus 5 does not divide the model's 24 attention heads"
                       r".*\(use 1, 2, 3, 4, 6, 8\)"):  # fmt: skip
        parallel.check_degree(5, 24)
    with pytest.raises(parallel.ParallelError, match="--gpus 3 does not divide the model's 4 attention heads"):
        parallel.check_degree(3, TINY4.num_attention_heads)
    parallel.check_degree(4, 24)
    parallel.check_degree(6, 24, cfg_parallel=True)


def test_more_gpus_than_devices_is_refused():
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(parallel.ParallelError, match=rf"--gpus {have + 1} but this machine has {have} CUDA device"):
        parallel.check_devices(have + 1, "cuda")
    parallel.check_devices(64, "cpu")  # CPU ranks: as many processes as asked


# ------------------------------------------------------------------------------- whole videos (CLI)
def generate(out: Path, *extra: str, home: str, wait: bool = True, **popen):
    """`framepack generate` on the tiny model, CPU: a 2-section video (out/v.mp4)."""
    out.mkdir(parents=True, exist_ok=True)
    write_png(out / "in.png")
    cmd = [sys.executable, "-m", "framepack.app.cli", "generate", "--device", "cpu", "--image", str(out / "in.png"),
           "--prompt", "a red square slides", "--steps", "3", "--seconds", "2.4", "--out", str(out / "v.mp4"),
           "--quiet", "--model", "tiny", *extra]  # fmt: skip
    env = {**os.environ, "FRAMEPACK_HOME": home}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def section_latents(video: Path) -> list[torch.Tensor]:
    """The generated latents of every section (fp32, before the VAE), from the video's checkpoints."""
    folder = video.parent / f".{video.stem}.sections"
    return [load_file(str(f))["generated"] for f in sorted(folder.glob("section-*.safetensors"))]


@pytest.fixture(scope="module")
def app_home(tmp_path_factory):
    return home(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, app_home):
    """reference(model, *flags): the single-process video's folder for those flags, made once per module."""
    made: dict = {}

    def get(*flags: str) -> Path:
        if flags not in made:
            out = tmp_path_factory.mktemp("one-process")
            r = generate(out, *flags, home=app_home)
            assert r.returncode == 0, r.stderr[-2000:]
            made[flags] = out
        return made[flags]

    return get


@pytest.mark.parametrize("model,extra", [("tiny", ()), ("tiny-f1", ("--cfg", "3", "--cache", "none"))],
                         ids=["original-ulysses", "f1-cfg-parallel"])  # fmt: skip
def test_a_video_on_two_ranks_equals_the_single_process_video(tmp_path, app_home, reference, model, extra):
    """The original schedule with TeaCache on (Ulysses over both ranks), and F1 at cfg 3 (the two passes
    at once, one per rank): the latents before the VAE equal the single process's to 1e-5."""
    one = reference("--model", model, *extra)
    two = generate(tmp_path / "two", "--model", model, *extra, "--gpus", "2", home=app_home)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = section_latents(one / "v.mp4"), section_latents(tmp_path / "two" / "v.mp4")
    assert len(a) == len(b) == 2
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) < 1e-5
    speed = json.loads((tmp_path / "two" / "v.json").read_text())["speed"]
    assert speed["parallel"] == {"ranks": 2, "cfg_parallel": bool(extra), "note": None}
    assert "cfg_parallel" not in json.dumps(json.loads((one / "v.json").read_text())["speed"])


def test_a_lora_is_merged_on_every_rank(tmp_path, app_home, reference):
    """--lora with --gpus 2: the follower merges the same file and weight, so the latents equal the
    single process's with that LoRA (and differ from those without it)."""
    lora = write_tiny_lora(Path(app_home) / "ranks-lora" / "style.safetensors")
    flags = ("--model", "tiny", "--lora", f"{lora}:0.8")
    one = reference(*flags)
    two = generate(tmp_path / "two", *flags, "--gpus", "2", home=app_home)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = section_latents(one / "v.mp4"), section_latents(tmp_path / "two" / "v.mp4")
    assert len(a) == len(b) == 2 and max((x - y).abs().max().item() for x, y in zip(a, b)) < 1e-5
    plain = section_latents(reference("--model", "tiny") / "v.mp4")
    assert (plain[0] - b[0]).abs().max().item() > 1e-3  # the LoRA did change the result


def test_a_rank_dying_mid_job_stops_rank_0_with_a_clear_error_and_keeps_the_finished_sections(tmp_path, app_home):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "run"
    proc = generate(out, "--gpus", "2", "--seconds", "4", "--steps", "12", home=app_home, wait=False)
    try:
        wait_until(lambda: (out / ".v.sections" / "section-0001.safetensors").is_file() or proc.poll() is not None,
                   120, "the first section")  # fmt: skip
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        followers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())
                     and "resource_tracker" not in " ".join(c.cmdline())]  # fmt: skip
        assert len(followers) == 1
        followers[0].kill()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "rank 1 of 2 exited with code -9 while" in lines[0], err[-2000:]
    kept = re.search(r"v\.mp4 holds the (\d+) frames finished", err)  # the first section's: the partial MP4
    assert kept and probe(out / "v.mp4")["frames"] == int(kept.group(1)) > 0, err[-2000:]  # survives, playable


@pytest.mark.parametrize("flags,message", [
    (("--gpus", "3"), "error: --gpus 3 does not divide the model's 2 attention heads"),
    (("--gpus", "2", "--device", "cuda"), "error: --gpus 2 but this machine has 0 CUDA devices"),
    (("--gpus", "0"), "error: --gpus must be at least 1, got 0"),
])  # fmt: skip
def test_impossible_gpu_counts_are_one_line_errors(tmp_path, app_home, flags, message, capsys, monkeypatch):
    from framepack.app import cli

    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has CUDA devices")
    monkeypatch.setenv("FRAMEPACK_HOME", app_home)
    write_png(tmp_path / "in.png")
    code = cli.main(["generate", "--device", "cpu", "--image", str(tmp_path / "in.png"), "--prompt", "x", "--steps",
                     "3", "--seconds", "2.4", "--out", str(tmp_path / "v.mp4"), "--quiet", "--model", "tiny",
                     *flags])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1].startswith(message), err[-2000:]
    assert not (tmp_path / "v.mp4").exists()


def test_the_memory_planner_gives_each_rank_its_share_of_the_activations():
    from framepack.memory import _transformer_working
    from framepack.models.transformer import FramePackTransformer

    model = FramePackTransformer(TINY4)
    whole = _transformer_working(model, 80, 80, 9)  # the 640 bucket's latents: 1600 tokens a frame
    image = 11 * 1600 + 400 + 400  # window + 1x frames at 40 x 40; 2x: 1 frame of 20 x 20; 4x: 4 of 10 x 10
    per_token = whole / (image + 729 + 256)  # + SigLIP + the text allowance, kept whole on every rank
    for world in (2, 4):
        model.parallel = type("Hook", (), {"world": world})()
        assert _transformer_working(model, 80, 80, 9) == pytest.approx(per_token * (image / world + 985), rel=1e-4)


def test_torchrun_launches_the_same_run(tmp_path, app_home, reference):
    torchrun = Path(sys.executable).with_name("torchrun")
    one = reference("--model", "tiny")
    out = tmp_path / "two"
    out.mkdir()
    write_png(out / "in.png")
    r = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "framepack.app.cli", "generate", "--device",
                        "cpu", "--image", str(out / "in.png"), "--prompt", "a red square slides", "--steps", "3",
                        "--seconds", "2.4", "--out", str(out / "v.mp4"), "--quiet", "--model", "tiny"],
                       env={**os.environ, "FRAMEPACK_HOME": app_home}, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = section_latents(one / "v.mp4"), section_latents(out / "v.mp4")
    assert len(a) == len(b) == 2 and max((x - y).abs().max().item() for x, y in zip(a, b)) < 1e-5
    assert json.loads((out / "v.json").read_text())["speed"]["parallel"]["ranks"] == 2


def test_the_queue_runs_each_job_on_a_group_of_ranks(tmp_path, app_home, reference, monkeypatch):
    """`serve --gpus 2`: the queue's loader starts the follower rank with each model; a job's latents
    equal the single process's, a model switch stops the old group, a LoRA job runs on the group."""
    from apphelpers import png_bytes, write_tiny_lora

    from framepack.app.cli_parallel import RankGroupLoader
    from framepack.jobs import JobQueue
    from framepack.pipeline import PipelineLoader

    monkeypatch.setenv("FRAMEPACK_HOME", app_home)
    one = reference("--model", "tiny")
    loader = RankGroupLoader(PipelineLoader(device="cpu"), 2, "cpu")
    with JobQueue(tmp_path / "q", loader=loader, models=["tiny", "tiny-f1"], lora_dir=tmp_path / "loras") as q:
        params = {"prompt": "a red square slides", "steps": 3, "seconds": 2.4}
        job = q.wait(q.submit((one / "in.png").read_bytes(), params).id, 180)
        assert job.state == "done", job.error
        (launch,) = loader._launches.values()
        a, b = section_latents(one / "v.mp4"), section_latents(q.job_file(job.id, "video"))
        assert len(a) == len(b) == 2 and max((x - y).abs().max().item() for x, y in zip(a, b)) < 1e-5
        other = q.wait(q.submit(png_bytes(), {**params, "seconds": 1.2}, model="tiny-f1").id, 180)
        assert other.state == "done", other.error
        assert all(not p.is_alive() for p in launch.procs)  # the tiny model's group was stopped for tiny-f1's
        write_tiny_lora(tmp_path / "loras" / "s.safetensors")
        with_lora = q.wait(q.submit(png_bytes(), {**params, "seconds": 1.2, "loras": [{"path": "s.safetensors"}]},
                                    model="tiny-f1").id, 120)  # fmt: skip
        assert with_lora.state == "done", with_lora.error  # merged on both ranks (the CLI test compares the latents)
        assert json.loads((q.jobs_dir / with_lora.metadata).read_text())["loras"][0]["file"] == "s.safetensors"
    assert not loader._launches  # the queue's close released the last group
