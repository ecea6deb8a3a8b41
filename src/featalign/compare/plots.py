"""The comparison's figures: reward against KL per method (``frontier.png``) and training curves (``curves.png``)."""

from __future__ import annotations

import json
import os

from .budget import CompareConfig


def plot(cfg: CompareConfig, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, m in enumerate(["sft"] + results["frontier"]["methods"]):
        color = f"C{i}"
        pts = sorted((p for p in results["points"] if p["method"] == m), key=lambda p: p["kl_to_ref"]["mean"])
        xs = [p["kl_to_ref"]["mean"] for p in pts]
        ys = [p["gt_reward"]["mean"] for p in pts]
        ax.errorbar(
            xs,
            ys,
            xerr=[p["kl_to_ref"]["sd"] for p in pts],
            yerr=[p["gt_reward"]["sd"] for p in pts],
            fmt="o-" if m != "sft" else "s",
            color=color,
            capsize=3,
            label=m,
        )
        for p in pts:
            if p["knob"]:
                ax.annotate(
                    f"{p['knob'][0]}={p['value']:g}",
                    (p["kl_to_ref"]["mean"], p["gt_reward"]["mean"]),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=7,
                    color=color,
                )
        seeds = [r for r in results["runs"] if r["method"] == m]
        ax.scatter([r["kl_to_ref"] for r in seeds], [r["gt_reward"] for r in seeds], color=color, alpha=0.25, s=12)
    ax.set_xlabel("sequence KL to SFT (nats)")
    ax.set_ylabel("mean ground-truth reward")
    ax.set_title(f"reward vs KL frontier (mean ± sd over {results['budget']['seeds']} seed(s); faint: single runs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "frontier.png"), dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in results["runs"]:
        # one run per method: seed 0 at the middle of its grid
        vals = results["budget"]["grid"].get(r["method"])
        if r["seed"] != 0 or not vals or r["value"] != vals[len(vals) // 2]:
            continue
        path = os.path.join(r["run_dir"], "metrics.jsonl")
        if not os.path.exists(path):
            continue
        recs = [json.loads(line) for line in open(path)]
        for ax, key in zip(axes, ("loss", "rewards/accuracies", "rewards/margins")):
            ax.plot(
                [x["step"] for x in recs], [x[key] for x in recs], label=f"{r['method']} {r['knob']}={r['value']:g}"
            )
            ax.set_title(key)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "curves.png"), dpi=100)
    plt.close(fig)
