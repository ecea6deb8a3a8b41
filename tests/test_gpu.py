"""GPU checks: every method trains on CUDA (bf16 autocast), cached methods read the CPU-held cache, and the
SAE tools run on the GPU. Skipped without CUDA (CI has none); run on a GPU machine with `pytest tests/test_gpu.py`."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpu_world(tmp_path_factory):
    """The quick world (reused from data/world-quick when built there) and a TopK SAE trained on the GPU."""
    import quick_world

    from featalign.sae.train import SAETrainConfig, train_sae
    from featalign.world import WorldConfig, build_world, world_paths

    path = os.path.join(ROOT, "data", "world-quick")
    if quick_world.committed_is_current() and not os.path.exists(os.path.join(path, "world.json")):
        shutil.copytree(quick_world.ROOT, path, dirs_exist_ok=True)  # the committed copy: no minutes of training
    build_world(path, WorldConfig.quick(), progress=False)
    wp = world_paths(path)
    sae_dir = str(tmp_path_factory.mktemp("sae") / "topk")
    sae, report = train_sae(
        SAETrainConfig(
            model=wp["sft"],
            data=wp["sft_text"],
            layer=2,
            out=sae_dir,
            d_sae=256,
            k=32,
            tokens=100_000,
            eval_tokens=10_000,
            progress=False,
            device="cuda",
        )
    )
    return {**wp, "sae": sae_dir, "sae_report": report}


def test_sae_trains_on_the_gpu(gpu_world):
    r = gpu_world["sae_report"]
    assert r["explained_variance"] > 0.8 and r["l0"] == pytest.approx(32)


@pytest.mark.parametrize("method", ["dpo", "ipo", "dpo_ln", "simpo", "tdpo1", "tdpo2", "trdpo", "fpo"])
def test_every_method_trains_on_cuda(gpu_world, tmp_path, method):
    out = tmp_path / method
    cmd = [
        sys.executable,
        "-m",
        "featalign",
        "train",
        "--method",
        method,
        "--model",
        gpu_world["sft"],
        "--data",
        gpu_world["train"],
        "--out",
        str(out),
        "--max-steps",
        "4",
        "--batch-size",
        "8",
        "--lr",
        "1e-4",
        "--no-progress",
        "--log-every",
        "2",
        "--max-length",
        "96",
        "--max-prompt-length",
        "32",
        "--trdpo-tau",
        "2",
    ]
    if method == "fpo":
        cmd += ["--sae", gpu_world["sae"], "--layer", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 4 and all(v == v for v in s["final"].values() if isinstance(v, float))
    assert s["reference_model_loaded"] == (method in ("tdpo1", "tdpo2", "trdpo"))


def test_sae_tools_on_cuda(gpu_world, tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "featalign",
            "sae",
            "match",
            gpu_world["sae"],
            gpu_world["sae"],
            "--device",
            "cuda",
            "--model",
            gpu_world["sft"],
            "--data",
            gpu_world["sft_text"],
            "--out",
            str(tmp_path / "m"),
            "--max-tokens",
            "2000",
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "m" / "match.json").read_text())["confident_fraction"] == 1.0
