"""Build the built-in world: tokenizer, a tiny SFT'd Llama-style LM, and ground-truth-ranked preference pairs.

Everything lands under one folder and is saved with ``save_pretrained``, so later stages load it exactly
the way a Gemma user loads a hub model. The build is deterministic given the seed and cached: a folder
whose ``world.json`` records the same settings is reused as is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import data as D
from ..atomic import replace_dir, write_json
from ..config import Config, setting
from . import lang
from .probe import mood_oracle, mood_probe, probe_examples, topic_blind, topic_probe

# bumped when the language or the build changes in a way the settings do not show, so cached worlds rebuild
WORLD_VERSION = 4
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}<assistant> {{ m['content'] }} <eos> "
    "{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@dataclass
class WorldConfig(Config):
    """The built-in world's settings; a folder built with the same settings is reused."""

    seed: int = setting(0, "seed of the corpus, the preference pairs and the SFT run")
    n_sft: int = setting(16000, "SFT examples (prompt and one generated answer)", ge=1)
    n_sft_eval: int = setting(500, "held-out SFT examples for the perplexity figures", ge=1)
    n_train_pairs: int = setting(4000, "training preference pairs", ge=1)
    n_test_pairs: int = setting(500, "held-out preference pairs", ge=1)
    min_reward_gap: float = setting(0.15, "skip pairs whose two answers' ground-truth rewards differ by less", ge=0)
    hidden_size: int = setting(160, "width of the SFT model's residual stream", ge=8)
    intermediate_size: int = setting(448, "width of its MLPs", ge=8)
    num_layers: int = setting(4, "decoder layers", ge=1)
    num_heads: int = setting(4, "attention heads per layer", ge=1)
    # at 1,200 steps the model has not learnt to compare a noun's topic with the prompt's (topic probe 0.50, below the
    # 0.62 of a predictor blind to it); at 3,000 it has (0.997), and an SAE then finds a topic latent
    sft_steps: int = setting(3000, "SFT optimiser steps", ge=1)
    sft_batch_size: int = setting(32, "SFT examples per step", ge=1)
    sft_lr: float = setting(3e-3, "SFT peak learning rate", gt=0)

    @classmethod
    def quick(cls, seed: int = 0) -> WorldConfig:
        """A smaller world for tests: same language, fewer examples and SFT steps."""
        return cls(
            seed=seed,
            n_sft=4000,
            n_sft_eval=200,
            n_train_pairs=600,
            n_test_pairs=150,
            sft_steps=1000,
            hidden_size=128,
            intermediate_size=352,
        )


@dataclass
class WorldBuildConfig(Config):
    """`featalign world build`: the world is built once per settings and reused after."""

    out: str = setting("data/world", "world folder")
    seed: int = setting(0, "seed of the corpus, the pairs and the SFT run")
    quick: bool = setting(False, "the smaller world the tests use (about 90 s on 2 cores)")
    force: bool = setting(False, "rebuild even when a world with these settings is there")


def run_world_build(cfg: WorldBuildConfig) -> dict:
    """Build (or reuse) the world the command's settings name; returns its manifest."""
    cfg.validate()
    return build_world(
        cfg.out, WorldConfig.quick(cfg.seed) if cfg.quick else WorldConfig(seed=cfg.seed), force=cfg.force
    )


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + lang.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=["<user>", "<assistant>"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, cfg: WorldConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(mc)


def sample_examples(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        ex = lang.sample_prompt(rng)
        out.append({"prompt": ex.prompt, "response": lang.sample_response(rng, ex.topic)})
    return out


def sample_pairs(rng: random.Random, n: int, min_gap: float) -> list[dict]:
    """Two generator responses per prompt, ranked by the ground-truth reward; near-ties are skipped."""
    out = []
    while len(out) < n:
        ex = lang.sample_prompt(rng)
        a, b = lang.sample_response(rng, ex.topic), lang.sample_response(rng, ex.topic)
        ra, rb = lang.reward(ex.prompt, a), lang.reward(ex.prompt, b)
        if abs(ra - rb) < min_gap:
            continue
        (c, rc), (r, rr) = sorted([(a, ra), (b, rb)], key=lambda t: -t[1])
        out.append(
            {
                "prompt": ex.prompt,
                "chosen": c,
                "rejected": r,
                "chosen_reward": round(rc, 6),
                "rejected_reward": round(rr, 6),
            }
        )
    return out


def _encode(tokenizer, examples: list[dict]) -> list[tuple[list[int], list[int]]]:
    return [(D.encode_prompt(tokenizer, e["prompt"]), D.encode_response(tokenizer, e["response"])) for e in examples]


def _batch(tokenizer, encoded):
    seqs = [p + r for p, r in encoded]
    masks = [[0] * len(p) + [1] * len(r) for p, r in encoded]
    return D.pad_sequences(seqs, masks, tokenizer.pad_token_id)


def response_nll(model, tokenizer, encoded, batch_size: int = 64) -> float:
    """Mean negative log-likelihood per response token."""
    from ..models import response_logps

    model.eval()
    tot, n = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            b = _batch(tokenizer, encoded[i : i + batch_size])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            lp, length = response_logps(logits, b["input_ids"], b["response_mask"])
            tot -= lp.sum().item()
            n += length.sum().item()
    return tot / n


def unigram_nll(train_encoded, eval_encoded, vocab_size: int) -> float:
    """Add-one smoothed unigram model over response tokens: the baseline the SFT model must beat."""
    counts = Counter(t for _, r in train_encoded for t in r)
    total = sum(counts.values()) + vocab_size
    toks = [t for _, r in eval_encoded for t in r]
    return -sum(math.log((counts[t] + 1) / total) for t in toks) / len(toks)


def train_sft(model, tokenizer, encoded, cfg: WorldConfig, progress: bool = True) -> list[float]:
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, cfg.sft_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.sft_steps)))
    )
    from ..models import response_logps

    model.train()
    losses = []
    bar = tqdm(range(cfg.sft_steps), desc="world: SFT", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(encoded), (cfg.sft_batch_size,), generator=g).tolist()
        b = _batch(tokenizer, [encoded[i] for i in idx])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lp, length = response_logps(logits, b["input_ids"], b["response_mask"])
        loss = -lp.sum() / length.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def world_paths(out: str) -> dict[str, str]:
    return {
        "root": out,
        "sft": os.path.join(out, "sft"),
        "train": os.path.join(out, "prefs", "train.jsonl"),
        "test": os.path.join(out, "prefs", "test.jsonl"),
        "sft_text": os.path.join(out, "sft_text.jsonl"),
        "manifest": os.path.join(out, "world.json"),
    }


def build_world(
    out: str = "data/world", cfg: WorldConfig | None = None, progress: bool = True, force: bool = False
) -> dict:
    """Build (or reuse) the world under ``out``; returns the manifest (settings, paths, perplexities)."""
    cfg = cfg or WorldConfig()
    paths = world_paths(out)
    settings = {"version": WORLD_VERSION, **dataclasses.asdict(cfg)}
    if not force and os.path.exists(paths["manifest"]):
        with open(paths["manifest"]) as f:
            manifest = json.load(f)
        if manifest.get("config") == settings and all(os.path.exists(paths[k]) for k in ("sft", "train", "test")):
            return manifest
    t0 = time.time()
    tmp = f"{out}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tpaths = world_paths(tmp)
    os.makedirs(os.path.dirname(tpaths["train"]), exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    steps = tqdm(total=5, desc="world build", disable=not progress)
    steps.set_postfix_str("corpus")
    sft_train = sample_examples(rng, cfg.n_sft)
    sft_eval = sample_examples(rng, cfg.n_sft_eval)
    D.write_jsonl(tpaths["sft_text"], sft_train)
    steps.update()
    steps.set_postfix_str("tokenizer")
    tokenizer = build_tokenizer()
    enc_train, enc_eval = _encode(tokenizer, sft_train), _encode(tokenizer, sft_eval)
    steps.update()
    steps.set_postfix_str("SFT")
    with torch.random.fork_rng():
        model = build_model(tokenizer, cfg)
        losses = train_sft(model, tokenizer, enc_train, cfg, progress)
    steps.update()
    steps.set_postfix_str("evaluate")
    sft_nll = response_nll(model, tokenizer, enc_eval)
    probe_set = probe_examples()
    probes = {
        "mood_probe": round(mood_probe(model, tokenizer, probe_set), 4),
        "mood_oracle": round(mood_oracle(probe_set), 4),
        "topic_probe": round(topic_probe(model, tokenizer, probe_set), 4),
        "topic_blind": round(topic_blind(probe_set), 4),
    }
    uni_nll = unigram_nll(enc_train, enc_eval, len(tokenizer))
    model.save_pretrained(tpaths["sft"])
    tokenizer.save_pretrained(tpaths["sft"])
    steps.update()
    steps.set_postfix_str("preference pairs")
    D.write_jsonl(tpaths["train"], sample_pairs(rng, cfg.n_train_pairs, cfg.min_reward_gap))
    D.write_jsonl(tpaths["test"], sample_pairs(rng, cfg.n_test_pairs, cfg.min_reward_gap))
    steps.update()
    steps.close()
    manifest = {
        "config": settings,
        "vocab_size": len(tokenizer),
        "n_params": sum(p.numel() for p in model.parameters()),
        "sft_final_loss": losses[-1],
        "sft_ppl": math.exp(sft_nll),
        "unigram_ppl": math.exp(uni_nll),
        **probes,  # share of probability on the right polarity (0.5 = blind to mood) and on the right topic cue
        "build_seconds": round(time.time() - t0, 1),
        "paths": {k: os.path.relpath(v, out) for k, v in paths.items() if k != "root"},
    }
    write_json(tpaths["manifest"], manifest, indent=2)
    replace_dir(tmp, out)
    return manifest
