"""Run every benchmark with sizes for the machine it runs on (CPU here, or a GPU), one after another.

Usage: python bench/run_all.py [--only train_step,memory,...] [--smoke]
Results: bench/results/<name>-<cpu|gpu>.json (+ scaling-<cpu|gpu>.png). `--smoke` runs tiny sizes to check
that every script still works (a few minutes on 2 CPU cores); its results are written under the tag `smoke`
and are not the figures the docs report.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

GPU = importlib.util.find_spec("torch") is not None and __import__("torch").cuda.is_available()
SIZES = {
    "train_step": [
        "--hidden",
        "1024",
        "--layers",
        "12",
        "--batch-size",
        "16",
        "--steps",
        "10",
        "--warmup",
        "3",
        "--max-length",
        "128",
    ]
    if GPU
    else ["--hidden", "256", "--layers", "4", "--batch-size", "8", "--steps", "20", "--warmup", "3", "--rounds", "3"],
    "memory": ["--hidden", "1024", "--layers", "12", "--batch-size", "16", "--steps", "10"] if GPU else [],
    "cache": ["--hidden", "1024", "--layers", "12"] if GPU else [],
    "sae_train": (["--libs", "featalign"] if importlib.util.find_spec("sae_lens") is None else [])
    + (["--tokens", "2000000", "--d-sae", "4096"] if GPU else []),
    "sae_decode": [],
    "sae_match": [],
    "scaling": [],
}
SMOKE = {
    "train_step": ["--hidden", "64", "--layers", "2", "--batch-size", "4", "--steps", "3", "--tag", "smoke_train_step"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(SIZES))
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    failed = []
    for name in a.only.split(","):
        if a.smoke and name not in SMOKE:
            continue
        args = SMOKE[name] if a.smoke else SIZES[name]
        t = time.time()
        print(f"== {name} {' '.join(args)}", flush=True)
        p = subprocess.run([sys.executable, os.path.join(HERE, f"{name}.py"), *args])
        print(f"== {name}: exit {p.returncode} in {time.time() - t:.0f} s", flush=True)
        if p.returncode:
            failed.append(name)
    if failed:
        raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
    main()
