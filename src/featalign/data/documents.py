"""Token-id documents for SAE training and evaluation, from any file the preference reader takes or from plain text.

A record may be ``text``; a conversation under ``messages``; ``prompt`` with ``response`` or ``completion``; or a
preference record of any format ``records`` reads, which gives two documents: prompt + chosen and prompt + rejected
(rendered exactly as training sees them). Preference records that cannot be clean pairs are dropped and counted.
"""

from __future__ import annotations

from ..errors import DataError
from .chat import renderer
from .records import DataStats, Drop, message_list, read_records, to_pair


def read_documents(path: str, tokenizer, split: str = "train", stats: DataStats | None = None) -> list[list[int]]:
    r = renderer(tokenizer)
    stats = stats if stats is not None else DataStats()
    stats.rendering = r.name
    docs: list[list[int]] = []
    for line, rec in read_records(path, split):
        stats.records += 1
        if not isinstance(rec, dict):
            raise DataError(f"a record must be an object, got {type(rec).__name__}", path, line)
        if isinstance(rec.get("text"), str):
            docs.append(tokenizer(rec["text"])["input_ids"])
        elif "messages" in rec:
            docs.append(r.conversation_ids(message_list(rec["messages"], path, line, "messages")))
        elif "chosen" in rec and "rejected" in rec:
            try:
                pair = to_pair(rec, path, line)
            except Drop as d:
                stats.drop(d.reason, f"{path}:{line}", str(d), strict=False)
                continue
            p = r.prompt_ids(pair.prompt, pair.raw_prompt)
            for answer in (pair.chosen, pair.rejected):
                docs.append(p + r.answer_ids(answer, raw=pair.raw_prompt is not None)[0])
        elif "prompt" in rec and isinstance(rec.get("response", rec.get("completion")), str):
            p = r.prompt_ids(rec["prompt"])
            docs.append(p + r.answer_ids(rec.get("response", rec.get("completion")))[0])
        else:
            raise DataError(
                f"needs 'text', 'messages', 'prompt' with 'response'/'completion', or 'chosen' and 'rejected' "
                f"(has {sorted(rec)})",
                path,
                line,
            )
    stats.kept = len(docs)
    if not docs:
        raise DataError("holds no documents", path)
    stats.report(path)
    return docs
