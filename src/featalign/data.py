"""Preference data: read the usual formats, validate each record, tokenise, and build masked batches.

Formats accepted per record (JSONL, JSON list, Parquet, or a `datasets` name):
- ``prompt`` / ``chosen`` / ``rejected`` as strings;
- chat messages: ``chosen`` / ``rejected`` as lists of ``{"role", "content"}`` whose last message is the
  assistant's answer (the rest is the prompt unless ``prompt`` is given);
- Anthropic HH: ``chosen`` / ``rejected`` dialogues with ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` turns and no
  ``prompt``; the prompt is everything up to the last ``Assistant:`` turn.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .errors import ConfigError, DataError

log = logging.getLogger(__name__)
HH_ASSISTANT = "\n\nAssistant:"


@dataclass
class PreferencePair:
    prompt: str | list[dict]
    chosen: str
    rejected: str
    source: str = ""


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int = 0


@dataclass
class DataStats:
    records: int = 0
    identical: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    notes: list[str] = field(default_factory=list)


def read_records(path: str, split: str = "train") -> Iterator[tuple[int, Any]]:
    """Yield (line or record number, raw record) from a local file, or from `datasets` for a hub name."""
    if os.path.isdir(path) or not os.path.exists(path):
        if os.path.sep in path and not os.path.exists(path):
            raise DataError("no such file", path)
        try:
            import datasets
        except ImportError as e:
            raise DataError("not a local file, and `datasets` is not installed to load it by name", path) from e
        ds = datasets.load_dataset(path, split=split)
        for i, rec in enumerate(ds, 1):
            yield i, rec
        return
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError("reading Parquet needs `pyarrow` (pip install pyarrow)", path) from e
        for i, rec in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, rec
        return
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg}", path, e.lineno) from None
            if not isinstance(data, list):
                raise DataError("a .json file must hold a list of records", path)
            yield from enumerate(data, 1)
            return
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", path, i) from None


def _text(value: Any, path: str, line: int, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", path, line, name)
    if not value.strip():
        raise DataError("is empty", path, line, name)
    return value


def _messages(value: Any, path: str, line: int, name: str) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(f"expected a list of messages (the other response is one), got {type(value).__name__}", path, line, name)
    if not value:
        raise DataError("is an empty message list", path, line, name)
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"message {j} needs string 'role' and 'content'", path, line, name)
    return value


def to_pair(rec: Any, path: str = "<records>", line: int = 0) -> PreferencePair:
    """Validate one raw record and normalise it to a PreferencePair (raises DataError naming the field)."""
    if not isinstance(rec, dict):
        raise DataError(f"a record must be an object, got {type(rec).__name__}", path, line)
    for name in ("chosen", "rejected"):
        if name not in rec or rec[name] is None:
            raise DataError("is missing", path, line, name)
    src = f"{path}:{line}"
    chosen, rejected, prompt = rec["chosen"], rec["rejected"], rec.get("prompt")
    if isinstance(chosen, list) or isinstance(rejected, list):
        c = _messages(chosen, path, line, "chosen")
        r = _messages(rejected, path, line, "rejected")
        for name, msgs in (("chosen", c), ("rejected", r)):
            if msgs[-1]["role"] != "assistant":
                raise DataError("the last message must be the assistant's answer", path, line, name)
        if prompt is None:
            prompt = c[:-1]
            if not prompt:
                raise DataError("is missing and the chosen conversation has no turns before the answer", path, line, "prompt")
        return PreferencePair(_prompt(prompt, path, line), _text(c[-1]["content"], path, line, "chosen"),
                              _text(r[-1]["content"], path, line, "rejected"), src)
    chosen = _text(chosen, path, line, "chosen")
    rejected = _text(rejected, path, line, "rejected")
    if prompt is None:
        if HH_ASSISTANT not in chosen or HH_ASSISTANT not in rejected:
            raise DataError("is missing (and the record is not an Anthropic HH dialogue)", path, line, "prompt")
        cut = chosen.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)
        prompt, chosen_resp = chosen[:cut], chosen[cut:]
        if not rejected.startswith(prompt):
            cut_r = rejected.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)
            rejected_resp = rejected[cut_r:]
        else:
            rejected_resp = rejected[len(prompt):]
        return PreferencePair(_text(prompt, path, line, "prompt"), _text(chosen_resp, path, line, "chosen"),
                              _text(rejected_resp, path, line, "rejected"), src)
    return PreferencePair(_prompt(prompt, path, line), chosen, rejected, src)


def _prompt(prompt: Any, path: str, line: int) -> str | list[dict]:
    if isinstance(prompt, list):
        return _messages(prompt, path, line, "prompt")
    return _text(prompt, path, line, "prompt")


def load_pairs(path: str, split: str = "train", limit: int | None = None, stats: DataStats | None = None) -> list[PreferencePair]:
    """Load and validate every record; identical chosen/rejected pairs are dropped with a warning and counted."""
    stats = stats if stats is not None else DataStats()
    pairs = []
    for line, rec in read_records(path, split):
        pair = to_pair(rec, path, line)
        stats.records += 1
        if pair.chosen.strip() == pair.rejected.strip():
            stats.identical += 1
            continue
        pairs.append(pair)
        if limit is not None and len(pairs) >= limit:
            break
    if stats.identical:
        msg = f"{path}: dropped {stats.identical} record(s) whose chosen equals rejected"
        stats.notes.append(msg)
        log.warning(msg)
    if not pairs:
        raise DataError("holds no usable preference pairs", path)
    return pairs


def prepare_tokenizer(tokenizer):
    """Give a tokenizer without a pad token the eos token as pad (what TRL does), or fail clearly."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has neither a pad token nor an eos token; set one (tokenizer.pad_token = ...)")
        log.warning("tokenizer has no pad token; using eos token %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_prompt(tokenizer, prompt: str | list[dict], chat_template: bool | None = None) -> list[int]:
    """Prompt ids, through the tokenizer's chat template when it has one (generation prompt added)."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
    if use_chat:
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if isinstance(prompt, list):
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return tokenizer(prompt)["input_ids"]


def encode_response(tokenizer, response: str) -> list[int]:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def tokenize_pairs(pairs: list[PreferencePair], tokenizer, max_length: int = 512, max_prompt_length: int = 256,
                   stats: DataStats | None = None) -> list[TokenizedPair]:
    """Tokenise pairs. Truncation policy: keep the last ``max_prompt_length`` prompt tokens (left
    truncation) when prompt + response exceeds ``max_length``, then cut responses on the right; both counted."""
    if max_prompt_length >= max_length:
        raise ConfigError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
    stats = stats if stats is not None else DataStats()
    out = []
    for i, pair in enumerate(pairs):
        p = encode_prompt(tokenizer, pair.prompt)
        resp = []
        for name in ("chosen", "rejected"):
            ids = encode_response(tokenizer, getattr(pair, name))
            n_eos = int(tokenizer.eos_token_id is not None)
            if len(ids) <= n_eos:
                path, _, line = pair.source.rpartition(":")
                raise DataError("tokenises to nothing", path or None, int(line) if line.isdigit() else None, name)
            resp.append(ids)
        if len(p) + max(map(len, resp)) > max_length:
            if len(p) > max_prompt_length:
                p = p[-max_prompt_length:]
                stats.prompt_truncated += 1
            room = max_length - len(p)
            if max(map(len, resp)) > room:
                resp = [r[:room] for r in resp]
                stats.response_truncated += 1
        out.append(TokenizedPair(p, resp[0], resp[1], i))
    for what in ("prompt_truncated", "response_truncated"):
        if getattr(stats, what):
            msg = f"{getattr(stats, what)} pair(s) {what.replace('_', ' ')} to fit max_length={max_length}"
            stats.notes.append(msg)
            log.warning(msg)
    return out


def pad_sequences(seqs: list[list[int]], masks: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token lists into input_ids, attention_mask and the response (loss) mask."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    resp = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        resp[i, : len(s)] = torch.tensor(m)
    return {"input_ids": ids, "attention_mask": att, "response_mask": resp}


def batches(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def doc_batches(docs: list[list[int]], batch_size: int, max_length: int, pad_id: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) on ``device`` for token-id documents cut to ``max_length``."""
    for b in batches(docs, batch_size):
        seqs = [d[:max_length] for d in b]
        t = pad_sequences(seqs, [[1] * len(s) for s in seqs], pad_id)
        yield t["input_ids"].to(device), t["attention_mask"].to(device)


def pair_sequences(batch: list[TokenizedPair]) -> list[tuple[list[int], list[int]]]:
    """(prompt+response ids, response mask) for every chosen response, then every rejected one."""
    return [(ex.prompt_ids + getattr(ex, part), [0] * len(ex.prompt_ids) + [1] * len(getattr(ex, part)))
            for part in ("chosen_ids", "rejected_ids") for ex in batch]


def collate_pairs(batch: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected; ``index`` keys the offline cache."""
    seqs = pair_sequences(batch)
    out = pad_sequences([s for s, _ in seqs], [m for _, m in seqs], pad_id)
    out["index"] = torch.tensor([ex.index for ex in batch], dtype=torch.long)
    return out


def write_jsonl(path: str, records: list[dict]) -> None:
    """Write records atomically (temp file + rename) so a crash never leaves half a file."""
    from .atomic import atomic_file

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    atomic_file(path, write)
