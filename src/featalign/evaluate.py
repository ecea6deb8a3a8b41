"""Evaluate a policy on held-out preference data, the same way for every method.

- ``pref_accuracy``: share of pairs whose chosen response has the higher length-normalised log-prob
  under the policy (reference-free, so the SFT model has a score too);
- ``reward_accuracy``: share of pairs ranked correctly by the DPO implicit reward log pi - log pi_ref
  (ties count one half; at policy == reference every pair ties, so SFT scores 0.5);
- sampled generations (``generate.sample`` with the stated temperature/top-p/top-k and seed): mean per-token
  predictive entropy, distinct-1/2, the sequence KL(policy || reference) on the policy's own samples, and, with
  a judge (``--reward-fn`` / ``--reward-model``, see ``judges``), the mean reward, the win rate against the
  reference's own samples on the same prompts and its length-controlled version, each with a standard error;
- ``feature_mse`` (with ``sae``/``layer``): FPO's D on the held-out chosen responses, policy vs reference.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass

import torch

from . import data as D
from .config import check_model_path, setting
from .data.batching import pair_length
from .generate import sample, write_outputs
from .judges import distinct_n, length_controlled_win_rate, make_judge, mean_se, win_rate
from .logprobs import response_positions, response_terms, sample_logps_entropy
from .models import capture_layer, load_model, load_tokenizer


@dataclass
class EvalConfig(D.DataOptions):
    """`featalign eval`: held-out preference accuracy, and sampled generations scored and compared to the reference."""

    model: str = setting("", "policy to evaluate: HF folder, hub id, or .gguf file")
    ref_model: str | None = setting(None, "reference for reward accuracy, KL and feature MSE (usually the SFT model)")
    sae: str | None = setting(None, "SAE for the feature MSE (FPO's D) between policy and reference")
    layer: int | None = setting(None, "decoder layer the SAE reads (default: the layer the SAE records)")
    k: int = setting(50, "top-k features of the feature MSE", ge=1)
    n_prompts: int = setting(128, "distinct held-out prompts to sample answers for", ge=1)
    samples_per_prompt: int = setting(1, "answers sampled per prompt", ge=1)
    max_new_tokens: int = setting(48, "most tokens per sampled answer", ge=1)
    temperature: float = setting(1.0, "sampling temperature (0: greedy)", ge=0)
    top_k: int = setting(0, "sample from the top-k tokens only (0: all)", ge=0)
    top_p: float = setting(1.0, "nucleus sampling mass", gt=0, le=1)
    batch_size: int = setting(32, "sequences per forward pass and per generation batch", ge=1)
    seed: int = setting(1234, "sampling seed")
    reward_fn: str | None = setting(
        None, "judge: a Python callable 'module:function' taking (prompt, response), returning a float or a dict"
    )
    reward_model: str | None = setting(
        None, "judge: a sequence-classification reward model (folder or hub id); its last logit is the reward"
    )
    progress: bool = setting(True, "show progress bars")
    save_generations: str | None = setting(
        None, "folder to write the sampled answers to (AlpacaEval model_outputs.json and JSONL)"
    )

    def validate(self) -> None:
        super().validate()
        check_model_path(self.model)
        check_model_path(self.ref_model or "", "ref_model")


def _by_length(lengths: list[int]) -> tuple[list[int], list[int]]:
    """An order that batches similar lengths together (little padding), and its inverse."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    inverse = [0] * len(order)
    for pos, i in enumerate(order):
        inverse[i] = pos
    return order, inverse


@torch.no_grad()
def _pair_logps(model, tok, pairs, batch_size, sae=None, layer=None):
    """Summed logps and lengths [N] for chosen and rejected, and pooled SAE features of chosen if asked. Only response
    positions are projected onto the vocabulary, a chunk at a time (``logprobs.response_terms``)."""
    out = {"c": [], "r": [], "cl": [], "rl": [], "feat": []}
    device = next(model.parameters()).device
    if sae is not None:
        sae = sae.to(device)
    order, inverse = _by_length([pair_length(p) for p in pairs])
    for b in D.batches([pairs[i] for i in order], batch_size):
        t = D.collate_pairs(b, tok.pad_token_id)
        positions = response_positions(t["response_mask"])
        t = {k: v.to(device) for k, v in t.items()}
        with capture_layer(model, layer) if sae is not None else contextlib.nullcontext() as box:
            r = response_terms(model, t["input_ids"], t["attention_mask"], t["response_mask"], positions)
        if sae is not None:
            out["feat"].append(sae.encode_pooled(box["h"], t["response_mask"])[: len(b)])
        n = len(b)
        lp, ln = r["logps"], r["length"]
        out["c"].append(lp[:n])
        out["r"].append(lp[n:])
        out["cl"].append(ln[:n])
        out["rl"].append(ln[n:])
    back = torch.tensor(inverse, device=device)
    return {k: torch.cat(v)[back] if v else None for k, v in out.items()}


@torch.no_grad()
def _sample_stats(model, ref, tok, prompts, responses, batch_size):
    """Per-sample sequence log-ratio log pi - log pi_ref and mean predictive entropy of the policy over answer tokens;
    the reference is run only for the log-ratio, and neither model materialises full-vocabulary logits for a batch."""
    device = next(model.parameters()).device
    order, inverse = _by_length([len(p) + len(r) for p, r in zip(prompts, responses)])
    kls, ents, n_tok = [], 0.0, 0
    for idx in D.batches(order, batch_size):
        seqs = [prompts[i] + responses[i] for i in idx]
        masks = [[0] * len(prompts[i]) + [1] * len(responses[i]) for i in idx]
        t = {k: v.to(device) for k, v in D.pad_sequences(seqs, masks, tok.pad_token_id).items()}
        lp, ent = sample_logps_entropy(model, t["input_ids"], t["attention_mask"], t["response_mask"])
        if ref is not None:
            r = response_terms(ref, t["input_ids"], t["attention_mask"], t["response_mask"])
            kls.append(lp.sum(-1) - r["logps"])
        ents += float(ent.sum())
        n_tok += int(t["response_mask"][:, 1:].sum())
    kl = torch.cat(kls)[torch.tensor(inverse, device=device)] if kls else None
    return kl, ents / max(n_tok, 1)


def eval_prompts(
    pairs: list[D.TokenizedPair], n_prompts: int, samples_per_prompt: int = 1
) -> tuple[list, list[list[int]]]:
    """The first ``n_prompts`` distinct prompts of the held-out pairs (as given, and as token ids), each repeated."""
    firsts: dict[str, D.TokenizedPair] = {}
    for t in pairs:
        if len(firsts) >= n_prompts:
            break
        firsts.setdefault(str(t.record.prompt), t)
    raw = [t.record.prompt for t in firsts.values() for _ in range(samples_per_prompt)]
    ids = [t.prompt_ids for t in firsts.values() for _ in range(samples_per_prompt)]
    return raw, ids


def answer(cfg: EvalConfig, model, tok, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[str]]:
    gens = sample(
        model,
        tok,
        prompt_ids,
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_k,
        cfg.batch_size,
        cfg.seed,
        cfg.top_p,
        progress=cfg.progress,
    )
    return gens, [tok.decode(g, skip_special_tokens=True) for g in gens]


def _judged(judge, prompts: list, texts: list[str]) -> dict:
    """Mean reward (± SE), the mean of every reward part, and the per-answer rewards."""
    scores = judge(prompts, texts)
    rewards = [s["reward"] for s in scores]
    m, se = mean_se(rewards)
    parts = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0] if k != "reward"} if scores else {}
    return {"reward": m, "reward_se": se, "reward_parts": parts, "rewards_per_prompt": rewards}


def reference_answers(cfg: EvalConfig, ref, tok, prompts: list, prompt_ids: list[list[int]], judge=None) -> dict:
    """The reference model's own samples on the evaluation prompts (same seed), judged: what win rates compare to.
    Computed once and passed to every policy's evaluation by ``compare``."""
    gens, texts = answer(cfg, ref, tok, prompt_ids)
    out = {
        "gens": gens,
        "texts": texts,
        "lengths": [len(g) for g in gens],
        "mean_length": sum(map(len, gens)) / max(1, len(gens)),
        "distinct1": distinct_n(texts, 1),
        "distinct2": distinct_n(texts, 2),
    }
    if judge is not None:
        out.update(_judged(judge, prompts, texts))
    return out


def evaluate_policy(cfg: EvalConfig, model=None, ref=None, tok=None, judge=None, reference: dict | None = None) -> dict:
    """Every figure of ``featalign eval`` for one policy. ``judge`` defaults to the one the config names;
    ``reference`` (from ``reference_answers``) is sampled here when a reference model is given and it is not."""
    from .losses import feature_mse

    cfg.validate()
    tok = tok or load_tokenizer(cfg.model)
    model = (model or load_model(cfg.model)).eval()
    if ref is None and cfg.ref_model:
        ref = load_model(cfg.ref_model).eval()
    judge = judge or make_judge(cfg.reward_fn, cfg.reward_model)
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
        # the reference's side of the held-out pairs is the same for every policy: computed once per reference
        rp = reference.get("pair_logps") if reference is not None else None
        if rp is None:
            rp = _pair_logps(ref, tok, pairs, cfg.batch_size, sae, layer)
            if reference is not None:
                reference["pair_logps"] = rp
        margin = (pol["c"] - rp["c"]) - (pol["r"] - rp["r"])
        res["reward_accuracy"] = float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())
        if sae is not None:
            idx = rp["feat"].topk(min(cfg.k, sae.d_sae), -1)
            res["feature_mse"] = float(feature_mse(pol["feat"], idx.indices, idx.values, cfg.k).mean())
    prompts, prompt_ids = eval_prompts(pairs, cfg.n_prompts, cfg.samples_per_prompt)
    if model is ref and reference is not None and len(reference["gens"]) == len(prompt_ids):
        gens, texts = reference["gens"], reference["texts"]  # the reference itself: its samples are already drawn
    else:
        gens, texts = answer(cfg, model, tok, prompt_ids)
    kl, ent = _sample_stats(model, ref, tok, prompt_ids, gens, cfg.batch_size)
    lengths = [len(g) for g in gens]
    res.update(
        {
            "n_generations": len(texts),
            "mean_length": sum(lengths) / len(lengths),
            "entropy": ent,
            "distinct1": distinct_n(texts, 1),
            "distinct2": distinct_n(texts, 2),
        }
    )
    if kl is not None:
        res["kl_to_ref"] = float(kl.mean())
    if judge is not None:
        res["judge"] = judge.name
        res.update(_judged(judge, prompts, texts))
    if ref is not None and reference is None:
        reference = reference_answers(cfg, ref, tok, prompts, prompt_ids, judge)
    if reference is not None:
        per_item = ("gens", "texts", "lengths", "rewards_per_prompt", "pair_logps")
        res["reference"] = {k: v for k, v in reference.items() if k not in per_item}
        if judge is not None and "rewards_per_prompt" in reference:
            a, b = res["rewards_per_prompt"], reference["rewards_per_prompt"]
            res["win_rate"], res["win_rate_se"] = win_rate(a, b)
            res["lc_win_rate"], res["lc_win_rate_se"] = length_controlled_win_rate(a, b, lengths, reference["lengths"])
    if cfg.save_generations:
        write_outputs(
            cfg.save_generations,
            os.path.basename(os.path.normpath(cfg.model or "policy")),
            prompts,
            texts,
            asdict(cfg),
            [{"reward": r} for r in res.get("rewards_per_prompt", [])] or None,
        )
    res["samples"] = [{"prompt": str(p), "response": t} for p, t in list(zip(prompts, texts))[:5]]
    return res
