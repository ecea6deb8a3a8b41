"""FPO's feature discrepancy D as the paper writes it and as the released code computes it, on SmolLM2.

The released code (MikaStars39/FeatureAlignment, feature_alignment/model/fpo.py) differs from the paper in four
ways: (a) it reads the reference's full pooled vector and compares at the policy's top-k (featalign's paper variant
caches the reference's top-k and takes the union of both top-k); (b) it divides the pooled sum by the batch's padded
length; (c) it pools the positions that predict the answer's tokens; (d) its SAE reads the final-norm hidden state,
not the chosen layer's output. This measures D with each difference alone and all four together (the released
variant), against the paper's D, on the same pairs, policy, reference and SAE: a TopK SAE on layer 15 of
SmolLM2-135M-Instruct, the policy after a few DPO steps from it.

Usage: python bench/fpo_variants.py [--pairs 64] [--sae-tokens 60000]  -> bench/results/fpo_variants-<cpu|gpu>.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import parser, scratch, write_result  # noqa: E402
from smollm2 import chat_pairs, gguf_path  # noqa: E402

VARIANTS = {  # name: (final-norm state, predicting positions, padded length, the reference's full vector)
    "paper": (False, False, False, False),
    "(a) full reference vector, policy top-k": (False, False, False, True),
    "(b) divided by the padded length": (False, False, True, False),
    "(c) positions that predict the answer": (False, True, False, False),
    "(d) final-norm hidden state": (True, False, False, False),
    "released (all four)": (True, True, True, True),
}


@torch.no_grad()
def discrepancies(policy, reference, sae, layer: int, batch: dict, k: int) -> dict[str, torch.Tensor]:
    """D per response under each variant, from one pass of each model."""
    from featalign.feature_terms import pooled
    from featalign.losses import feature_mse

    def states(model):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        return out.hidden_states[layer + 1], out.hidden_states[-1]  # decoder layer `layer`'s output; the final norm's

    pol, ref = states(policy), states(reference)
    out = {}
    for name, (final, predicting, padded, full) in VARIANTS.items():
        c_pol = pooled(sae, pol[final], batch["response_mask"], predicting, padded)
        c_ref = pooled(sae, ref[final], batch["response_mask"], predicting, padded)
        vals, idx = c_ref.topk(c_ref.shape[1] if full else k, dim=-1)
        out[name] = feature_mse(c_pol, idx, vals, k, "policy" if full else "union")
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--sae-tokens", type=int, default=60_000)
    ap.add_argument("--dpo-steps", type=int, default=8)
    ap.add_argument("--k", type=int, default=50)
    a = ap.parse_args()
    from featalign import data as D
    from featalign.models import load_model, load_tokenizer, resolve_model
    from featalign.sae import load_sae
    from featalign.sae.train import SAETrainConfig, train_sae
    from featalign.train import TrainConfig, run_train

    work = scratch("fpo-variants-")
    model_dir = resolve_model(gguf_path())
    data = os.path.join(work, "pairs.jsonl")
    D.write_jsonl(data, chat_pairs(a.pairs))
    layer = 15
    train_sae(
        SAETrainConfig(
            model=model_dir,
            data=data,
            layer=layer,
            out=f"{work}/sae",
            d_sae=4608,
            k=28,
            tokens=a.sae_tokens,
            progress=False,
        )
    )
    run_train(
        TrainConfig(
            method="dpo",
            model=model_dir,
            data=data,
            out=f"{work}/dpo",
            lr=2e-5,
            batch_size=4,
            max_steps=a.dpo_steps,
            max_length=256,
            progress=False,
            tensorboard=False,
        )
    )
    tok = load_tokenizer(model_dir)
    reference, policy = load_model(model_dir).eval(), load_model(f"{work}/dpo/final").eval()
    sae = load_sae(f"{work}/sae")
    _, pairs, _ = D.prepare_pairs(D.DataOptions(data=data, max_length=256), tok)
    found: dict[str, list[torch.Tensor]] = {}
    for b in D.batches(pairs, 8):
        for name, d in discrepancies(policy, reference, sae, layer, D.collate_pairs(b, tok.pad_token_id), a.k).items():
            found.setdefault(name, []).append(d)
    d = {name: torch.cat(v) for name, v in found.items()}
    paper = d["paper"]
    rows = [
        {
            "variant": name,
            "mean_D": float(v.mean()),
            "mean_ratio_to_paper": float((v / paper).mean()),
            "min_ratio": float((v / paper).min()),
            "max_ratio": float((v / paper).max()),
        }
        for name, v in d.items()
    ]
    for r in rows:
        print(r, flush=True)
    write_result(
        "fpo_variants",
        {
            "model": "SmolLM2-135M-Instruct (GGUF, float32)",
            "layer": layer,
            "sae": "TopK 4608/k28",
            "sae_tokens": a.sae_tokens,
            "pairs": len(pairs),
            "responses": len(paper),
            "k": a.k,
            "policy": f"DPO, {a.dpo_steps} steps at lr 2e-5, batch 4",
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
