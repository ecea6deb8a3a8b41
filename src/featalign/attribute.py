"""`featalign attribute`: attribute a scalar score (the log-prob margin chosen - rejected, or a reward model's score)
to SAE features by attribution patching. The SAE is spliced in at the layer with its error term held fixed, so the
forward pass is unchanged, and a feature's attribution is the sum over positions of f * d score / d f. Attributions
are a linear prediction; they are checked by zero-ablating the top features, and random active ones, for real."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from . import data as D
from .atomic import write_json
from .config import check_model_path, setting
from .errors import ConfigError
from .features import describe_features, load_sae_at, table_cells
from .models import load_model, load_tokenizer, response_logps


@dataclass
class AttributeConfig(D.DataOptions):
    """`featalign attribute`: a margin or reward attributed to SAE features, checked by ablation."""

    model: str = setting("", "causal LM, or a sequence-classification reward model for the reward scores")
    sae: str = setting("", "SAE at the layer to attribute through")
    layer: int | None = setting(None, "decoder layer the SAE reads (default: the layer the SAE records)")
    score: Literal["margin", "chosen_logp", "reward_margin", "reward"] = setting("margin", "what to attribute")
    tokenizer: str | None = setting(None, "tokenizer (default: the model's)")
    out: str = setting("runs/attribute", "output folder (attribution.json, .pt, .png)")
    limit: int | None = setting(256, "use only the first N clean pairs", ge=1)
    top: int = setting(10, "features listed, largest |attribution| first", ge=1)
    ablate: int = setting(10, "top and random features zero-ablated for real to check the attribution", ge=0)
    batch_size: int = setting(16, "pairs per forward pass", ge=1)
    seed: int = setting(0, "seed of the random features ablated for comparison")

    def validate(self) -> None:
        super().validate()
        check_model_path(self.model)


SCORES = {
    "margin": "log-prob margin chosen - rejected (causal LM)",
    "chosen_logp": "summed log-prob of the chosen response (causal LM)",
    "reward_margin": "reward-model score of chosen - rejected (sequence classifier)",
    "reward": "reward-model score of the chosen response (sequence classifier)",
}


def pair_score(model, t: dict, kind: str) -> torch.Tensor:
    """Per-pair score for a batch from ``collate_pairs`` (rows: chosen then rejected)."""
    n = t["input_ids"].shape[0] // 2
    out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], use_cache=False)
    if kind in ("margin", "chosen_logp"):
        if not hasattr(out, "logits") or out.logits.shape[-1] < 2:
            raise ConfigError(f"score '{kind}' needs a causal LM")
        lp, _ = response_logps(out.logits, t["input_ids"], t["response_mask"])
        return lp[:n] - lp[n:] if kind == "margin" else lp[:n]
    r = out.logits[:, -1].float()  # the last logit, as the reward-model judge reads it
    return r[:n] - r[n:] if kind == "reward_margin" else r[:n]


def spliced_score(
    model, sae, layer: int, t: dict, kind: str, drop: torch.Tensor | None = None, grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Score with the SAE spliced in at ``layer`` (error term kept, so an un-ablated pass is exact).

    ``drop``: boolean [d_sae] of features zero-ablated at every position. With ``grad`` the score's
    gradient reaches the feature activations, returned as the second value (a leaf tensor)."""
    from .sae.metrics import splice

    box: dict = {}

    def fn(h):
        x = h.float()
        f = sae.encode(x)
        err = (x - sae.decode(f)).detach()
        f = f.detach().requires_grad_(grad)
        box["f"] = f
        g = f.masked_fill(drop, 0.0) if drop is not None else f
        return (sae.decode(g) + err).to(h.dtype)

    with torch.set_grad_enabled(grad), splice(model, layer, fn):
        s = pair_score(model, t, kind)
    return s, box.get("f")


def run_attribute(cfg: AttributeConfig, model=None, tokenizer=None) -> dict:
    cfg.validate()
    for name in ("sae", "data"):
        if not getattr(cfg, name):
            raise ConfigError(f"attribute needs --{name}")
    if model is None:
        if not cfg.model:
            raise ConfigError("attribute needs --model")
        if cfg.score.startswith("reward"):
            from transformers import AutoModelForSequenceClassification

            from .models import default_device

            model = AutoModelForSequenceClassification.from_pretrained(cfg.model).to(default_device())
        else:
            model = load_model(cfg.model)
    model = model.eval().requires_grad_(False)
    tok = tokenizer or load_tokenizer(cfg.tokenizer or cfg.model)
    if cfg.score.startswith("reward") and model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    sae, layer = load_sae_at(cfg.sae, cfg.layer, model)
    device = next(model.parameters()).device
    sae = sae.to(device).requires_grad_(False)
    _, pairs, _ = D.prepare_pairs(cfg, tok)
    batches = [
        {k: v.to(device) for k, v in D.collate_pairs(b, tok.pad_token_id).items()}
        for b in D.batches(pairs, cfg.batch_size)
    ]
    n = len(pairs)

    attr = torch.zeros(sae.d_sae, device=device)
    clean = 0.0
    active = torch.zeros(sae.d_sae, device=device)
    for t in batches:
        s, f = spliced_score(model, sae, layer, t, cfg.score, grad=True)
        s.sum().backward()
        m = t["attention_mask"].bool()
        attr += (f * f.grad)[m].sum(0).detach()
        active += (f[m] > 0).sum(0).detach()
        clean += s.sum().item()
    attr, clean = attr / n, clean / n

    def ablated(drop) -> float:
        with torch.no_grad():
            return sum(spliced_score(model, sae, layer, t, cfg.score, drop=drop)[0].sum().item() for t in batches) / n

    order = attr.abs().argsort(descending=True)
    top = order[: cfg.ablate].tolist()
    g = torch.Generator().manual_seed(cfg.seed)
    pool = (active > 0).nonzero().squeeze(1).cpu()
    pool = pool[~torch.isin(pool, torch.tensor(top, dtype=torch.long))]
    rand = pool[torch.randperm(len(pool), generator=g)[: cfg.ablate]].tolist()
    rows = []
    for feat in top + rand:
        drop = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
        drop[feat] = True
        rows.append(
            {
                "feature": feat,
                "group": "top" if feat in top else "random",
                "attribution": float(attr[feat]),
                "predicted_change": -float(attr[feat]),
                "ablation_change": ablated(drop) - clean,
            }
        )
    pred = torch.tensor([r["predicted_change"] for r in rows])
    real = torch.tensor([r["ablation_change"] for r in rows])
    corr = float(torch.corrcoef(torch.stack([pred, real]))[0, 1]) if len(rows) > 2 else float("nan")
    real_top = [abs(r["ablation_change"]) for r in rows if r["group"] == "top"]
    real_rand = [abs(r["ablation_change"]) for r in rows if r["group"] == "random"]
    drop_pos = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    pos = [f for f in top if attr[f] > 0]
    drop_pos[pos] = True
    joint = ablated(drop_pos) - clean if pos else 0.0

    seqs = D.pair_sequences(pairs)
    desc = describe_features(model, sae, layer, seqs, order[: cfg.top].tolist(), tok, batch_size=cfg.batch_size)
    result = {
        "model": cfg.model,
        "sae": cfg.sae,
        "layer": layer,
        "score": cfg.score,
        "pairs": n,
        "mean_score": clean,
        "attribution_sum": float(attr.sum()),
        "top": [{"feature": f, "attribution": float(attr[f]), **desc[f]} for f in order[: cfg.top].tolist()],
        "validation": {
            "ablated": rows,
            "pearson_predicted_vs_ablation": corr,
            "mean_abs_change_top": sum(real_top) / max(len(real_top), 1),
            "mean_abs_change_random": sum(real_rand) / max(len(real_rand), 1),
            "joint_ablation_of_positive_top": {
                "features": pos,
                "predicted": -float(attr[pos].sum()) if pos else 0.0,
                "change": joint,
            },
        },
    }
    os.makedirs(cfg.out, exist_ok=True)
    write_json(os.path.join(cfg.out, "attribution.json"), result)
    torch.save(attr.cpu(), os.path.join(cfg.out, "attribution.pt"))
    _plot_validation(rows, os.path.join(cfg.out, "attribution.png"), corr)
    return result


def attribute_table(result: dict) -> str:
    v, joint = result["validation"], result["validation"]["joint_ablation_of_positive_top"]
    lines = [
        f"score: {result['score']} ({SCORES[result['score']]}), mean {result['mean_score']:.4f} over "
        f"{result['pairs']} pairs; layer {result['layer']}",
        "",
        "| feature | attribution | top tokens (share of activation) | top context |",
        "|---|---|---|---|",
    ]
    for r in result["top"]:
        toks, ctx = table_cells(r)
        lines.append(f"| {r['feature']} | {r['attribution']:+.4f} | {toks} | {ctx} |")
    lines += [
        "",
        f"validation by zero-ablation: Pearson r(predicted, real change) = {v['pearson_predicted_vs_ablation']:.3f}; "
        f"mean |change| top {v['mean_abs_change_top']:.4f} vs random active {v['mean_abs_change_random']:.4f}; "
        f"joint ablation of the positive top features: predicted {joint['predicted']:+.4f}, "
        f"real {joint['change']:+.4f}",
    ]
    return "\n".join(lines)


def _plot_validation(rows: list[dict], path: str, corr: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    for group, color in (("top", "tab:red"), ("random", "tab:gray")):
        rs = [r for r in rows if r["group"] == group]
        ax.scatter(
            [r["predicted_change"] for r in rs],
            [r["ablation_change"] for r in rs],
            c=color,
            label=f"{group} features",
            s=18,
        )
    lim = max([abs(r["predicted_change"]) for r in rows] + [abs(r["ablation_change"]) for r in rows] + [1e-6])
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.6)
    ax.set_xlabel("predicted change (- attribution)")
    ax.set_ylabel("change when ablated")
    ax.set_title(f"attribution vs ablation (r = {corr:.2f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
