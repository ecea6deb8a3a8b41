"""Jobs killed with SIGKILL mid-run resume from what they wrote atomically and end where an
uninterrupted run ends. Real subprocesses, really killed."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file


def _kill_when(cmd, ready, timeout=120):
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    t0 = time.time()
    while not ready() and proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights(world, tmp_path):
    base = [
        sys.executable,
        "-m",
        "featalign",
        "train",
        "--method",
        "dpo",
        "--model",
        world["sft"],
        "--data",
        world["train"],
        "--lr",
        "1e-4",
        "--batch-size",
        "4",
        "--max-steps",
        "30",
        "--save-every",
        "5",
        "--log-every",
        "5",
        "--max-length",
        "96",
        "--max-prompt-length",
        "32",
        "--no-progress",
        "--no-tensorboard",
        "--seed",
        "3",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(base + ["--out", str(tmp_path / "full")], check=True, capture_output=True, env=env)
    out = tmp_path / "killed"
    state = out / "checkpoint" / "trainer_state.json"
    rc = _kill_when(base + ["--out", str(out)], lambda: state.exists())
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "final").exists()
    subprocess.run(base + ["--out", str(out)], check=True, capture_output=True, env=env)
    want = load_file(tmp_path / "full" / "final" / "model.safetensors")
    got = load_file(out / "final" / "model.safetensors")
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-5), k
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in open(out / "metrics.jsonl")]
    assert steps == list(range(5, 31, 5))  # no step logged twice


@pytest.mark.slow
def test_killed_cache_build_resumes_without_redoing_shards(world, world_sae, tmp_path):
    out = tmp_path / "cache"
    cmd = [
        sys.executable,
        "-m",
        "featalign",
        "cache",
        "--model",
        world["sft"],
        "--data",
        world["train"],
        "--sae",
        world_sae["path"],
        "--layer",
        "2",
        "--out",
        str(out),
        "--shard-size",
        "40",
        "--batch-size",
        "8",
    ]
    rc = _kill_when(cmd, lambda: len(list(out.glob("shard-*.safetensors"))) >= 2)
    assert rc == -signal.SIGKILL
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    assert 2 <= len(done) < 15  # 600 pairs / 40 per shard: killed part-way
    assert (out / "manifest.json").exists() and '"complete": false' in (out / "manifest.json").read_text()
    subprocess.run(cmd, check=True, capture_output=True)
    for name, mtime in done.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was recomputed"
    from featalign.reference import ReferenceCache

    assert ReferenceCache(str(out)).n == 600
