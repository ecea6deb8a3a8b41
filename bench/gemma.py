"""Gemma 3 270M (base; 262k vocabulary, no chat template) through every featalign command, float32 on CPU.

``packaged:gemma3-270m`` (``make gemma``) is converted once; the arithmetic task's pairs are sampled from it; then,
each command in a process of its own (wall time and peak RSS from ``/usr/bin/time``): ``sae train`` at the middle
layer, ``sae eval``, ``cache``, ``train`` for every method (a few steps: that it runs, and its tokens/s),
``eval`` with the arithmetic judge, ``explain`` and ``select-features``. Before the SAE, the middle layer's residual
norms are checked for massive activations (a handful of positions far above the rest, as SmolLM2's first position
is), which ``--outlier-norm`` leaves out of SAE training.

Usage: python bench/gemma.py [--pairs 64 --steps 2]  -> bench/results/gemma-<cpu|gpu>.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import parser, scratch, write_result  # noqa: E402

MODEL = "packaged:gemma3-270m"
METHODS = ["dpo", "ipo", "simpo", "dpo_ln", "tdpo1", "tdpo2", "trdpo", "fpo"]
OFFLINE = {"dpo", "ipo", "dpo_ln", "fpo"}  # methods that read the offline cache


def command(args: list[str], log: str) -> dict:
    """``featalign ARGS`` in its own process: return code, wall seconds, peak RSS (MB)."""
    t = time.time()
    with open(log, "w") as f:
        p = subprocess.run(
            ["/usr/bin/time", "-f", "peak_kb=%M", sys.executable, "-m", "featalign", *args], stdout=f, stderr=f
        )
    tail = open(log).read().splitlines()
    peak = next((int(x.split("=")[1]) / 1024 for x in reversed(tail) if x.startswith("peak_kb=")), None)
    out = {"rc": p.returncode, "wall_s": round(time.time() - t, 1), "peak_rss_mb": peak and round(peak)}
    if p.returncode:
        out["error"] = "\n".join(tail[-6:])
    return out


@torch.no_grad()
def massive_activations(model_dir: str, texts: list[str], layer: int) -> dict:
    """Residual norms at ``layer`` over the texts: the largest against the median, and where the large ones sit."""
    from featalign.models import capture_layer, load_model, load_tokenizer

    tok, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    norms, first = [], []
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with capture_layer(model, layer) as box:
            model(input_ids=ids)
        n = box["h"][0].norm(dim=-1)
        norms.append(n)
        first.append(float(n[0]))
    every = torch.cat(norms)
    med = float(every.median())
    rest = torch.cat([n[1:] for n in norms])
    return {
        "tokens": every.numel(),
        "median_norm": med,
        "max_over_median": float(every.max()) / med,
        "first_position_over_median": sum(first) / len(first) / med,
        "largest_other_position_over_median": float(rest.max()) / med,
        "share_above_10x_median": float((every > 10 * med).float().mean()),
    }


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--pairs", type=int, default=64, help="training prompts of the arithmetic task")
    ap.add_argument("--steps", type=int, default=2, help="training steps per method")
    ap.add_argument("--sae-tokens", type=int, default=60_000)
    ap.add_argument("--out", default=None, help="keep everything here (default: a scratch folder removed at exit)")
    a = ap.parse_args()
    from featalign import arithmetic
    from featalign.models import resolve_model
    from featalign.tasks import TaskConfig, build_task

    work = a.out or scratch("gemma-")
    os.makedirs(work, exist_ok=True)
    res: dict = {"model": MODEL, "commands": {}}
    t = time.time()
    model_dir = resolve_model(MODEL)
    res["resolve_s"] = round(time.time() - t, 1)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    layer = cfg.num_hidden_layers // 2
    res.update(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, vocab=cfg.vocab_size, layer=layer)

    t = time.time()
    task = build_task(
        os.path.join(work, "task"),
        arithmetic.TASK,
        TaskConfig(**{**arithmetic.TASK.settings, "n_train": a.pairs, "n_test": 32}),
        progress=False,
    )
    res["task"] = {"build_s": round(time.time() - t, 1), **task["stats"]}
    rows = [json.loads(line) for line in open(task["train"])]
    train, test = task["train"], task["test"]
    res["massive_activations"] = massive_activations(model_dir, [r["prompt"] + r["chosen"] for r in rows[:32]], layer)

    sae, cache = os.path.join(work, "sae"), os.path.join(work, "cache")
    lengths = ["--max-length", "80", "--max-prompt-length", "64"]
    steps = [
        ("sae train", ["sae", "train", "--model", MODEL, "--data", train, "--layer", str(layer), "--out", sae,
                       "--tokens", str(a.sae_tokens), "--no-progress"]),
        ("sae eval", ["sae", "eval", "--sae", sae, "--model", MODEL, "--data", test,
                      "--out", os.path.join(work, "sae-eval")]),
        ("cache", ["cache", "--model", MODEL, "--data", train, "--sae", sae, "--out", cache, *lengths]),
    ]  # fmt: skip
    for m in METHODS:
        run = ["train", "--method", m, "--model", MODEL, "--data", train, "--out", os.path.join(work, "runs", m)]
        run += ["--max-steps", str(a.steps), "--batch-size", "2", "--lr", "1e-6", "--no-progress", *lengths]
        run += ["--cache", cache] if m in OFFLINE else []
        run += ["--sae", sae] if m == "fpo" else []
        steps.append((f"train {m}", run))
    policy = os.path.join(work, "runs", "dpo", "final")
    steps += [
        ("eval", ["eval", "--model", policy, "--ref-model", MODEL, "--data", test, "--reward-fn",
                  "featalign.arithmetic:reward", "--n-prompts", "32", "--max-new-tokens", "8", "--no-progress"]),
        ("explain", ["explain", "--policy", policy, "--reference", MODEL, "--sae", sae, "--data", test,
                     "--out", os.path.join(work, "explain"), *lengths]),
        ("select-features", ["select-features", "--model", MODEL, "--sae", sae, "--data", train,
                             "--out", os.path.join(work, "select"), *lengths]),
    ]  # fmt: skip
    for name, args in steps:
        r = command(args, os.path.join(work, name.replace(" ", "_") + ".log"))
        print(f"{name:22s} {json.dumps(r)[:300]}", flush=True)
        if name.startswith("train") and r["rc"] == 0:
            with open(os.path.join(args[args.index("--out") + 1], "summary.json")) as f:
                s = json.load(f)
            r.update({k: s[k] for k in ("tokens_per_second", "reference_model_loaded")})
        res["commands"][name] = r
    with open(os.path.join(sae, "eval.json")) as f:
        ev = json.load(f)
    res["sae"] = {k: ev.get(k) for k in ("explained_variance", "l0", "dead_share", "dense_share", "outlier_tokens")}
    with open(os.path.join(work, "sae-eval", "eval.json")) as f:
        res["sae_eval"] = {k: v for k, v in json.load(f).items() if isinstance(v, int | float | bool)}
    res["all_ran"] = all(r["rc"] == 0 for r in res["commands"].values())
    write_result("gemma", res)


if __name__ == "__main__":
    main()
