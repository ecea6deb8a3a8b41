"""Log-probs through the LM head at a large-vocabulary shape: one DPO forward + backward, three ways.

The model is Gemma-2-2B's shape cut to ``--layers`` decoder layers (random init, float32): vocabulary 256,000,
hidden 2304, tied embeddings, final logit soft-capping. The loss is DPO against fixed reference log-probs
(what an offline cache gives), so the only difference between the sides is how the response log-probs and
their gradients go through the head:

- ``full``: the model's logits for the whole batch, then log_softmax (the earlier path, and TRL's);
- ``chunked``: ``featalign.logprobs`` terms, only response positions projected, a chunk at a time, each
  chunk's logits recomputed in backward (any loss; eval and the cache use this path without a graph);
- ``fused``: ``fused.fused_loss``, the trainer's default: each pair's logits computed once, the pair's loss
  differentiated at once, the head's gradients accumulated before the logits are dropped (no recompute).

Each side runs in its own process, so each peak is its own, alternating over ``--rounds`` (each keeps its
fastest). Gradients are set to None before every step, as the trainer's optimiser step leaves them. The peak
is reset after the model is built (CPU: ``/proc/self/clear_refs``), so it is the steps' own.
Measured: median forward+backward seconds over ``--repeats`` after one warm-up step; peak memory (GPU: max
allocated; CPU: peak RSS) and the memory held before a step (the weights), whose difference is what the
step itself needs. ``--mem-limit-gb`` caps each worker's address space, so a side that does not fit fails
with an out-of-memory error instead of taking the machine down.

Usage: python bench/logprobs.py [--seq 512 --prompt 32 --pairs 4]  -> bench/results/logprobs-<cpu|gpu>.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import device, median, peak_mb, reset_peak, run_worker, sync, write_result  # noqa: E402


def current_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def gemma2_shaped(vocab: int, hidden: int, layers: int):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        final_logit_softcapping=30.0,
        attn_implementation="eager",
    )
    return Gemma2ForCausalLM(cfg)


def worker(a) -> dict:
    import featalign.head as H
    import featalign.logprobs as L
    from featalign.fused import can_fuse, fused_loss
    from featalign.losses import dpo_loss

    dev = device()
    model = gemma2_shaped(a.vocab, a.hidden, a.layers).to(dev)
    if a.mem_limit_gb:
        import resource

        lim = int(a.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    if a.mode == "full":
        H.splittable = lambda m: False
    g = torch.Generator().manual_seed(0)
    n = 2 * a.pairs
    ids = torch.randint(0, a.vocab, (n, a.seq), generator=g)
    resp = torch.zeros_like(ids)
    resp[:, a.prompt :] = 1
    ids, att, resp = ids.to(dev), torch.ones_like(ids).to(dev), resp.to(dev)
    positions = L.response_positions(resp.cpu())
    ref = torch.randn(n, generator=g).to(dev) - 2.0 * (a.seq - a.prompt)
    amp = torch.autocast("cuda", torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)

    def pair_dpo(r, ex):
        return dpo_loss(r["logps"][:1], r["logps"][1:], ex["ref_c"], ex["ref_r"])[0]

    def step():
        model.zero_grad(set_to_none=True)  # as the trainer's optimiser step leaves them
        with amp:
            fw = L.forward(model, ids, att, resp, positions)
            if a.mode == "fused":
                assert can_fuse(fw)
                loss, _ = fused_loss(fw, pair_dpo, {"ref_c": ref[: a.pairs], "ref_r": ref[a.pairs :]})
            else:
                t = fw.terms()
                loss, _ = dpo_loss(t["logps"][: a.pairs], t["logps"][a.pairs :], ref[: a.pairs], ref[a.pairs :])
        loss.backward()
        return loss.detach()

    init_peak = peak_mb()
    peak_reset = reset_peak()  # the step's peak, not that of building the random model
    losses = [step()]
    sync()
    grad_norm = float(model.get_output_embeddings().weight.grad.norm())
    model.zero_grad(set_to_none=True)
    held = current_mb()  # the weights, what every step starts from
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - t0)
    return {
        "step_s": median(times),
        "step_s_all": times,
        "peak_mb": peak_mb(),
        "peak_reset_after_init": peak_reset,
        "init_peak_mb": init_peak,
        "held_before_step_mb": held,
        "step_peak_above_held_mb": peak_mb() - held,
        "loss": float(losses[0]),
        "grad_norm_head": grad_norm,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--mode", choices=["chunked", "full", "fused"])
    ap.add_argument("--modes", default="full,chunked,fused", help="the sides to run, in this order each round")
    ap.add_argument("--mem-limit-gb", type=float, default=0, help="address-space cap per worker (0: none)")
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
    args = [
        "--worker",
        "--vocab",
        str(a.vocab),
        "--hidden",
        str(a.hidden),
        "--layers",
        str(a.layers),
        "--pairs",
        str(a.pairs),
        "--seq",
        str(a.seq),
        "--prompt",
        str(a.prompt),
        "--repeats",
        str(a.repeats),
        "--mem-limit-gb",
        str(a.mem_limit_gb),
    ]
    runs = {}
    for rnd in range(a.rounds):  # alternating whole rounds, so a slow spell of the shared machine hits both sides
        for mode in a.modes.split(","):
            r = run_worker(__file__, [*args, "--mode", mode], timeout=3600)
            print(rnd, mode, json.dumps(r), flush=True)
            if mode not in runs or ("step_s" in r and r["step_s"] < runs[mode].get("step_s", float("inf"))):
                runs[mode] = {**r, "step_s_rounds": runs.get(mode, {}).get("step_s_rounds", []) + [r.get("step_s")]}
            else:
                runs[mode]["step_s_rounds"].append(r.get("step_s"))
    summary = {}
    f = runs.get("full", {})
    for mode in ("chunked", "fused"):
        c = runs.get(mode, {})
        if "step_s" in f and "step_s" in c:
            summary[mode] = {
                "peak_memory_vs_full": c["peak_mb"] / f["peak_mb"],
                "step_memory_above_held_vs_full": c["step_peak_above_held_mb"] / f["step_peak_above_held_mb"],
                "step_time_vs_full": c["step_s"] / f["step_s"],
                "same_loss": abs(c["loss"] - f["loss"]) < 1e-4,
                "head_grad_norm_rel_diff": abs(c["grad_norm_head"] - f["grad_norm_head"]) / f["grad_norm_head"],
            }
    write_result(
        a.tag,
        {
            "shape": {
                "vocab": a.vocab,
                "hidden": a.hidden,
                "layers": a.layers,
                "pairs": a.pairs,
                "seq": a.seq,
                "prompt": a.prompt,
                "model": "Gemma-2-shaped (tied embeddings, soft-capping), random init",
            },
            "repeats": a.repeats,
            "rounds": a.rounds,
            "runs": runs,
            "summary": summary,
        },
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
