"""Chunked log-probs vs full-vocabulary logits at a large-vocabulary shape: one DPO forward + backward.

The model is Gemma-2-2B's shape cut to ``--layers`` decoder layers (random init, float32): vocabulary 256,000,
hidden 2304, tied embeddings, final logit soft-capping. The loss is DPO against fixed reference log-probs
(what an offline cache gives), so the only difference between the two sides is how the response log-probs
are computed: ``chunked`` (featalign.logprobs: only response positions projected, a chunk at a time,
recomputed in backward) or ``full`` (the model's logits for the whole batch, then log_softmax, the previous
path and TRL's). The optimiser step is left out: it is the same on both sides.

Each side runs in its own process, so each peak is its own, alternating over ``--rounds`` (each keeps its
fastest). Measured: median forward+backward seconds over ``--repeats`` after one warm-up step; peak memory (GPU: max allocated; CPU: peak RSS) and the memory held
before a step (weights and gradients), whose difference is what the step itself needs.

Usage: python bench/logprobs.py [--seq 128 --prompt 32 --pairs 4]  -> bench/results/logprobs-<cpu|gpu>.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import median, peak_mb, run_worker, sync, write_result  # noqa: E402


def current_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def gemma2_shaped(vocab: int, hidden: int, layers: int):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, final_logit_softcapping=30.0,
                       attn_implementation="eager")
    return Gemma2ForCausalLM(cfg)


def worker(a) -> dict:
    import featalign.logprobs as L
    from featalign.losses import dpo_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = gemma2_shaped(a.vocab, a.hidden, a.layers).to(device)
    if a.mode == "full":
        L._chunked_ok = lambda m: False
    g = torch.Generator().manual_seed(0)
    n = 2 * a.pairs
    ids = torch.randint(0, a.vocab, (n, a.seq), generator=g)
    resp = torch.zeros_like(ids)
    resp[:, a.prompt:] = 1
    ids, att, resp = ids.to(device), torch.ones_like(ids).to(device), resp.to(device)
    positions = L.response_positions(resp.cpu())
    ref = torch.randn(n, generator=g).to(device) - 2.0 * (a.seq - a.prompt)
    amp = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            t = L.response_terms(model, ids, att, resp, positions)
            loss, _ = dpo_loss(t["logps"][: a.pairs], t["logps"][a.pairs :], ref[: a.pairs], ref[a.pairs :])
        loss.backward()
        return loss.detach()

    losses = [step()]
    sync()
    held = current_mb()  # weights + gradients, what every step starts from
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - t0)
    return {"step_s": median(times), "step_s_all": times, "peak_mb": peak_mb(), "held_before_step_mb": held,
            "step_peak_above_held_mb": peak_mb() - held, "loss": float(losses[0]),
            "grad_norm_head": float(model.get_output_embeddings().weight.grad.norm()),
            "params": sum(p.numel() for p in model.parameters())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--mode", choices=["chunked", "full"])
    ap.add_argument("--vocab", type=int, default=256_000)
    ap.add_argument("--hidden", type=int, default=2304)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (prompt + response)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence (their logits are never needed)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="run both sides this many times; keep each one's fastest")
    ap.add_argument("--tag", default="logprobs")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    args = ["--worker", "--vocab", str(a.vocab), "--hidden", str(a.hidden), "--layers", str(a.layers), "--pairs", str(a.pairs),
            "--seq", str(a.seq), "--prompt", str(a.prompt), "--repeats", str(a.repeats)]
    runs = {}
    for rnd in range(a.rounds):  # alternating whole rounds, so a slow spell of the shared machine hits both sides
        for mode in ("full", "chunked"):
            r = run_worker(__file__, [*args, "--mode", mode], timeout=3600)
            print(rnd, mode, json.dumps(r), flush=True)
            if mode not in runs or ("step_s" in r and r["step_s"] < runs[mode].get("step_s", float("inf"))):
                runs[mode] = {**r, "step_s_rounds": runs.get(mode, {}).get("step_s_rounds", []) + [r.get("step_s")]}
            else:
                runs[mode]["step_s_rounds"].append(r.get("step_s"))
    f, c = runs["full"], runs["chunked"]
    summary = {}
    if "error" not in f and "error" not in c:
        summary = {"peak_memory_chunked_vs_full": c["peak_mb"] / f["peak_mb"],
                   "step_memory_above_held_chunked_vs_full": c["step_peak_above_held_mb"] / f["step_peak_above_held_mb"],
                   "step_time_chunked_vs_full": c["step_s"] / f["step_s"],
                   "same_loss": abs(c["loss"] - f["loss"]) < 1e-4,
                   "head_grad_norm_rel_diff": abs(c["grad_norm_head"] - f["grad_norm_head"]) / f["grad_norm_head"]}
    write_result(a.tag, {"shape": {"vocab": a.vocab, "hidden": a.hidden, "layers": a.layers, "pairs": a.pairs, "seq": a.seq,
                                   "prompt": a.prompt, "model": "Gemma-2-shaped (tied embeddings, soft-capping), random init"},
                         "repeats": a.repeats, "rounds": a.rounds, "runs": runs, "summary": summary})
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
