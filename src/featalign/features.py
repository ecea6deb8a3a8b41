"""SAE features of a model over texts: pooled activations, the tokens that carry a feature, and how features
relate to a judge's reward. Shared by ``explain``, ``attribute`` and feature selection."""

from __future__ import annotations

import torch

from . import data as D
from .models import capture_layer


def padded(seqs, pad_id: int, device) -> dict[str, torch.Tensor]:
    """(ids, response mask) pairs as a right-padded batch on ``device``."""
    b = D.pad_sequences([s for s, _ in seqs], [m for _, m in seqs], pad_id)
    return {k: v.to(device) for k, v in b.items()}


def load_sae_at(path: str, layer: int | None, model):
    """An SAE and the layer it reads (given, else the one it records), checked against ``model``."""
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
        t = padded(b, pad_id, device)
        with capture_layer(model, layer, stop=True) as box:
            model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], use_cache=False)
        out.append(sae.encode_pooled(box["h"].float(), t["response_mask"]).cpu())
    return torch.cat(out)


def columnwise_corr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson r of each column of ``x`` [N, F] with ``y`` [N] (0 for constant columns)."""
    xc, yc = x - x.mean(0), y - y.mean()
    den = xc.norm(dim=0) * yc.norm()
    return torch.where(den > 0, (xc * yc[:, None]).sum(0) / den.clamp(min=1e-12), torch.zeros_like(den))


def reward_relation(texts: list[tuple], pooled: torch.Tensor, shift: torch.Tensor, judge) -> tuple[torch.Tensor, dict]:
    """Each feature's correlation over the (prompt, response) ``texts`` (pooled activations [N, d_sae] in the same
    order) with the judge's reward and each part it reports, and how the policy's ``shift`` lines up with those
    correlations across features. Returns (corr [d_sae, parts], info); the reward itself is the last part."""
    scores = judge([p for p, _ in texts], [r for _, r in texts])
    names = [k for k in scores[0] if k != "reward"] + ["reward"]
    y = {n: torch.tensor([s[n] for s in scores], dtype=torch.float32) for n in names}
    corr = torch.stack([columnwise_corr(pooled, v) for v in y.values()], 1)
    summary = {n: float(columnwise_corr(shift[:, None], corr[:, i])[0]) for i, n in enumerate(y)}
    info = {
        "judge": judge.name,
        "parts": names,
        "shift_vs_feature_reward_corr": summary,
        "mean_reward_parts": {n: float(v.mean()) for n, v in y.items()},
    }
    return corr, info


@torch.no_grad()
def best_reward_features(model, sae, tokenizer, data: str, judge, limit: int | None = None) -> dict[str, dict]:
    """The latent with the largest |r| against the judge's reward and each of its parts, over every chosen and
    rejected response of ``data`` pooled as ``explain`` pools them: how well an SAE tracks what the judge reads.
    ``{part: {"r": |r|, "latent": id}}``."""
    raw, pairs, _ = D.prepare_pairs(D.DataOptions(data=data, limit=limit), tokenizer)
    texts = [(p.prompt, p.chosen) for p in raw] + [(p.prompt, p.rejected) for p in raw]
    pooled = pooled_features(model, sae, sae.cfg.layer, D.pair_sequences(pairs), tokenizer.pad_token_id)
    corr, info = reward_relation(texts, pooled, torch.zeros(pooled.shape[1]), judge)
    best = corr.abs().max(0)
    return {
        part: {"r": round(float(best.values[i]), 3), "latent": int(best.indices[i])}
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
        t = padded(b, tokenizer.pad_token_id, device)
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


def table_cells(row: dict) -> tuple[str, str]:
    """A feature's top tokens with their shares, and its top context, for a markdown table row."""
    toks = ", ".join(f"{t['token'].strip()} ({t['share']:.0%})" for t in row["top_tokens"][:3])
    ctx = row["contexts"][0]["context"].replace("|", "/") if row["contexts"] else ""
    return toks, ctx


def token_label(desc: dict, n: int = 3) -> str:
    return " ".join(t["token"].strip() or repr(t["token"]) for t in desc["top_tokens"][:n])
