"""What alignment changed, in SAE features.

- ``explain``: run the policy and the reference over the same responses, encode each model's hidden state at
  one layer with the same SAE, pool over response tokens, and rank features by the mean change
  (policy - reference), with a paired t statistic over responses. Each feature is described by the tokens
  that activate it in the reference model on the same data (its share of the feature's activation mass,
  and its highest-activating contexts).
- ``attribute``: attribute a scalar score (log-prob margin chosen - rejected, or a reward model's score) to
  SAE features by attribution patching. The SAE is spliced in at the layer with its error term held fixed,
  so the forward pass is unchanged, and a feature's attribution is sum over positions of f * d score / d f.
  Attributions are a linear prediction; they are checked by zero-ablating features for real.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal

import torch

from . import data as D
from .config import check_model_path, setting
from .errors import ConfigError
from .models import capture_layer, load_model, load_tokenizer, response_logps


@dataclass
class ExplainConfig(D.DataOptions):
    """`featalign explain`: the SAE features whose activation alignment changed most, with the tokens that carry them."""

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
    world_reward: bool | None = setting(
        None, "correlate features with the built-in world's reward parts (default: on world data)"
    )
    texts: Literal["data", "generated"] = setting(
        "data", "data: both models read the same responses; generated: each model's own samples"
    )
    max_new_tokens: int = setting(48, "most tokens per sampled response (texts: generated)", ge=1)
    seed: int = setting(1234, "sampling seed")

    def validate(self) -> None:
        super().validate()  # which models are needed is run_explain's to say: a Python caller may pass them loaded
        check_model_path(self.policy, "policy")
        check_model_path(self.reference, "reference")


@dataclass
class AttributeConfig(D.DataOptions):
    """`featalign attribute`: attribute a margin or reward to SAE features (attribution patching, checked by ablation)."""

    model: str = setting("", "causal LM, or a sequence-classification reward model for the reward scores")
    sae: str = setting("", "SAE at the layer to attribute through")
    layer: int | None = setting(None, "decoder layer the SAE reads (default: the layer the SAE records)")
    score: Literal["margin", "chosen_logp", "reward_margin", "reward"] = setting("margin", "what to attribute")
    tokenizer: str | None = setting(None, "tokenizer (default: the model's)")
    out: str = setting("runs/attribute", "output folder (attribution.json, .pt, .png)")
    limit: int | None = setting(256, "use only the first N clean pairs", ge=1)
    top: int = setting(10, "features listed per sign", ge=1)
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


def _pad(seqs, pad_id, device):
    b = D.pad_sequences([s for s, _ in seqs], [m for _, m in seqs], pad_id)
    return {k: v.to(device) for k, v in b.items()}


def _load_sae(path: str, layer: int | None, model):
    from .sae import load_sae, resolve_layer

    sae = load_sae(path, layer)
    return sae, resolve_layer(sae, layer, model, path)


@torch.no_grad()
def pooled_features(model, sae, layer: int, seqs, pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """[N, d_sae] SAE activations at ``layer`` averaged over each sequence's response tokens."""
    device = next(model.parameters()).device
    sae = sae.to(device)
    out = []
    for b in D.batches(seqs, batch_size):
        t = _pad(b, pad_id, device)
        with capture_layer(model, layer, stop=True) as box:
            model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], use_cache=False)
        out.append(sae.encode_pooled(box["h"].float(), t["response_mask"]).cpu())
    return torch.cat(out)


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


def _columnwise_corr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson r of each column of ``x`` [N, F] with ``y`` [N] (0 for constant columns)."""
    xc, yc = x - x.mean(0), y - y.mean()
    den = xc.norm(dim=0) * yc.norm()
    return torch.where(den > 0, (xc * yc[:, None]).sum(0) / den.clamp(min=1e-12), torch.zeros_like(den))


def world_reward_relation(
    texts: list[tuple[str, str]], pooled: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, dict] | None:
    """On built-in-world data: each feature's correlation over the (prompt, response) ``texts`` (pooled
    activations [N, d_sae] in the same order) with each part of the ground-truth reward, and how the policy's
    ``shift`` lines up with those correlations across features. None when the prompts are not the world's."""
    from .world.lang import prompt_topic, reward, reward_parts

    if not all(isinstance(p, str) and prompt_topic(p) for p, _ in texts):
        return None
    parts = [reward_parts(p, r) for p, r in texts]
    y = {n: torch.tensor([q[n] for q in parts]) for n in ("topic", "sentiment", "length")}
    y["reward"] = torch.tensor([reward(p, r) for p, r in texts])
    corr = torch.stack([_columnwise_corr(pooled, v) for v in y.values()], 1)  # [d_sae, 4]
    summary = {n: float(_columnwise_corr(shift[:, None], corr[:, i])[0]) for i, n in enumerate(y)}
    return corr, {
        "parts": list(y),
        "shift_vs_feature_reward_corr": summary,
        "mean_reward_parts": {n: float(v.mean()) for n, v in y.items()},
    }


@torch.no_grad()
def best_reward_features(model, sae, tokenizer, data: str, limit: int | None = None) -> dict[str, dict]:
    """On built-in-world preference data: the latent with the largest |r| against each part of the ground-truth
    reward, over every chosen and rejected response of ``data`` pooled as ``explain`` pools them (the measure of
    how well an SAE on the world tracks what the reward reads). ``{part: {"r": |r|, "latent": id}}``."""
    raw, pairs, _ = D.prepare_pairs(D.DataOptions(data=data, limit=limit), tokenizer)
    texts = [(p.prompt, p.chosen) for p in raw] + [(p.prompt, p.rejected) for p in raw]
    pooled = pooled_features(model, sae, sae.cfg.layer, D.pair_sequences(pairs), tokenizer.pad_token_id)
    rel = world_reward_relation(texts, pooled, torch.zeros(pooled.shape[1]))
    if rel is None:
        raise ConfigError(
            f"{data}: not the built-in world's prompts, so there is no ground-truth reward to correlate with"
        )
    corr, info = rel
    return {
        part: {"r": round(float(corr[:, i].abs().max()), 3), "latent": int(corr[:, i].abs().argmax())}
        for i, part in enumerate(info["parts"])
    }


@torch.no_grad()
def describe_features(
    model,
    sae,
    layer: int,
    seqs,
    features: list[int],
    tokenizer,
    n_contexts: int = 3,
    window: int = 6,
    n_tokens: int = 5,
    batch_size: int = 32,
) -> dict[int, dict]:
    """For each feature: the tokens carrying most of its activation mass, and its top-activating contexts."""
    if not features:
        return {}
    device = next(model.parameters()).device
    sae = sae.to(device)
    cols = torch.tensor(features, device=device)
    vocab = len(tokenizer)
    mass = torch.zeros(len(features), vocab, device=device)
    best_v = torch.full((len(features), n_contexts), -1.0, device=device)
    best_pos = torch.zeros((len(features), n_contexts, 2), dtype=torch.long, device=device)
    for bi, b in enumerate(D.batches(seqs, batch_size)):
        t = _pad(b, pad_id=tokenizer.pad_token_id, device=device)
        with capture_layer(model, layer, stop=True) as box:
            model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], use_cache=False)
        sel = t["attention_mask"].bool()
        f = sae.encode(box["h"][sel].float())[:, cols]  # [n_tok, F]
        ids = t["input_ids"][sel]
        mass.index_add_(1, ids, f.T)
        where = sel.nonzero()
        where[:, 0] += bi * batch_size
        v, i = torch.cat([best_v, f.T], 1).topk(n_contexts, dim=1)
        pos = torch.cat([best_pos, where[None].expand(len(features), -1, -1)], 1)
        best_v, best_pos = v, pos.gather(1, i[..., None].expand(-1, -1, 2))
    out = {}
    for j, feat in enumerate(features):
        total = mass[j].sum().item()
        tv, ti = mass[j].topk(min(n_tokens, vocab))
        tokens = [
            {"token": tokenizer.decode([int(x)]), "share": float(v / total)}
            for v, x in zip(tv, ti)
            if total > 0 and v > 0
        ]
        ctxs = []
        for v, (s, p) in zip(best_v[j].tolist(), best_pos[j].tolist()):
            if v <= 0:
                continue
            ids = seqs[s][0]
            left = tokenizer.decode(ids[max(0, p - window) : p]).strip()
            tok = tokenizer.decode([ids[p]]).strip()
            right = tokenizer.decode(ids[p + 1 : p + 1 + window // 2]).strip()
            ctxs.append({"activation": v, "context": f"{left} [{tok}] {right}".strip()})
        out[feat] = {"top_tokens": tokens, "contexts": ctxs}
    return out


def _table_cells(row: dict) -> tuple[str, str]:
    """A feature's top tokens with their shares, and its top context, for a markdown table row."""
    toks = ", ".join(f"{t['token'].strip()} ({t['share']:.0%})" for t in row["top_tokens"][:3])
    ctx = row["contexts"][0]["context"].replace("|", "/") if row["contexts"] else ""
    return toks, ctx


def _token_label(desc: dict, n: int = 3) -> str:
    return " ".join(t["token"].strip() or repr(t["token"]) for t in desc["top_tokens"][:n])


def run_explain(cfg: ExplainConfig, policy=None, reference=None, tokenizer=None) -> dict:
    cfg.validate()
    given = {"policy": policy, "reference": reference}
    for name in ("policy", "reference", "sae", "data"):
        if not getattr(cfg, name) and given.get(name) is None:
            raise ConfigError(f"explain needs --{name}")
    tok = tokenizer or load_tokenizer(cfg.reference or cfg.policy)
    reference = reference if reference is not None else load_model(cfg.reference).eval()
    policy = policy if policy is not None else load_model(cfg.policy).eval()
    sae, layer = _load_sae(cfg.sae, cfg.layer, reference)
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
    rel = world_reward_relation(texts, pooled, s["shift"]) if cfg.world_reward is not False else None
    # the features that track each reward part best (|r| over responses), whether or not alignment moved them
    tracking = (
        {n: rel[0][:, i].abs().topk(3).indices.tolist() for i, n in enumerate(rel[1]["parts"]) if n != "reward"}
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
        result["world_reward"] = {**rel[1], "tracking": {n: [row(f) for f in fs] for n, fs in tracking.items()}}
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "explain.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    table = explain_table(result)
    with open(os.path.join(cfg.out, "explain.md"), "w") as fh:
        fh.write(table + "\n")
    _plot_shifts(result, os.path.join(cfg.out, "explain.png"))
    return result


def explain_table(result: dict) -> str:
    how = (
        "on the same responses, paired t"
        if result["texts"] == "data"
        else "each model on its own sampled responses, Welch t"
    )
    lines = [
        f"Features at layer {result['layer']} whose pooled response activation changed most "
        f"({result['responses']} responses; shift = policy - reference, {how}).",
        "",
    ]
    world = "world_reward" in result
    extra = " r(topic) | r(sentiment) |" if world else ""
    for direction in ("up", "down"):
        lines += [
            f"**{direction}**",
            "",
            f"| feature | shift | t | ref. mean |{extra} top tokens (share of activation) | top context |",
            "|---|---|---|---|" + "---|" * (2 * world) + "---|---|",
        ]
        for r in result[direction]:
            toks, ctx = _table_cells(r)
            rc = f" {r['reward_corr']['topic']:+.2f} | {r['reward_corr']['sentiment']:+.2f} |" if world else ""
            lines.append(
                f"| {r['feature']} | {r['shift']:+.4f} | {r['t']:+.1f} | {r['reference_mean']:.4f} |{rc} {toks} | {ctx} |"
            )
        lines.append("")
    if world:
        lines += [
            "**features that track each reward part** (largest |r| over the responses)",
            "",
            "| part | feature | r | shift | t | top tokens (share of activation) | top context |",
            "|---|---|---|---|---|---|---|",
        ]
        for part, rows in result["world_reward"].get("tracking", {}).items():
            for r in rows:
                toks, ctx = _table_cells(r)
                lines.append(
                    f"| {part} | {r['feature']} | {r['reward_corr'][part]:+.2f} | {r['shift']:+.4f} | {r['t']:+.1f} | {toks} | {ctx} |"
                )
        lines.append("")
        c = result["world_reward"]["shift_vs_feature_reward_corr"]
        lines.append(
            "Across all features, correlation of the policy's shift with the feature's correlation to each reward "
            "part (built-in world): " + ", ".join(f"{k} {v:+.2f}" for k, v in c.items())
        )
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
    ax.set_yticklabels([f"#{r['feature']}: {_token_label(r)}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("mean pooled activation, policy - reference")
    ax.set_title(f"SAE features moved by alignment (layer {result['layer']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ attribution
def _score(model, t: dict, kind: str) -> torch.Tensor:
    """Per-pair score for a batch from ``collate_pairs`` (rows: chosen then rejected)."""
    n = t["input_ids"].shape[0] // 2
    out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], use_cache=False)
    if kind in ("margin", "chosen_logp"):
        if not hasattr(out, "logits") or out.logits.shape[-1] < 2:
            raise ConfigError(f"score '{kind}' needs a causal LM")
        lp, _ = response_logps(out.logits, t["input_ids"], t["response_mask"])
        return lp[:n] - lp[n:] if kind == "margin" else lp[:n]
    r = out.logits[:, 0].float()
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
        s = _score(model, t, kind)
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
    sae, layer = _load_sae(cfg.sae, cfg.layer, model)
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
    with open(os.path.join(cfg.out, "attribution.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    torch.save(attr.cpu(), os.path.join(cfg.out, "attribution.pt"))
    _plot_validation(rows, os.path.join(cfg.out, "attribution.png"), corr)
    return result


def attribute_table(result: dict) -> str:
    v = result["validation"]
    lines = [
        f"score: {result['score']} ({SCORES[result['score']]}), mean {result['mean_score']:.4f} over {result['pairs']} pairs; "
        f"layer {result['layer']}",
        "",
        "| feature | attribution | top tokens (share of activation) | top context |",
        "|---|---|---|---|",
    ]
    for r in result["top"]:
        toks, ctx = _table_cells(r)
        lines.append(f"| {r['feature']} | {r['attribution']:+.4f} | {toks} | {ctx} |")
    lines += [
        "",
        f"validation by zero-ablation: Pearson r(predicted, real change) = {v['pearson_predicted_vs_ablation']:.3f}; "
        f"mean |change| top {v['mean_abs_change_top']:.4f} vs random active {v['mean_abs_change_random']:.4f}; "
        f"joint ablation of the positive top features: predicted {v['joint_ablation_of_positive_top']['predicted']:+.4f}, "
        f"real {v['joint_ablation_of_positive_top']['change']:+.4f}",
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
