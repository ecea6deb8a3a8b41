"""Reading preference records in the formats people have, and the policy for records that cannot be clean pairs.

Formats (one reader for every command):
- ``prompt`` / ``chosen`` / ``rejected`` strings;
- conversations: ``chosen`` / ``rejected`` message lists (``{"role", "content"}``, system and multi-turn included)
  whose last message is the assistant's answer; the turns before it are the prompt. A ``prompt`` beside them may be
  a string (UltraFeedback-binarized: it must be the last user turn of the conversation) or a message list (TRL's
  conversational format, where ``chosen``/``rejected`` may hold the answer alone);
- Anthropic HH: ``chosen`` / ``rejected`` dialogues of ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` turns, no ``prompt``;
  parsed into user/assistant turns, the raw text kept for tokenizers without a chat template.
Files: JSONL, JSON (a list), Parquet, a folder written by ``datasets``' ``save_to_disk``, or a ``datasets`` name.

Record policy: a record that is malformed (not an object, a field missing or of the wrong type) is an error naming
file, line and field: it means the file is not what the user thinks it is. A well-formed record that cannot be a
clean pair (an empty answer, chosen and rejected answering different conversations, chosen == rejected) is dropped,
counted by reason and reported; ``strict`` turns the first such record into an error. A pair is never re-assembled
from parts of two different conversations.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError

log = logging.getLogger("featalign.data")

HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")

# why a record was dropped; the keys of DataStats.dropped
EMPTY = "empty_response"
MISMATCH = "prompt_mismatch"
IDENTICAL = "identical"
MALFORMED_DIALOGUE = "malformed_dialogue"
NO_TOKENS = "no_tokens"
OVER_LENGTH = "over_length"
REASONS = {
    EMPTY: "an empty chosen or rejected answer",
    MISMATCH: "chosen and rejected answer different conversations (or disagree with 'prompt')",
    IDENTICAL: "chosen equals rejected",
    MALFORMED_DIALOGUE: "a dialogue that is not user/assistant turns ending in an assistant answer",
    NO_TOKENS: "an answer that tokenises to nothing",
    OVER_LENGTH: "an answer that does not fit max_length even after the prompt is truncated",
}


@dataclass
class PreferencePair:
    """One clean pair. ``prompt`` is a string or a message list; ``raw_prompt`` is set for formats that arrive as raw
    text (HH), where ``raw_prompt + chosen`` is the record's chosen dialogue exactly."""

    prompt: str | list[dict]
    chosen: str
    rejected: str
    source: str = ""
    raw_prompt: str | None = None


@dataclass
class DataStats:
    """What happened to a data file's records: how many were read and kept, and every drop by reason."""

    records: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    first_dropped: dict = field(default_factory=dict)
    prompt_truncated: int = 0
    response_truncated: int = 0
    rendering: str = ""
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, source: str, detail: str, strict: bool) -> None:
        if strict:
            path, _, line = source.rpartition(":")
            raise DataError(
                f"{detail} (dropped as {reason}; run without --strict to drop and count such records)",
                path or None,
                int(line) if line.isdigit() else None,
            )
        self.dropped[reason] += 1
        self.first_dropped.setdefault(reason, source)

    def summary(self) -> dict:
        return {
            "records": self.records,
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "first_dropped": dict(self.first_dropped),
            "prompt_truncated": self.prompt_truncated,
            "response_truncated": self.response_truncated,
            "rendering": self.rendering,
            "notes": list(self.notes),
        }

    def report(self, path: str) -> None:
        """Warn once about what was dropped; refuse data of which more than half could not be used."""
        n_drop = sum(self.dropped.values())
        if n_drop:
            parts = ", ".join(f"{n} {r} (first at {self.first_dropped[r]})" for r, n in self.dropped.most_common())
            msg = f"{path}: kept {self.kept} of {self.records} records; dropped {parts}"
            self.notes.append(msg)
            log.warning(msg)
        if self.records and n_drop > self.records / 2:
            raise DataError(
                f"more than half of the records cannot be used ({n_drop} of {self.records} dropped: "
                f"{dict(self.dropped)}); is this the right file and format?",
                path,
            )


class Drop(Exception):
    """A well-formed record that cannot be a clean pair."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ------------------------------------------------------------------------------------------------ files
def read_records(path: str, split: str = "train") -> Iterator[tuple[int, Any]]:
    """Yield (line or record number, raw record) from a local file or folder, or from ``datasets`` for a hub name."""
    if os.path.isdir(path):
        yield from _read_saved_dataset(path, split)
        return
    if not os.path.exists(path):
        # a name that can only be a local path is missing; anything else may be a hub dataset such as org/name
        local = path.startswith(("/", "./", "../", "~")) or path.count("/") > 1
        if local or path.endswith((".jsonl", ".json", ".parquet")):
            raise DataError("no such file", path)
        yield from _read_hub_dataset(path, split)
        return
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError("reading Parquet needs `pyarrow` (pip install 'featalign[data]')", path) from e
        yield from enumerate(pq.read_table(path).to_pylist(), 1)
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


def _datasets(path: str):
    try:
        import datasets
    except ImportError as e:
        raise DataError("reading this needs `datasets` (pip install 'featalign[data]')", path) from e
    return datasets


def _pick_split(ds, path: str, split: str):
    if hasattr(ds, "keys"):  # a DatasetDict
        if split not in ds:
            raise DataError(f"has no split {split!r}; it has {sorted(ds.keys())} (choose with --split)", path)
        return ds[split]
    return ds


def _read_saved_dataset(path: str, split: str):
    if not any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
        raise DataError(
            "is a folder but not one written by `datasets`' save_to_disk; give a .jsonl, .json or .parquet file", path
        )
    ds = _pick_split(_datasets(path).load_from_disk(path), path, split)
    yield from enumerate(ds, 1)


def _read_hub_dataset(path: str, split: str):
    datasets = _datasets(path)
    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # offline, unknown name, unknown split: one line, not a traceback from deep inside
        raise DataError(
            f"not a local file, and `datasets` could not load it by name: {str(e).splitlines()[0]}", path
        ) from None
    yield from enumerate(ds, 1)


# ------------------------------------------------------------------------------------------------ records
def _text(value: Any, path: str, line: int, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", path, line, name)
    return value


def message_list(value: Any, path: str, line: int, name: str) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(
            f"expected a list of messages (the other response is one), got {type(value).__name__}", path, line, name
        )
    if not value:
        raise DataError("is an empty message list", path, line, name)
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"message {j} needs string 'role' and 'content'", path, line, name)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _prompt(prompt: Any, path: str, line: int) -> str | list[dict]:
    if isinstance(prompt, list):
        return message_list(prompt, path, line, "prompt")
    if not _text(prompt, path, line, "prompt").strip():
        raise DataError("is empty", path, line, "prompt")
    return prompt


def _agrees(prompt: str | list[dict], context: list[dict]) -> bool:
    """Does a ``prompt`` field say the same as the conversation before the answer? A string must be its last user
    turn (UltraFeedback-binarized); a message list must be the whole context."""
    if isinstance(prompt, list):
        return prompt == context
    users = [m["content"] for m in context if m["role"] == "user"]
    return bool(users) and users[-1].strip() == prompt.strip()


def hh_turns(dialogue: str) -> list[dict] | None:
    """User/assistant turns of an HH dialogue (consecutive turns of one speaker merged), or None if it has none."""
    marks = list(_HH_TURN.finditer(dialogue))
    if not marks or dialogue[: marks[0].start()].strip():
        return None
    turns: list[dict] = []
    for m, nxt in zip(marks, marks[1:] + [None]):
        role = "user" if m.group(1) == "Human" else "assistant"
        content = dialogue[m.end() : nxt.start() if nxt else len(dialogue)].strip()
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + content
        else:
            turns.append({"role": role, "content": content})
    return turns


def _hh_pair(chosen: str, rejected: str, src: str) -> PreferencePair:
    cut_c, cut_r = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    prompt_c, prompt_r = chosen[: cut_c + len(HH_ASSISTANT)], rejected[: cut_r + len(HH_ASSISTANT)]
    if prompt_c != prompt_r:
        raise Drop(MISMATCH, "the chosen and rejected dialogues differ before their last Assistant turn")
    resp_c, resp_r = chosen[len(prompt_c) :], rejected[len(prompt_r) :]
    turns = hh_turns(prompt_c[: -len(HH_ASSISTANT)])
    if not turns or turns[0]["role"] != "user" or turns[-1]["role"] != "user" or not all(t["content"] for t in turns):
        raise Drop(
            MALFORMED_DIALOGUE, "the dialogue is not Human/Assistant turns starting with Human and ending in an answer"
        )
    return PreferencePair(turns, resp_c, resp_r, src, raw_prompt=prompt_c)


def to_pair(rec: Any, path: str = "<records>", line: int = 0) -> PreferencePair:
    """One raw record as a PreferencePair. Raises DataError for a malformed record (naming file, line and field) and
    Drop for a well-formed one that cannot be a clean pair."""
    if not isinstance(rec, dict):
        raise DataError(f"a record must be an object, got {type(rec).__name__}", path, line)
    for name in ("chosen", "rejected"):
        if name not in rec or rec[name] is None:
            raise DataError("is missing", path, line, name)
    src = f"{path}:{line}"
    chosen, rejected, prompt = rec["chosen"], rec["rejected"], rec.get("prompt")
    if isinstance(chosen, list) or isinstance(rejected, list):
        c, r = message_list(chosen, path, line, "chosen"), message_list(rejected, path, line, "rejected")
        for name, msgs in (("chosen", c), ("rejected", r)):
            if msgs[-1]["role"] != "assistant":
                raise DataError("the last message must be the assistant's answer", path, line, name)
        p = _prompt(prompt, path, line) if prompt is not None else None
        if c[:-1] != r[:-1]:
            raise Drop(MISMATCH, "the chosen and rejected conversations differ before the last answer")
        if c[:-1]:
            if p is not None and not _agrees(p, c[:-1]):
                raise Drop(MISMATCH, "'prompt' is not the conversation before the answer")
            conv = c[:-1]
        elif p is None:
            raise DataError(
                "is missing and the chosen conversation has no turns before the answer", path, line, "prompt"
            )
        else:
            conv = p
        pair = PreferencePair(conv, c[-1]["content"], r[-1]["content"], src)
    else:
        chosen, rejected = _text(chosen, path, line, "chosen"), _text(rejected, path, line, "rejected")
        if prompt is None:
            if HH_ASSISTANT not in chosen or HH_ASSISTANT not in rejected:
                raise DataError("is missing (and the record is not an Anthropic HH dialogue)", path, line, "prompt")
            pair = _hh_pair(chosen, rejected, src)
        else:
            pair = PreferencePair(_prompt(prompt, path, line), chosen, rejected, src)
    for name in ("chosen", "rejected"):
        if not getattr(pair, name).strip():
            raise Drop(EMPTY, f"field '{name}': the answer is empty")
    if pair.chosen.strip() == pair.rejected.strip():
        raise Drop(IDENTICAL, "chosen equals rejected")
    return pair


def load_pairs(
    path: str, split: str = "train", limit: int | None = None, stats: DataStats | None = None, strict: bool = False
) -> list[PreferencePair]:
    """Every clean pair of a data file (up to ``limit``), the others dropped and counted in ``stats`` (or, with
    ``strict``, the first one an error)."""
    stats = stats if stats is not None else DataStats()
    pairs = []
    for line, rec in read_records(path, split):
        stats.records += 1
        try:
            pairs.append(to_pair(rec, path, line))
        except Drop as d:
            stats.drop(d.reason, f"{path}:{line}", str(d), strict)
        if limit is not None and len(pairs) >= limit:
            break
    stats.kept = len(pairs)
    if not pairs:
        raise DataError(
            f"holds no usable preference pairs ({stats.records} records read, "
            f"dropped: {dict(stats.dropped) or 'none'})",
            path,
        )
    return pairs
