"""Token ids for pairs (with the length policy), and padded, masked batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .chat import renderer
from .records import NO_TOKENS, OVER_LENGTH, DataStats, PreferencePair


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int = 0
    record: PreferencePair | None = field(default=None, repr=False, compare=False)


def prompt_limit(max_length: int, max_prompt_length: int | None) -> int:
    """The prompt budget: as given (and below ``max_length``), else half of ``max_length`` (TRL's 512 of 1024)."""
    if max_prompt_length is None:
        return max_length // 2
    if max_prompt_length >= max_length:
        raise ConfigError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
    return max_prompt_length


def tokenize_pairs(
    pairs: list[PreferencePair],
    tokenizer,
    max_length: int = 512,
    max_prompt_length: int | None = None,
    stats: DataStats | None = None,
    strict: bool = False,
    truncate_responses: bool = False,
) -> list[TokenizedPair]:
    """Token ids of each pair; ``index`` numbers the kept pairs (it keys the offline cache).

    Length policy: when prompt + the longer answer exceed ``max_length``, the prompt keeps its last
    ``max_prompt_length`` tokens (left truncation). An answer that still does not fit is dropped as over-length
    (``truncate_responses`` cuts it on the right instead: the pair then compares prefixes the labeller never saw).
    An answer that tokenises to nothing is dropped. Both are counted in ``stats`` (errors with ``strict``).
    """
    max_prompt_length = prompt_limit(max_length, max_prompt_length)
    stats = stats if stats is not None else DataStats()
    r = renderer(tokenizer)
    stats.rendering = r.name
    out = []
    for pair in pairs:
        p = r.prompt_ids(pair.prompt, pair.raw_prompt)
        resp = []
        for name in ("chosen", "rejected"):
            ids, n_content = r.answer_ids(getattr(pair, name), raw=pair.raw_prompt is not None)
            if n_content == 0:
                stats.drop(NO_TOKENS, pair.source, f"field '{name}': tokenises to nothing", strict)
                break
            resp.append(ids)
        if len(resp) < 2:
            continue
        longest = max(map(len, resp))
        if len(p) + longest > max_length:
            if len(p) > max_prompt_length:
                p = p[-max_prompt_length:]
                stats.prompt_truncated += 1
            room = max_length - len(p)
            if longest > room:
                if not truncate_responses:
                    stats.drop(
                        OVER_LENGTH,
                        pair.source,
                        f"an answer of {longest} tokens does not fit max_length={max_length} "
                        f"beside a {len(p)}-token prompt",
                        strict,
                    )
                    continue
                resp = [x[:room] for x in resp]
                stats.response_truncated += 1
        out.append(TokenizedPair(p, resp[0], resp[1], len(out), pair))
    stats.kept = len(out)
    for what in ("prompt_truncated", "response_truncated"):
        if getattr(stats, what):
            stats.notes.append(
                f"{getattr(stats, what)} pair(s) {what.replace('_', ' ')} to fit max_length={max_length}"
            )
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


def doc_batches(
    docs: list[list[int]], batch_size: int, max_length: int, pad_id: int, device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) on ``device`` for token-id documents cut to ``max_length``."""
    for b in batches(docs, batch_size):
        seqs = [d[:max_length] for d in b]
        t = pad_sequences(seqs, [[1] * len(s) for s in seqs], pad_id)
        yield t["input_ids"].to(device), t["attention_mask"].to(device)


def pair_sequences(batch: list[TokenizedPair]) -> list[tuple[list[int], list[int]]]:
    """(prompt+response ids, response mask) for every chosen response, then every rejected one."""
    return [
        (ex.prompt_ids + getattr(ex, part), [0] * len(ex.prompt_ids) + [1] * len(getattr(ex, part)))
        for part in ("chosen_ids", "rejected_ids")
        for ex in batch
    ]


def collate_pairs(batch: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected; ``index`` keys the offline cache."""
    seqs = pair_sequences(batch)
    out = pad_sequences([s for s, _ in seqs], [m for _, m in seqs], pad_id)
    out["index"] = torch.tensor([ex.index for ex in batch], dtype=torch.long)
    return out


def pair_length(ex: TokenizedPair) -> int:
    """The padded width a pair needs: prompt + its longer answer."""
    return len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids))


def group_by_length(
    order: list[int], lengths: list[int], batch_size: int, generator: torch.Generator, window: int = 64
) -> list[int]:
    """``order`` rearranged so that each run of ``batch_size`` items has similar lengths, so little is padded.

    Which items fill the complete batches is left to ``order`` (a trailing partial batch stays last, unsorted,
    so the pairs an epoch drops are not always the short ones). Within windows of ``window`` batches the
    items are sorted longest first and cut into batches, then the batches are shuffled with ``generator``:
    a pure function of its inputs, so a seeded order resumes exactly."""
    n_full = len(order) // batch_size * batch_size
    span = batch_size * window
    ranked = [
        i for s in range(0, n_full, span) for i in sorted(order[s : min(s + span, n_full)], key=lambda j: -lengths[j])
    ]
    chunks = [ranked[s : s + batch_size] for s in range(0, n_full, batch_size)]
    return [i for k in torch.randperm(len(chunks), generator=generator).tolist() for i in chunks[k]] + order[n_full:]


def epoch_batches(
    n: int, lengths: list[int] | None, seed: int, epoch: int, batch_size: int, world: int = 1, rank: int = 0
) -> list[list[int]]:
    """This process's micro-batches of pair indices for an epoch: a permutation seeded by (seed, epoch), grouped by
    length when ``lengths`` are given, cut into global batches of ``batch_size * world`` and split across processes.
    A pure function of its arguments, so a resumed run sees the batches the killed one would have."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    global_bs = batch_size * world
    if lengths is not None:
        perm = group_by_length(perm, lengths, global_bs, g)
    return [
        perm[i + rank * batch_size : i + (rank + 1) * batch_size]
        for i in range(0, len(perm) - global_bs + 1, global_bs)
    ]


def micro_batches(epoch_batches_of, accum: int, step: int = 0):
    """Micro-batches from optimiser step ``step`` on, endlessly, each epoch's last incomplete accumulation dropped;
    ``epoch_batches_of(epoch)`` gives an epoch's micro-batches."""
    micro = step * accum
    epoch = 0
    while True:
        batches = epoch_batches_of(epoch)
        n_full = (len(batches) // accum) * accum
        if micro < n_full:
            yield from batches[micro:n_full]
            micro = 0
        else:
            micro -= n_full
        epoch += 1
