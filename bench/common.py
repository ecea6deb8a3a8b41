"""Shared helpers for the benchmarks: a bench model (random-init Llama on the world tokenizer), device label,
peak memory, result files. Each measured configuration runs in its own process so peak memory is its own."""

from __future__ import annotations

import atexit
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.environ.get("FEATALIGN_BENCH_RESULTS") or os.path.join(ROOT, "bench", "results")


def scratch(prefix: str) -> str:
    """A temporary folder removed when the process exits: a benchmark's checkpoints and activations run to
    hundreds of MB each, and left behind they fill the disk that the next clean clone's setup needs."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def device_label() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {platform.machine()})"


def device() -> str:
    """Where a benchmark runs: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def parser(doc: str | None):
    """An argument parser whose description is the first paragraph of the script's docstring."""
    import argparse

    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])


def device_tag() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_mb() -> float:
    """Peak GPU memory allocated by torch on a GPU, else the process's peak resident set size (since the last
    ``reset_peak``)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Start ``peak_mb`` afresh (so building a model does not count as a step's peak); False where it cannot."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak resident set size
            f.write("5")
        return True
    except OSError:
        return False


def quick_world() -> dict:
    """The quick world in data/world-quick: a copy of the committed one the tests load when that is what today's code
    builds (no minutes of training), else built there."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import quick_world as committed

    from featalign.world import WorldConfig, build_world, world_paths

    path = os.path.join(ROOT, "data", "world-quick")
    if committed.committed_is_current() and not os.path.exists(os.path.join(path, "world.json")):
        shutil.copytree(committed.ROOT, path, dirs_exist_ok=True)
    build_world(path, WorldConfig.quick(), progress=False)
    return world_paths(path)


def bench_llama(hidden: int, layers: int, vocab: int, max_positions: int = 1024, **token_ids):
    """A random-init Llama (seed 0) with 64-dim heads and a 2.75x MLP."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(2.75 * hidden),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **token_ids,
        )
    )


def make_model(out: str, hidden: int, layers: int, max_positions: int = 1024, chat_template: bool = False) -> int:
    """Save a random-init Llama with the world tokenizer under ``out``; returns its parameter count.

    Without ``chat_template`` the tokenizer has none, so featalign and TRL tokenise a string prompt the same way."""
    from featalign.models import load_tokenizer

    tok = load_tokenizer(quick_world()["sft"])
    if not chat_template:
        tok.chat_template = None
    model = bench_llama(
        hidden,
        layers,
        len(tok),
        max_positions,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def make_sae(out: str, d_in: int, d_sae: int, layer: int, k: int = 32) -> None:
    from featalign.sae import random_sae

    random_sae(d_in, d_sae, "topk", k=k, noise=0.0, layer=layer).save(out)


def timeit(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call (device synchronised)."""
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return median(ts)


def run_worker(script: str, args: list[str], timeout: int = 1800) -> dict:
    """Run ``python script --worker ...`` in a fresh process; its last stdout line is a JSON result."""
    t = time.time()
    p = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        return {"error": (p.stderr or p.stdout)[-1500:], "wall_s": time.time() - t}
    return json.loads(p.stdout.strip().splitlines()[-1])


def write_result(name: str, result: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    result = {"device": device_label(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), **result}
    path = os.path.join(RESULTS, f"{name}-{device_tag()}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"written to {path}")
    return path


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else float("nan")
