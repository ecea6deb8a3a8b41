"""The built-in world's SAE against its quality targets, over architectures, widths, k and AuxK windows.

For each configuration: `featalign sae train` on the world's SFT model (layer 2, 2M tokens, lr 1e-2, held-out 40k
tokens), then the best |r| of any latent with the topic and the sentiment part of the ground-truth reward, pooling
each chosen and rejected test response as `featalign explain` does. Targets: L0/d_in <= 5%, explained variance
>= 0.9, dead < 5%, dense (> 10% of tokens) < 5%, median decoder cosine to init < 0.5, |r| >= 0.5 for both parts.

Usage: python bench/world_sae.py [--world data/world] [--configs topk:384:6:100000,featurechoice:256:6:100000:1:0.08]
    (architecture:latents:k:AuxK window[:Feature Choice zipf[:share cap]])
    -> bench/results/world_sae-<cpu|gpu>.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, write_result  # noqa: E402

CONFIGS = ",".join(
    [
        "topk:512:8:10000000",
        "topk:384:6:100000",
        "topk:256:8:100000",
        "topk:192:8:100000",
        "topk:128:6:100000",
        "featurechoice:384:6:100000:0",
        "featurechoice:256:6:100000:0",
        "featurechoice:128:6:100000:0",
        "featurechoice:256:6:100000:0.5",
        "featurechoice:256:6:100000:1",
        "featurechoice:384:6:100000:1",
        "featurechoice:128:6:100000:1",
        "featurechoice:192:6:100000:1",
        "featurechoice:512:6:100000:1",
        "featurechoice:256:6:100000:1:0.04",
        "featurechoice:256:6:100000:1:0.12",
    ]
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default=os.path.join(ROOT, "data", "world"))
    ap.add_argument(
        "--configs", default=CONFIGS, help="architecture:latents:k:AuxK window[:zipf[:share cap]], comma-separated"
    )
    ap.add_argument("--tokens", type=int, default=2_000_000)
    args = ap.parse_args()

    from featalign.features import best_reward_features
    from featalign.judges import make_judge
    from featalign.models import load_model, load_tokenizer
    from featalign.sae import load_sae
    from featalign.sae.metrics import decoder_cosine_to_init
    from featalign.sae.train import SAETrainConfig, train_sae
    from featalign.world import build_world, world_paths

    manifest = build_world(args.world, progress=False)
    paths = world_paths(args.world)
    tok, model = load_tokenizer(paths["sft"]), load_model(paths["sft"]).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.configs.split(","):
            arch, d_sae, k, window, *fc = spec.split(":")
            d_sae, k, window = int(d_sae), int(k), int(window)
            zipf, cap = (float(fc[0]) if fc else 0.0), (float(fc[1]) if len(fc) > 1 else SAETrainConfig.fc_max_share)
            out = os.path.join(tmp, spec.replace(":", "-"))
            cfg = SAETrainConfig(
                model=paths["sft"],
                data=paths["sft_text"],
                layer=2,
                out=out,
                architecture=arch,
                d_sae=d_sae,
                k=k,
                dead_tokens=window,
                fc_zipf=zipf,
                fc_max_share=cap,
                tokens=args.tokens,
                lr=1e-2,
                progress=False,
            )
            train_sae(cfg, model=model, tokenizer=tok)
            with open(os.path.join(out, "eval.json")) as f:
                ev = json.load(f)
            sae = load_sae(out)
            row = {
                "architecture": arch,
                "d_sae": d_sae,
                "k": k,
                "dead_tokens": window,
                **({"fc_zipf": zipf, "fc_max_share": cap} if arch == "featurechoice" else {}),
                "l0_over_d_in": ev["l0"] / sae.cfg.d_in,
                **{
                    m: ev[m]
                    for m in (
                        "explained_variance",
                        "l0",
                        "dead_fraction",
                        "dense_fraction",
                        "ce_loss_recovered",
                        "train_seconds",
                    )
                },
                "decoder_cosine_to_init": decoder_cosine_to_init(sae),
                "best_abs_r": best_reward_features(
                    model, sae, tok, paths["test"], make_judge("featalign.world.judge:reward"), limit=500
                ),
            }
            row["targets_met"] = {
                "l0": row["l0_over_d_in"] <= 0.05,
                "explained_variance": row["explained_variance"] >= 0.9,
                "dead": row["dead_fraction"] < 0.05,
                "dense": row["dense_fraction"] < 0.05,
                "decoder_cosine_to_init": row["decoder_cosine_to_init"] < 0.5,
                "topic": row["best_abs_r"]["topic"]["r"] >= 0.5,
                "sentiment": row["best_abs_r"]["sentiment"]["r"] >= 0.5,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_result("world_sae", {"world_version": manifest["config"]["version"], "tokens": args.tokens, "rows": rows})


if __name__ == "__main__":
    main()
