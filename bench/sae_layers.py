"""`featalign sae train --layers 1,2,3` (one forward pass feeds every layer's SAE) against one run per layer.

Same model (the quick world's SFT model unless --model), documents, width, k and token budget; both sides run in
this process, alternated, so machine drift hits both alike. Timed: activation extraction and SAE training
(`train_seconds` in each report), not the final evaluation. Reported: tokens/s per layer-SAE trained, and the
held-out explained variance of each layer's SAE both ways (the single pass must not cost quality).

Usage: python bench/sae_layers.py [--layers 1,2,3 --tokens 200000] -> bench/results/sae_layers-<cpu|gpu>.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parser, quick_world, scratch, write_result  # noqa: E402


def main():
    ap = parser(__doc__)
    ap.add_argument("--layers", default="1,2,3")
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--d-sae", type=int, default=512)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    from featalign.models import load_model, load_tokenizer
    from featalign.sae.train import SAETrainConfig, train_sae

    wp = quick_world()
    model, tok = load_model(wp["sft"]).eval(), load_tokenizer(wp["sft"])
    layers = [int(v) for v in a.layers.split(",")]
    out = scratch(prefix="featalign-sae-layers-")
    base = dict(
        model=wp["sft"], data=wp["sft_text"], d_sae=a.d_sae, k=a.k, tokens=a.tokens, eval_tokens=5000, progress=False
    )
    runs = []
    for r in range(a.repeats):
        _, multi = train_sae(SAETrainConfig(**base, layers=a.layers, out=os.path.join(out, f"multi{r}")), model, tok)
        single = {
            layer: train_sae(SAETrainConfig(**base, layer=layer, out=os.path.join(out, f"l{layer}-{r}")), model, tok)[1]
            for layer in layers
        }
        one_pass_s = multi[layers[0]]["train_seconds"]
        per_layer_s = sum(s["train_seconds"] for s in single.values())
        runs.append(
            {
                "one_pass_seconds": one_pass_s,
                "one_run_per_layer_seconds": per_layer_s,
                "one_pass_tokens_per_s_per_sae": a.tokens * len(layers) / one_pass_s,
                "one_run_per_layer_tokens_per_s_per_sae": a.tokens * len(layers) / per_layer_s,
                "speedup": per_layer_s / one_pass_s,
                "explained_variance": {
                    layer: {
                        "one_pass": multi[layer]["explained_variance"],
                        "one_run_per_layer": single[layer]["explained_variance"],
                    }
                    for layer in layers
                },
            }
        )
        print(runs[-1], flush=True)
    speedups = sorted(r["speedup"] for r in runs)
    write_result(
        "sae_layers",
        {
            "model": wp["sft"],
            "layers": layers,
            "tokens": a.tokens,
            "d_sae": a.d_sae,
            "k": a.k,
            "runs": runs,
            "speedup_median": speedups[len(speedups) // 2],
        },
    )


if __name__ == "__main__":
    main()
