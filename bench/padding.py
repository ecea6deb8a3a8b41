"""Random vs length-grouped vs packed batches: share of padded positions, training tokens per second, memory.

The same DPO run (offline cache, the quick world's SFT model and train pairs) with ``group_by_length`` off (padded),
on (padded), and on with ``--pack`` (one padding-free row per micro-batch), each in its own process, alternating
over ``--rounds`` so a slow spell of the shared machine hits both; each keeps its fastest round. Tokens are real
(unpadded) tokens, so padding shows as lost throughput.

Usage: python bench/padding.py [--steps 30 --batch-size 8]  -> bench/results/padding-<cpu|gpu>.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import quick_world, scratch, write_result  # noqa: E402


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=160)
    a = ap.parse_args()
    wp = quick_world()
    tmp = scratch(prefix="featalign-pad-")
    common = ["--max-length", str(a.max_length), "--max-prompt-length", "48"]
    cache = os.path.join(tmp, "cache")
    run(
        [
            sys.executable,
            "-m",
            "featalign",
            "cache",
            "--model",
            wp["sft"],
            "--data",
            wp["train"],
            "--out",
            cache,
            *common,
        ]
    )
    runs: dict[str, dict] = {}
    for rnd in range(a.rounds):
        for name in ("random", "grouped", "packed"):
            grouped = name != "random"
            out = os.path.join(tmp, f"{name}-{rnd}")
            run(
                [
                    sys.executable,
                    "-m",
                    "featalign",
                    "train",
                    "--method",
                    "dpo",
                    "--model",
                    wp["sft"],
                    "--data",
                    wp["train"],
                    "--cache",
                    cache,
                    "--out",
                    out,
                    "--max-steps",
                    str(a.steps),
                    "--batch-size",
                    str(a.batch_size),
                    "--lr",
                    "1e-5",
                    "--no-progress",
                    "--no-tensorboard",
                    "--no-resume",
                    "--log-every",
                    str(a.steps),
                    "--group-by-length" if grouped else "--no-group-by-length",
                    "--pack",
                    "on" if name == "packed" else "off",
                    *common,
                ]
            )
            s = json.load(open(os.path.join(out, "summary.json")))
            r = {k: s[k] for k in ("padded_share", "tokens_per_second", "wall_seconds", "peak_memory_mb")}
            print(rnd, name, r, flush=True)
            if name not in runs or r["tokens_per_second"] > runs[name]["tokens_per_second"]:
                runs[name] = r
    summary = {
        "padded_share_random": runs["random"]["padded_share"],
        "padded_share_grouped": runs["grouped"]["padded_share"],
        "padded_share_packed": runs["packed"]["padded_share"],
        "tokens_per_s_grouped_vs_random": runs["grouped"]["tokens_per_second"] / runs["random"]["tokens_per_second"],
        "tokens_per_s_packed_vs_grouped": runs["packed"]["tokens_per_second"] / runs["grouped"]["tokens_per_second"],
        "peak_memory_packed_vs_grouped": runs["packed"]["peak_memory_mb"] / runs["grouped"]["peak_memory_mb"],
    }
    write_result(
        "padding",
        {
            "data": "built-in world (quick), train split",
            "method": "dpo (offline cache)",
            "steps": a.steps,
            "batch_size": a.batch_size,
            "max_length": a.max_length,
            "rounds": a.rounds,
            "runs": runs,
            "summary": summary,
        },
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
