"""Preference data: one reader for every command (formats + record policy), chat rendering, batching.

``prepare_pairs`` is the entry point: records -> clean pairs -> token ids, with every dropped record counted
(``DataStats``) and reported once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from ..config import Config, setting
from .batching import (
    TokenizedPair,
    batches,
    collate_pairs,
    doc_batches,
    pad_sequences,
    pair_sequences,
    prompt_limit,
    tokenize_pairs,
)
from .chat import Renderer, encode_prompt, encode_response, prepare_tokenizer, renderer
from .documents import read_documents
from .records import REASONS, DataStats, Drop, PreferencePair, hh_turns, load_pairs, read_records, to_pair
from .split import split_by_prompt

log = logging.getLogger("featalign.data")


@dataclass
class DataOptions(Config):
    """How a command reads and tokenises preference data (shared by train, cache, eval, explain, attribute)."""

    data: str = setting(
        "", "preference data: a .jsonl, .json or .parquet file, a `datasets` folder, or a `datasets` name"
    )
    split: str = setting("train", "split to read from a `datasets` folder or name")
    limit: int | None = setting(
        None, "use only the first N pairs that pass the record checks (before length drops)", ge=1
    )
    max_length: int = setting(512, "most tokens of prompt plus answer", ge=2)
    max_prompt_length: int | None = setting(
        None, "most prompt tokens kept (cut on the left) when a pair is too long; default: half of max_length", ge=1
    )
    truncate_responses: bool = setting(False, "cut over-long answers on the right instead of dropping the pair")
    strict: bool = setting(
        False, "fail on the first record that cannot be a clean pair, instead of dropping and counting it"
    )

    def validate(self) -> None:
        super().validate()
        prompt_limit(self.max_length, self.max_prompt_length)


def prepare_pairs(
    opts: DataOptions, tokenizer, path: str | None = None, stats: DataStats | None = None
) -> tuple[list[PreferencePair], list[TokenizedPair], DataStats]:
    """Read, validate and tokenise ``path`` (default ``opts.data``): (kept pairs, their token ids, stats).
    ``pairs[i]`` is the record of ``tokenized[i]``."""
    path = path or opts.data
    stats = stats if stats is not None else DataStats()
    pairs = load_pairs(path, opts.split, opts.limit, stats, opts.strict)
    tokenized = tokenize_pairs(
        pairs, tokenizer, opts.max_length, opts.max_prompt_length, stats, opts.strict, opts.truncate_responses
    )
    stats.report(path)
    log.info("%s: %d pairs, rendered as %s", path, len(tokenized), stats.rendering)
    return [t.record for t in tokenized], tokenized, stats


def write_jsonl(path: str, records: list[dict]) -> None:
    """Write records atomically (temp file + rename) so a crash never leaves half a file."""
    from ..atomic import atomic_file

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    atomic_file(path, write)


__all__ = [
    "DataOptions",
    "DataStats",
    "Drop",
    "PreferencePair",
    "REASONS",
    "Renderer",
    "TokenizedPair",
    "batches",
    "collate_pairs",
    "doc_batches",
    "encode_prompt",
    "encode_response",
    "hh_turns",
    "load_pairs",
    "pad_sequences",
    "pair_sequences",
    "prepare_pairs",
    "prepare_tokenizer",
    "prompt_limit",
    "read_documents",
    "read_records",
    "renderer",
    "split_by_prompt",
    "to_pair",
    "tokenize_pairs",
    "write_jsonl",
]
