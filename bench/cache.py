"""Offline reference cache: bytes per response of the sparse top-k SAE cache against dense alternatives, and
the time to build it against one training epoch.

Measured on the bench model (random-init Llama, world tokenizer, quick-world pairs) and an SAE of 8 x hidden
latents: the cache's bytes on disk, `featalign cache` wall time, and one epoch of `featalign train --method fpo`
over the same pairs. Alongside, computed (not measured) sizes at Gemma-2-2B scale (Gemma Scope 16k SAE, k=50).

Usage: python bench/cache.py [--hidden 256 --layers 4 --k 50] -> bench/results/cache-<cpu|gpu>.json
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make_model, make_sae, parser, quick_world, scratch, write_result  # noqa: E402


def sizes(d_sae: int, d_in: int, k: int, tokens_per_response: float, value_bytes: int = 4) -> dict:
    """Bytes per response of each way to store the reference's SAE activations (plus 8 bytes of log-prob + length)."""
    return {
        "sparse_topk_pooled": 8 + k * (value_bytes + 4),
        "dense_pooled": 8 + d_sae * value_bytes,
        "dense_per_token_latents": 8 + tokens_per_response * d_sae * value_bytes,
        "per_token_hidden_states": 8 + tokens_per_response * d_in * value_bytes,
    }


def main():
    ap = parser(__doc__)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--pairs", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=96)
    a = ap.parse_args()
    tmp = scratch(prefix="featalign-cache-bench-")
    model_dir, sae_dir, cache_dir = (os.path.join(tmp, x) for x in ("model", "sae", "cache"))
    n_params = make_model(model_dir, a.hidden, a.layers)
    layer, d_sae = a.layers // 2, 8 * a.hidden
    make_sae(sae_dir, a.hidden, d_sae, layer)
    data = os.path.join(tmp, "pairs.jsonl")
    with open(quick_world()["train"]) as src, open(data, "w") as dst:
        for _, line in zip(range(a.pairs), src):
            dst.write(line)
    common = ["--model", model_dir, "--data", data, "--max-length", str(a.max_length), "--max-prompt-length", "32"]
    t0 = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "featalign",
            "cache",
            *common,
            "--sae",
            sae_dir,
            "--layer",
            str(layer),
            "--k",
            str(a.k),
            "--out",
            cache_dir,
            "--batch-size",
            "32",
        ],
        check=True,
        capture_output=True,
    )
    build_s = time.time() - t0
    out = os.path.join(tmp, "train")
    t0 = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "featalign",
            "train",
            "--method",
            "fpo",
            *common,
            "--cache",
            cache_dir,
            "--sae",
            sae_dir,
            "--layer",
            str(layer),
            "--k",
            str(a.k),
            "--out",
            out,
            "--epochs",
            "1",
            "--batch-size",
            str(a.batch_size),
            "--no-progress",
            "--no-tensorboard",
            "--no-resume",
            "--lr",
            "1e-6",
        ],
        check=True,
        capture_output=True,
    )
    epoch_process_s = time.time() - t0
    summary = json.load(open(os.path.join(out, "summary.json")))

    from featalign import data as D
    from featalign.models import load_tokenizer

    pairs = D.tokenize_pairs(D.load_pairs(data), load_tokenizer(model_dir), a.max_length, 32)
    resp_tokens = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / (2 * len(pairs))
    shard_bytes = sum(os.path.getsize(f) for f in glob.glob(os.path.join(cache_dir, "*.safetensors")))
    measured = shard_bytes / (2 * len(pairs))
    here = sizes(d_sae, a.hidden, a.k, resp_tokens)
    gemma = sizes(16384, 2304, 50, 256, value_bytes=4)
    write_result(
        "cache",
        {
            "model_params": n_params,
            "hidden": a.hidden,
            "layers": a.layers,
            "d_sae": d_sae,
            "k": a.k,
            "pairs": len(pairs),
            "response_tokens_mean": resp_tokens,
            "cache_bytes_on_disk": shard_bytes,
            "bytes_per_response_measured": measured,
            "bytes_per_response_computed": here,
            "dense_pooled_over_sparse": here["dense_pooled"] / measured,
            "dense_per_token_over_sparse": here["dense_per_token_latents"] / measured,
            "gemma2_2b_16k_k50_256_tokens_computed": {
                **gemma,
                "dense_pooled_over_sparse": gemma["dense_pooled"] / gemma["sparse_topk_pooled"],
            },
            "cache_build_s": build_s,
            "fpo_epoch_train_s": summary["wall_seconds"],
            "fpo_epoch_process_s": epoch_process_s,
            "cache_build_over_epoch": build_s / epoch_process_s,
        },
    )


if __name__ == "__main__":
    main()
