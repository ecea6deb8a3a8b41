"""`featalign explain`: what alignment changed, in SAE features.

The policy and the reference run over the same responses (or each over its own samples); each model's hidden state at
one layer is encoded with the same SAE and pooled over response tokens, and features are ranked by the mean change
(policy - reference) with a paired (or Welch) t statistic. Each feature is described by the tokens that activate it in
the reference on the same data and its highest-activating contexts. With a judge, each feature's correlation with the
judge's reward and its parts says what the moved features are about.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from . import data as D
from .atomic import write_json
from .config import check_model_path, setting
from .errors import ConfigError
from .features import describe_features, load_sae_at, pooled_features, reward_relation, table_cells, token_label
from .judges import make_judge
from .models import load_model, load_tokenizer


@dataclass
class ExplainConfig(D.DataOptions):
    """`featalign explain`: the SAE features whose activation alignment changed most, and the tokens carrying them."""

    policy: str = setting("", "trained policy: HF folder, hub id or .gguf file")
    reference: str = setting("", "the reference it started from (usually the SFT model)")
    sae: str = setting("", "SAE at the layer to inspect: SAELens, sparsify or Gemma Scope folder, or params.npz")
    layer: int | None = setting(None, "decoder layer the SAE reads (default: the layer the SAE records)")
    out: str = setting("runs/explain", "output folder (explain.json, explain.md, explain.png)")
    limit: int | None = setting(1000, "use only the first N clean pairs", ge=1)
    top: int = setting(10, "features listed per direction (up, down)", ge=1)
    contexts: int = setting(3, "top contexts shown per feature", ge=0)
    window: int = setting(6, "tokens of context either side", ge=0)
    batch_size: int = setting(32, "sequences per forward pass", ge=1)
    reward_fn: str | None = setting(
        None, "judge whose reward and parts each feature is correlated with, e.g. featalign.world.judge:reward"
    )
    reward_model: str | None = setting(None, "or a sequence-classification reward model as that judge")
    texts: Literal["data", "generated"] = setting(
        "data", "data: both models read the same responses; generated: each model's own samples"
    )
    max_new_tokens: int = setting(48, "most tokens per sampled response (texts: generated)", ge=1)
    seed: int = setting(1234, "sampling seed")

    def validate(self) -> None:
        super().validate()  # which models are needed is run_explain's to say: a Python caller may pass them loaded
        check_model_path(self.policy, "policy")
        check_model_path(self.reference, "reference")


def feature_shifts(
    policy, reference, sae, layer: int, seqs, pad_id: int, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """Mean pooled activation per feature under each model, their difference and its paired t statistic."""
    fp = pooled_features(policy, sae, layer, seqs, pad_id, batch_size)
    fr = pooled_features(reference, sae, layer, seqs, pad_id, batch_size)
    d = fp - fr
    n = d.shape[0]
    se = d.std(0, unbiased=True) / n**0.5 if n > 1 else torch.full_like(d[0], float("inf"))
    t = torch.where(se > 0, d.mean(0) / se, torch.zeros_like(se))
    return {"shift": d.mean(0), "t": t, "policy_mean": fp.mean(0), "reference_mean": fr.mean(0), "reference_pooled": fr}


def _generated_shifts(policy, reference, sae, layer, pairs, tok, cfg):
    """Each model samples a response to the same prompts; each response is encoded by the model that wrote it.
    The shift then says how the policy's *behaviour* moved in feature space (unpaired: Welch's t)."""
    from .generate import sample

    firsts: dict[str, D.TokenizedPair] = {}
    for t in pairs:
        firsts.setdefault(str(t.record.prompt), t)
    prompts = [t.record.prompt for t in firsts.values()]
    ids = [t.prompt_ids for t in firsts.values()]
    seqs, pooled = [], []
    for model in (policy, reference):
        gens = sample(model, tok, ids, cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed)
        sq = [(p + g, [0] * len(p) + [1] * len(g)) for p, g in zip(ids, gens) if g]
        texts = [(pr, tok.decode(g, skip_special_tokens=True)) for pr, g in zip(prompts, gens) if g]
        pooled.append(pooled_features(model, sae, layer, sq, tok.pad_token_id, cfg.batch_size))
        seqs += sq
    fp, fr = pooled
    se = (fp.var(0) / len(fp) + fr.var(0) / len(fr)).sqrt()
    shift = fp.mean(0) - fr.mean(0)
    t = torch.where(se > 0, shift / se.clamp(min=1e-12), torch.zeros_like(se))
    # texts/pooled for the reward relation: the reference's own samples only, so that which model wrote
    # a response does not itself create a correlation with the shift
    return seqs, texts, {"shift": shift, "t": t, "policy_mean": fp.mean(0), "reference_mean": fr.mean(0), "pooled": fr}


def run_explain(cfg: ExplainConfig, policy=None, reference=None, tokenizer=None) -> dict:
    cfg.validate()
    given = {"policy": policy, "reference": reference}
    for name in ("policy", "reference", "sae", "data"):
        if not getattr(cfg, name) and given.get(name) is None:
            raise ConfigError(f"explain needs --{name}")
    tok = tokenizer or load_tokenizer(cfg.reference or cfg.policy)
    reference = reference if reference is not None else load_model(cfg.reference).eval()
    policy = policy if policy is not None else load_model(cfg.policy).eval()
    sae, layer = load_sae_at(cfg.sae, cfg.layer, reference)
    raw, pairs, _ = D.prepare_pairs(cfg, tok)
    if cfg.texts == "data":
        seqs = D.pair_sequences(pairs)
        s = feature_shifts(policy, reference, sae, layer, seqs, tok.pad_token_id, cfg.batch_size)
        texts = [(p.prompt, p.chosen) for p in raw] + [(p.prompt, p.rejected) for p in raw]
        pooled = s["reference_pooled"]
    else:
        seqs, texts, s = _generated_shifts(policy, reference, sae, layer, pairs, tok, cfg)
        pooled = s["pooled"]
    up = s["shift"].topk(cfg.top).indices.tolist()
    down = (-s["shift"]).topk(cfg.top).indices.tolist()
    # a shift within float32 rounding of the activations is no shift: two runs of one model can differ by that much
    # where the kernels' reduction order depends on threading
    noise = 1e-6 * float(s["reference_mean"].abs().max())
    down = [f for f in down if s["shift"][f] < -noise]
    up = [f for f in up if s["shift"][f] > noise]
    judge = make_judge(cfg.reward_fn, cfg.reward_model)
    rel = reward_relation(texts, pooled, s["shift"], judge) if judge is not None else None
    # the features that track each reward part best (|r| over responses), whether or not alignment moved them
    tracking = (
        {
            n: rel[0][:, i].abs().topk(3).indices.tolist()
            for i, n in enumerate(rel[1]["parts"])
            if n != "reward" or len(rel[1]["parts"]) == 1
        }
        if rel
        else {}
    )
    described = list(dict.fromkeys(up + down + [f for fs in tracking.values() for f in fs]))
    desc = describe_features(
        reference, sae, layer, seqs, described, tok, cfg.contexts, cfg.window, batch_size=cfg.batch_size
    )

    def row(f):
        r = {
            "feature": f,
            "shift": float(s["shift"][f]),
            "t": float(s["t"][f]),
            "reference_mean": float(s["reference_mean"][f]),
            "policy_mean": float(s["policy_mean"][f]),
            **desc[f],
        }
        if rel is not None:
            r["reward_corr"] = {n: float(rel[0][f, i]) for i, n in enumerate(rel[1]["parts"])}
        return r

    result = {
        "policy": cfg.policy,
        "reference": cfg.reference,
        "sae": cfg.sae,
        "layer": layer,
        "texts": cfg.texts,
        "responses": len(seqs),
        "total_abs_shift": float(s["shift"].abs().sum()),
        "up": [row(f) for f in up],
        "down": [row(f) for f in down],
    }
    if rel is not None:
        result["reward"] = {**rel[1], "tracking": {n: [row(f) for f in fs] for n, fs in tracking.items()}}
    os.makedirs(cfg.out, exist_ok=True)
    write_json(os.path.join(cfg.out, "explain.json"), result)
    table = explain_table(result)
    with open(os.path.join(cfg.out, "explain.md"), "w") as fh:
        fh.write(table + "\n")
    _plot_shifts(result, os.path.join(cfg.out, "explain.png"))
    return result


def explain_table(result: dict) -> str:
    paired = result["texts"] == "data"
    how = "on the same responses, paired t" if paired else "each model on its own sampled responses, Welch t"
    lines = [
        f"Features at layer {result['layer']} whose pooled response activation changed most "
        f"({result['responses']} responses; shift = policy - reference, {how}).",
        "",
    ]
    judged = result.get("reward", {})
    parts = [p for p in judged.get("parts", []) if p != "reward"] or judged.get("parts", [])
    extra = "".join(f" r({p}) |" for p in parts)
    for direction in ("up", "down"):
        lines += [
            f"**{direction}**",
            "",
            f"| feature | shift | t | ref. mean |{extra} top tokens (share of activation) | top context |",
            "|---|---|---|---|" + "---|" * len(parts) + "---|---|",
        ]
        for r in result[direction]:
            toks, ctx = table_cells(r)
            rc = "".join(f" {r['reward_corr'][p]:+.2f} |" for p in parts)
            moved = f"{r['shift']:+.4f} | {r['t']:+.1f} | {r['reference_mean']:.4f}"
            lines.append(f"| {r['feature']} | {moved} |{rc} {toks} | {ctx} |")
        lines.append("")
    if judged:
        lines += [
            f"**features that track each part of the reward** ({judged['judge']}; largest |r| over the responses)",
            "",
            "| part | feature | r | shift | t | top tokens (share of activation) | top context |",
            "|---|---|---|---|---|---|---|",
        ]
        for part, rows in judged.get("tracking", {}).items():
            for r in rows:
                toks, ctx = table_cells(r)
                r_part, moved = f"{r['reward_corr'][part]:+.2f}", f"{r['shift']:+.4f} | {r['t']:+.1f}"
                lines.append(f"| {part} | {r['feature']} | {r_part} | {moved} | {toks} | {ctx} |")
        c = judged["shift_vs_feature_reward_corr"]
        lines += [
            "",
            "Across all features, correlation of the policy's shift with the feature's correlation to each "
            "part of the reward: " + ", ".join(f"{k} {v:+.2f}" for k, v in c.items()),
        ]
    return "\n".join(lines)


def _plot_shifts(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["up"] + result["down"][::-1]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.2))
    y = range(len(rows))
    ax.barh(list(y), [r["shift"] for r in rows], color=["tab:green" if r["shift"] > 0 else "tab:red" for r in rows])
    ax.set_yticks(list(y))
    ax.set_yticklabels([f"#{r['feature']}: {token_label(r)}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("mean pooled activation, policy - reference")
    ax.set_title(f"SAE features moved by alignment (layer {result['layer']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
