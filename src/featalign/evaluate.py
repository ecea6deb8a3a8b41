"""Evaluate a policy on held-out preference data, the same way for every method.

- ``pref_accuracy``: share of pairs whose chosen response has the higher length-normalised log-prob
  under the policy (reference-free, so the SFT model has a score too);
- ``reward_accuracy``: share of pairs ranked correctly by the DPO implicit reward log pi - log pi_ref
  (ties count one half; at policy == reference every pair ties, so SFT scores 0.5);
- sampled generations (``generate`` with the stated temperature/top-k and seed): mean ground-truth reward
  when the prompts come from the built-in world, mean per-token predictive entropy, distinct-2, and the
  sequence KL(policy || reference) estimated on the policy's own samples;
- ``feature_mse`` (with ``sae``/``layer``): FPO's D on the held-out chosen responses, policy vs reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import data as D
from .models import capture_layer, load_model, load_tokenizer, response_logps


@dataclass
class EvalConfig(D.DataOptions):
    """`featalign eval`: held-out preference accuracy, and sampled generations scored and compared to the reference."""

    model: str = field(default="", metadata={"help": "policy to evaluate: HF folder, hub id, or .gguf file"})
    ref_model: str | None = field(default=None, metadata={"help": "reference for reward accuracy, KL and feature MSE (usually the SFT model)"})
    sae: str | None = field(default=None, metadata={"help": "SAE for the feature MSE (FPO's D) between policy and reference"})
    layer: int | None = field(default=None, metadata={"help": "decoder layer the SAE reads (default: the layer the SAE records)"})
    k: int = field(default=50, metadata={"help": "top-k features of the feature MSE"})
    n_prompts: int = field(default=128, metadata={"help": "distinct held-out prompts to sample answers for"})
    samples_per_prompt: int = field(default=1, metadata={"help": "answers sampled per prompt"})
    max_new_tokens: int = field(default=48, metadata={"help": "max tokens per sampled answer"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=0, metadata={"help": "sample from the top-k tokens only (0: all)"})
    batch_size: int = field(default=32, metadata={"help": "sequences per forward pass / generation batch"})
    seed: int = field(default=1234, metadata={"help": "sampling seed"})
    world_reward: bool | None = field(default=None, metadata={"help": "score answers with the built-in world's reward (default: when every prompt is a world prompt)"})


@torch.no_grad()
def _pair_logps(model, tok, pairs, batch_size, sae=None, layer=None):
    """Summed logps and lengths [N] for chosen and rejected, and pooled SAE features of chosen if asked."""
    out = {"c": [], "r": [], "cl": [], "rl": [], "feat": []}
    device = next(model.parameters()).device
    if sae is not None:
        sae = sae.to(device)
    for b in D.batches(pairs, batch_size):
        t = {k: v.to(device) for k, v in D.collate_pairs(b, tok.pad_token_id).items()}
        if sae is not None:
            with capture_layer(model, layer) as box:
                logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
            out["feat"].append(sae.encode_pooled(box["h"], t["response_mask"])[: len(b)])
        else:
            logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        lp, ln = response_logps(logits, t["input_ids"], t["response_mask"])
        n = len(b)
        out["c"].append(lp[:n]); out["r"].append(lp[n:]); out["cl"].append(ln[:n]); out["rl"].append(ln[n:])
    return {k: torch.cat(v) if v else None for k, v in out.items()}


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]], max_new_tokens=48, temperature=1.0, top_k=0, batch_size=32, seed=1234):
    """Sample one response per prompt; returns response token lists (up to and including eos)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    outs = []
    for b in D.batches(prompts, batch_size):
        width = max(map(len, b))
        ids = torch.full((len(b), width), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, p in enumerate(b):
            ids[i, width - len(p):] = torch.tensor(p)
            att[i, width - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), do_sample=True,
                             temperature=temperature, top_k=top_k, top_p=1.0, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for row in gen[:, width:].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            else:
                row = [t for t in row if t != tok.pad_token_id]
            outs.append(row)
    return outs


@torch.no_grad()
def _sample_stats(model, ref, tok, prompts, responses, batch_size):
    """Per-sample sequence log-ratio log pi - log pi_ref and mean predictive entropy of the policy."""
    kls, ents, n_tok = [], 0.0, 0
    for bp, br in zip(D.batches(prompts, batch_size), D.batches(responses, batch_size)):
        seqs = [p + r for p, r in zip(bp, br)]
        masks = [[0] * len(p) + [1] * len(r) for p, r in zip(bp, br)]
        t = {k: v.to(model.device) for k, v in D.pad_sequences(seqs, masks, tok.pad_token_id).items()}
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        lp, _ = response_logps(logits, t["input_ids"], t["response_mask"])
        if ref is not None:
            rl = ref(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
            rlp, _ = response_logps(rl, t["input_ids"], t["response_mask"])
            kls.append(lp - rlp)
        logp = logits[:, :-1].float().log_softmax(-1)
        ent = -(logp.exp() * logp).sum(-1)
        m = t["response_mask"][:, 1:].float()
        ents += (ent * m).sum().item()
        n_tok += m.sum().item()
    return (torch.cat(kls) if kls else None), ents / max(n_tok, 1)


def distinct_n(texts: list[list[str]], n: int = 2) -> float:
    grams = [tuple(t[i : i + n]) for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def evaluate_policy(cfg: EvalConfig, model=None, ref=None, tok=None) -> dict:
    from .losses import feature_mse
    from .world import lang

    tok = tok or load_tokenizer(cfg.model)
    model = (model or load_model(cfg.model)).eval()
    if ref is None and cfg.ref_model:
        ref = load_model(cfg.ref_model).eval()
    _, pairs, stats = D.prepare_pairs(cfg, tok)
    sae, layer = None, None
    if cfg.sae and ref is not None:
        from .sae import load_sae, resolve_layer

        sae = load_sae(cfg.sae, cfg.layer)
        layer = resolve_layer(sae, cfg.layer, model, cfg.sae)
    pol = _pair_logps(model, tok, pairs, cfg.batch_size, sae, layer)
    res = {"n_pairs": len(pairs), "data": stats.summary()}
    res["pref_accuracy"] = float((pol["c"] / pol["cl"] > pol["r"] / pol["rl"]).float().mean())
    if ref is not None:
        rp = _pair_logps(ref, tok, pairs, cfg.batch_size, sae, layer)
        margin = (pol["c"] - rp["c"]) - (pol["r"] - rp["r"])
        res["reward_accuracy"] = float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())
        if sae is not None:
            idx = rp["feat"].topk(min(cfg.k, sae.d_sae), -1)
            res["feature_mse"] = float(feature_mse(pol["feat"], idx.indices, idx.values, cfg.k).mean())
    firsts: dict[str, D.TokenizedPair] = {}
    for t in pairs:
        if len(firsts) >= cfg.n_prompts:
            break
        firsts.setdefault(str(t.record.prompt), t)
    prompts_raw = [t.record.prompt for t in firsts.values() for _ in range(cfg.samples_per_prompt)]
    prompt_ids = [t.prompt_ids for t in firsts.values() for _ in range(cfg.samples_per_prompt)]
    gens = generate(model, tok, prompt_ids, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.batch_size, cfg.seed)
    texts = [tok.decode(g, skip_special_tokens=True) for g in gens]
    kl, ent = _sample_stats(model, ref, tok, prompt_ids, gens, cfg.batch_size)
    res.update({"n_generations": len(texts), "mean_length": sum(map(len, gens)) / len(gens), "entropy": ent,
                "distinct2": distinct_n([t.split() for t in texts])})
    if kl is not None:
        res["kl_to_ref"] = float(kl.mean())
    use_world = cfg.world_reward
    if use_world is None:
        use_world = all(isinstance(p, str) and lang.prompt_topic(p) for p in prompts_raw)
    if use_world:
        rewards = [lang.reward(p, t) for p, t in zip(prompts_raw, texts)]
        parts = [lang.reward_parts(p, t) for p, t in zip(prompts_raw, texts)]
        res["gt_reward"] = sum(rewards) / len(rewards)
        for key in ("topic", "sentiment", "length"):
            res[f"gt_{key}"] = sum(q[key] for q in parts) / len(parts)
        res["rewards_per_prompt"] = rewards
    res["samples"] = [{"prompt": str(p), "response": t} for p, t in list(zip(prompts_raw, texts))[:5]]
    return res
