"""`featalign generate`: a model's answers to a prompt file, in the formats external judges read.

Writes ``model_outputs.json`` (AlpacaEval: ``instruction``, ``output``, ``generator``), ``generations.jsonl`` (one
record per answer, with its prompt as given) and ``settings.json`` (the chat rendering and sampling settings), so
AlpacaEval 2, Arena-Hard or MT-Bench judges can be run on another machine. ``sample`` is the one sampler that
``eval``, ``explain`` and ``compare`` use too.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from . import data as D
from .config import Config, check_model_path, setting
from .errors import ConfigError


def stop_ids(tok) -> list[int]:
    """Token ids that end an answer: eos, and the chat template's end-of-turn marker when it is one token."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    r = D.renderer(tok)
    if r.template and r.end_of_turn:
        eot = tok(r.end_of_turn, add_special_tokens=False)["input_ids"]
        if len(eot) == 1 and eot[0] not in ids:
            ids.append(eot[0])
    return ids


@torch.no_grad()
def sample(
    model,
    tok,
    prompts: list[list[int]],
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int = 0,
    batch_size: int = 32,
    seed: int = 1234,
    top_p: float = 1.0,
    progress: bool = False,
) -> list[list[int]]:
    """One answer per prompt (token ids up to and including the stop token). Prompts are batched by length so
    little of a batch is padding; temperature 0 is greedy."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    stops = stop_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs: list[list[int] | None] = [None] * len(prompts)
    greedy = temperature == 0
    kw = dict(do_sample=not greedy, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=stops)
    if not greedy:
        kw.update(temperature=temperature, top_k=top_k, top_p=top_p)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            p = prompts[i]
            ids[row, width - len(p) :] = torch.tensor(p)
            att[row, width - len(p) :] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **kw)
        for row, i in enumerate(idx):
            toks = gen[row, width:].tolist()
            end = next((j for j, t in enumerate(toks) if t in stops), None)
            outs[i] = toks[: end + 1] if end is not None else [t for t in toks if t != pad]
    return outs


def _prompt_of(rec, path: str, line: int):
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict):
        for key in ("instruction", "prompt"):
            if isinstance(rec.get(key), (str, list)) and rec[key]:
                return rec[key]
        if isinstance(rec.get("messages"), list):
            msgs = rec["messages"]
            return msgs[:-1] if msgs and msgs[-1].get("role") == "assistant" else msgs
        if "chosen" in rec:
            return D.to_pair(rec, path, line).prompt
    raise ConfigError(
        f"{path}:{line}: a prompt record needs 'instruction', 'prompt' or 'messages' (got {str(rec)[:80]!r})"
    )


def read_prompts(path: str, limit: int | None = None, split: str = "train") -> list:
    """Distinct prompts (strings or message lists) in file order: .txt (one per line), AlpacaEval's
    .json eval set, JSONL/Parquet/`datasets` records with instruction/prompt/messages, or preference records."""
    if not path:
        raise ConfigError("give a prompt file (--prompts)")
    if path.endswith(".txt"):
        if not os.path.exists(path):
            raise ConfigError(f"prompt file not found: {path}")
        with open(path, encoding="utf-8") as f:
            items = [(i + 1, line.strip()) for i, line in enumerate(f) if line.strip()]
    else:
        items = list(D.read_records(path, split))
    seen, out = set(), []
    for line, rec in items:
        p = _prompt_of(rec, path, line)
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(p)
            if limit and len(out) >= limit:
                break
    if not out:
        raise ConfigError(f"{path}: holds no prompts")
    return out


def instruction_text(prompt) -> str:
    """What AlpacaEval's ``instruction`` field holds: the last user turn of a conversation."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


def write_outputs(
    out: str, generator: str, prompts: list, answers: list[str], settings: dict, extra: list[dict] | None = None
) -> None:
    """model_outputs.json (AlpacaEval), generations.jsonl and settings.json, each written atomically."""
    from .atomic import write_json

    os.makedirs(out, exist_ok=True)
    alpaca = [
        {"instruction": instruction_text(p), "output": a, "generator": generator} for p, a in zip(prompts, answers)
    ]
    rows = [
        {"prompt": p, "output": a, "generator": generator, **(extra[i] if extra else {})}
        for i, (p, a) in enumerate(zip(prompts, answers))
    ]

    write_json(os.path.join(out, "model_outputs.json"), alpaca, indent=1)
    D.write_jsonl(os.path.join(out, "generations.jsonl"), rows)
    write_json(os.path.join(out, "settings.json"), settings, indent=1)


@dataclass
class GenerateConfig(Config):
    """`featalign generate`: answers to a prompt file for external judges (AlpacaEval 2, Arena-Hard, MT-Bench)."""

    model: str = setting("", "model to sample from: HF folder, hub id, or .gguf file")
    prompts: str = setting(
        "", "prompts: .txt (one per line), AlpacaEval .json, or records with instruction, prompt or messages"
    )
    out: str = setting("generations", "output folder (model_outputs.json, generations.jsonl, settings.json)")
    split: str = setting("train", "split to read from a `datasets` folder or name")
    limit: int | None = setting(None, "answer only the first N distinct prompts", ge=1)
    generator: str | None = setting(None, "the name AlpacaEval shows for this model (default: the model folder's name)")
    max_new_tokens: int = setting(256, "most tokens per answer", ge=1)
    temperature: float = setting(0.7, "sampling temperature (0: greedy)", ge=0)
    top_p: float = setting(1.0, "nucleus sampling mass", gt=0, le=1)
    top_k: int = setting(0, "sample from the top-k tokens only (0: all)", ge=0)
    batch_size: int = setting(16, "prompts per generation batch", ge=1)
    seed: int = setting(1234, "sampling seed")

    def validate(self) -> None:
        super().validate()
        if not self.model or not self.prompts:
            raise ConfigError("generate needs model and prompts (--model, --prompts)")
        check_model_path(self.model)


def run_generate(cfg: GenerateConfig) -> str:
    from .models import load_model, load_tokenizer

    cfg.validate()
    prompts = read_prompts(cfg.prompts, cfg.limit, cfg.split)
    tok = D.prepare_tokenizer(load_tokenizer(cfg.model))
    model = load_model(cfg.model).eval()
    r = D.renderer(tok)
    ids = [r.prompt_ids(p) for p in prompts]
    gens = sample(
        model,
        tok,
        ids,
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_k,
        cfg.batch_size,
        cfg.seed,
        cfg.top_p,
        progress=True,
    )
    answers = [tok.decode(g, skip_special_tokens=True).strip() for g in gens]
    generator = cfg.generator or os.path.basename(os.path.normpath(cfg.model)) or "model"
    settings = {
        **asdict(cfg),
        "rendering": r.name,
        "chat_template": getattr(tok, "chat_template", None),
        "stop_token_ids": stop_ids(tok),
        "n_prompts": len(prompts),
    }
    write_outputs(cfg.out, generator, prompts, answers, settings, [{"n_tokens": len(g)} for g in gens])
    return cfg.out
