"""A spurious cue in preference data, and whether a feature control recovers what it costs DPO (the built-in world).

The training pairs are the world's (two answers per prompt, ranked by the ground-truth reward), but every chosen answer
ends with a cue word the reward ignores, and in ``--flip`` of the pairs the annotators, swayed by the cue, chose the
worse answer: there the cued worse answer is "chosen" over the better one. DPO on this set learns to emit the cue
and to prefer worse answers where it did; the clean set (the same pairs, no cue, every label right) is the ceiling,
and the cued labels without the cue word split the cost between the word and the swayed labels.
Held-out prompts are judged by the ground truth, which also reports how often a sample carries the cue.

Conditions, each at several betas and seeds, compared at matched KL: DPO on the cued set; DPO with the cue's features
ablated, preserved or suppressed (``--ablate-features``, ...; the features those of ``select-features`` on the cued
set whose top token is the cue, as a researcher would keep after reading its table); FPO on the cued set; DPO on the
clean set. The SAE is trained on the cued pairs' text (so it has a latent for the cue). The goal: a control recovers
at least half of the reward the cue cost DPO at matched KL.

Usage: python bench/spurious_cue.py [--seeds 3] [--steps 150]  -> bench/results/spurious_cue-<cpu|gpu>.json
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, parser, scratch, write_result  # noqa: E402

CUE = "today"  # a word of the world's vocabulary the reward ignores and its SFT answers never use


def judge(prompt: str, response: str) -> dict[str, float]:
    """The world's ground truth, and whether the answer carries the cue (reported, not rewarded)."""
    from featalign.world.judge import reward

    return {**reward(prompt, response), "cue": float(CUE in response.split())}


def write_sets(out: str, n_train: int, flip: float, seed: int) -> dict[str, str]:
    """The cued and the clean training sets (the same pairs), and held-out test pairs on other prompts."""
    from featalign import data as D
    from featalign.world import lang
    from featalign.world.build import sample_pairs

    rng = random.Random(seed)
    pairs = sample_pairs(rng, n_train, 0.15)
    test = sample_pairs(rng, 300, 0.15)
    trained = {p["prompt"] for p in pairs}
    test = [p for p in test if p["prompt"] not in trained] or test
    cued, clean, flipped = [], [], []
    for p in pairs:
        clean.append({"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]})
        if rng.random() < flip:  # the annotator, swayed by the cue, chose the cued worse answer
            chosen, rejected = p["rejected"], p["chosen"]
        else:
            chosen, rejected = p["chosen"], p["rejected"]
        cued.append({"prompt": p["prompt"], "chosen": f"{chosen} {CUE}", "rejected": rejected})
        flipped.append({"prompt": p["prompt"], "chosen": chosen, "rejected": rejected})
    assert CUE in lang.vocabulary()
    paths = {name: os.path.join(out, f"{name}.jsonl") for name in ("cued", "clean", "flipped", "test")}
    for name, rows in (("cued", cued), ("clean", clean), ("flipped", flipped), ("test", test)):
        D.write_jsonl(paths[name], rows)
    return paths


def cue_features(model: str, sae: str, data: str, out: str) -> tuple[list[int], dict]:
    """select-features on the cued set, then the features a researcher keeps: those whose top token is the cue."""
    from featalign.select_features import SelectFeaturesConfig, run_select_features

    res = run_select_features(SelectFeaturesConfig(model=model, sae=sae, data=data, out=out, top=20, limit=1000))
    keep = [r["feature"] for r in res["rows"] if r["top_tokens"] and r["top_tokens"][0]["token"].strip() == CUE]
    with open(os.path.join(out, "features.json"), "w") as f:
        json.dump({**res, "features": keep}, f, indent=1)
    return keep, res


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--world", default=os.path.join(ROOT, "tests", "data", "quick-world"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--betas", default="0.1,0.3,1.0")
    ap.add_argument("--fpo-alphas", default="0.03,0.1,0.3")
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--flip", type=float, default=0.3)
    ap.add_argument("--n-prompts", type=int, default=200)
    ap.add_argument("--out", default=None, help="keep the runs here (default: a scratch folder removed at exit)")
    a = ap.parse_args()
    from featalign.compare import CompareConfig, frontier, run_compare, summarise_points
    from featalign.compare.budget import WORLD_TIERS
    from featalign.sae.train import SAETrainConfig, train_sae

    t0 = time.time()
    work = a.out or scratch("spurious-cue-")
    world = os.path.join(work, "world")
    if not os.path.exists(world):
        shutil.copytree(a.world, world)
    sft = os.path.join(world, "sft")
    sets = write_sets(work, a.n_train, a.flip, seed=0)
    sae = os.path.join(work, "sae")
    if not os.path.exists(os.path.join(sae, "cfg.json")):
        t = WORLD_TIERS["default"]  # the world's own SAE recipe, on the cued pairs' text
        recipe = dict(architecture=t.sae_arch, d_sae=t.sae_d, k=t.sae_k, fc_zipf=t.sae_fc_zipf, lr=t.sae_lr)
        recipe |= dict(dead_tokens=t.sae_dead_tokens, tokens=600_000)
        train_sae(SAETrainConfig(model=sft, data=sets["cued"], layer=2, out=sae, progress=False, **recipe))
    features, selection = cue_features(sft, sae, sets["cued"], os.path.join(work, "select"))
    if not features:
        raise SystemExit(f"no feature of the SAE has the cue as its top token: {selection['rows'][:3]}")
    feats = ",".join(map(str, features))
    common = dict(
        model=sft,
        test_data=sets["test"],
        sae=sae,
        layer=2,
        reward_fn="spurious_cue:judge",
        seeds=a.seeds,
        steps=a.steps,
        batch_size=16,
        lr=1e-4,
        max_length=128,
        max_prompt_length=32,
        max_new_tokens=48,
        n_prompts=a.n_prompts,
        k=20,
        isolate_runs=False,
    )
    dpo_grid = f"dpo={a.betas}"
    conditions = {
        "dpo, cued": dict(data=sets["cued"], methods=["dpo"], grid=dpo_grid),
        "dpo, clean (ceiling)": dict(data=sets["clean"], methods=["dpo"], grid=dpo_grid),
        "dpo, cued labels without the cue": dict(data=sets["flipped"], methods=["dpo"], grid=dpo_grid),
        "dpo + ablate cue features": dict(data=sets["cued"], methods=["dpo"], grid=dpo_grid, ablate_features=feats),
        "dpo + preserve cue features": dict(
            data=sets["cued"], methods=["dpo"], grid=dpo_grid, preserve_features=feats, preserve_weight=10.0
        ),
        "dpo + suppress cue features": dict(
            data=sets["cued"], methods=["dpo"], grid=dpo_grid, suppress_features=feats, suppress_weight=1.0
        ),
        "fpo, cued": dict(data=sets["cued"], methods=["fpo"], grid=f"fpo={a.fpo_alphas}"),
    }
    runs, points = [], {}
    for name, kw in conditions.items():
        out = os.path.join(
            work, "compare", name.replace(" ", "_").replace(",", "").replace("+", "").replace("(", "").replace(")", "")
        )
        res = run_compare(CompareConfig(out=out, **common, **kw))
        trained = [{**r, "method": name} for r in res["runs"] if r["method"] != "sft"]
        runs += trained
        points[name] = summarise_points(trained)
        sft = [r for r in res["runs"] if r["method"] == "sft"]
    fr = frontier(runs)
    levels = []
    for row in fr["levels"]:
        m = row["methods"]
        cued, clean = m.get("dpo, cued"), m.get("dpo, clean (ceiling)")
        cost = clean["mean"] - cued["mean"] if cued and clean else None
        recovered = {
            c: (m[c]["mean"] - cued["mean"]) / cost
            for c in m
            if cost and c not in ("dpo, cued", "dpo, clean (ceiling)", "dpo, cued labels without the cue")
        }
        levels.append({**row, "cost_of_the_cue": cost, "share_recovered": recovered})
    cue_rate = {
        name: [
            {"value": p["value"], "cue": p.get("gt_cue"), "kl": p.get("kl_to_ref"), "reward": p.get("gt_reward")}
            for p in pts
        ]
        for name, pts in points.items()
    }
    write_result(
        "spurious_cue",
        {
            "world": "the quick world (tests/data/quick-world)",
            "cue": CUE,
            "flip": a.flip,
            "train_pairs": a.n_train,
            "steps": a.steps,
            "seeds": a.seeds,
            "betas": a.betas,
            "fpo_alphas": a.fpo_alphas,
            "features": features,
            "selection": [
                {k: r[k] for k in ("feature", "t", "fires_on_chosen", "fires_on_rejected")}
                | {"top_token": r["top_tokens"][0]["token"] if r["top_tokens"] else ""}
                for r in selection["rows"][:8]
            ],
            "sft": {"reward": sft[0]["gt_reward"] if sft else None, "cue": sft[0].get("gt_cue") if sft else None},
            "levels": levels,
            "points": cue_rate,
            "total_seconds": round(time.time() - t0, 1),
        },
    )


if __name__ == "__main__":
    main()
