"""Preference tasks built offline from a starting model and a ground-truth judge.

Each prompt is answered ``samples`` times by sampling the model; the best- and the worst-judged answers become
chosen and rejected (a pair whose two scores differ by less than ``min_gap`` is dropped: no preference). The same
judge then scores every method's samples in ``compare``, so the task has a ground truth the trained policies are
measured against, as in the DPO paper's IMDb experiment. The sentiment preset (VADER) and the arithmetic preset
(exact sums) are such tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .errors import ConfigError


@dataclass
class TaskConfig:
    """How a task is built (all of it is cached in its folder, keyed on these settings and the model)."""

    model: str = field(default="", metadata={"help": "starting model (default: the task's packaged model)"})
    n_train: int = field(default=256, metadata={"help": "training prompts"})
    n_test: int = field(default=64, metadata={"help": "held-out prompts for evaluation (no prompt is in both)"})
    max_new_tokens: int = field(default=40, metadata={"help": "max tokens per sampled answer"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the pair answers"})
    min_gap: float = field(
        default=0.05, metadata={"help": "drop a pair whose two judged scores differ by less (no preference)"}
    )
    samples: int = field(
        default=2, metadata={"help": "answers sampled per prompt; the best- and worst-judged are the pair"}
    )
    batch_size: int = field(default=32, metadata={"help": "prompts per generation batch"})
    seed: int = field(default=0, metadata={"help": "seed of the prompt split and the sampling"})


@dataclass(frozen=True)
class Task:
    """What a task is: its prompts, its judge, and the model it starts from when none is given."""

    name: str
    version: int
    prompts: Callable[[], list[str]]  # every prompt, in a fixed order
    reward: Callable[[str, str], dict[str, float]]  # the ground truth: (prompt, answer) -> {"reward": ..., parts}
    default_model: Callable[[], str | None]
    no_model: str  # what to say when there is neither --model nor the default
    trim: Callable[[str], str] = str.strip  # an answer as sampled -> the answer kept
    settings: dict = field(default_factory=dict)  # the task's own TaskConfig defaults


def task_paths(out: str) -> dict[str, str]:
    return {
        "train": os.path.join(out, "train.jsonl"),
        "test": os.path.join(out, "test.jsonl"),
        "manifest": os.path.join(out, "manifest.json"),
    }


def build_task(out: str, task: Task, cfg: TaskConfig, progress: bool = True) -> dict:
    """The task's folder: ``train.jsonl`` and ``test.jsonl`` (prompt/chosen/rejected with both judged scores; the
    chat template, if any, applies at tokenisation) and ``manifest.json``. Reused when built with the same settings
    and model."""
    from . import data as D
    from .generate import sample
    from .models import load_model, load_tokenizer, resolve_model
    from .reference import path_hash

    model_path = cfg.model or task.default_model()
    if not model_path:
        raise ConfigError(task.no_model)
    every = task.prompts()
    if cfg.n_train + cfg.n_test > len(every):
        raise ConfigError(f"n_train + n_test must be at most {len(every)} (the {task.name} task's prompts)")
    if cfg.samples < 2:
        raise ConfigError("samples must be at least 2 (a pair needs two answers)")
    task.reward(every[0], "")  # a judge that cannot run (a missing package) says so before any sampling
    p = task_paths(out)
    key = hashlib.sha256(
        json.dumps([task.name, task.version, asdict(cfg), path_hash(model_path)], sort_keys=True).encode()
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
    rng = random.Random(cfg.seed)
    rng.shuffle(every)
    split = {"test": every[: cfg.n_test], "train": every[cfg.n_test : cfg.n_test + cfg.n_train]}
    r = D.renderer(tok)
    stats = {}
    for name, ps in split.items():
        ids = [r.prompt_ids(q) for q in ps]
        answers = []
        for s in range(cfg.samples):
            seed = cfg.seed * 1000 + s * 7 + (name == "test")
            gens = sample(
                model, tok, ids, cfg.max_new_tokens, cfg.temperature, 0, cfg.batch_size, seed, progress=progress
            )
            answers.append([task.trim(tok.decode(g, skip_special_tokens=True)) for g in gens])
        rows, ties = [], 0
        for i, q in enumerate(ps):
            scored = sorted(((task.reward(q, a[i])["reward"], a[i]) for a in answers if a[i].strip()), reverse=True)
            if len(scored) < 2 or scored[0][0] - scored[-1][0] < cfg.min_gap:
                ties += 1
                continue
            (hi_r, hi), (lo_r, lo) = scored[0], scored[-1]
            rows.append({"prompt": q, "chosen": hi, "rejected": lo, "chosen_reward": hi_r, "rejected_reward": lo_r})
        D.write_jsonl(p[name], rows)
        stats[name] = {"prompts": len(ps), "pairs": len(rows), "dropped_ties": ties}
    manifest = {
        "key": key,
        "task": task.name,
        "version": task.version,
        "settings": asdict(cfg),
        "source_model": model_path,
        "stats": stats,
        "model": resolve_model(model_path),  # a GGUF file: every training run and evaluation reads its HF folder
        **{k: v for k, v in p.items() if k != "manifest"},
    }
    from .atomic import write_json

    write_json(p["manifest"], manifest, indent=1)  # written last: after a crash the next call rebuilds
    return manifest
