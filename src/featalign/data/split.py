"""A held-out split made from one preference file, by prompt and with a fixed seed, so no test prompt is trained on."""

from __future__ import annotations

import hashlib
import json
import os

from .records import Drop, read_records, to_pair


def _bucket(prompt_key: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}\0{prompt_key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_by_prompt(
    path: str, out_dir: str, test_fraction: float = 0.1, seed: int = 0, split: str = "train"
) -> tuple[str, str]:
    """Write ``train.jsonl`` and ``test.jsonl`` in ``out_dir`` holding the records of ``path`` unchanged.

    A record goes to test when a seeded hash of its prompt falls below ``test_fraction``: every record of one prompt
    lands on the same side, and the split does not move when records are added, removed or reordered. Records that
    cannot be pairs go to train, where the training run drops and counts them."""
    from ..errors import ConfigError
    from . import write_jsonl

    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    parts: dict[str, list] = {"train": [], "test": []}
    for line, rec in read_records(path, split):
        try:
            key = json.dumps(to_pair(rec, path, line).prompt, sort_keys=True)
        except Drop:
            parts["train"].append(rec)
            continue
        parts["test" if _bucket(key, seed) < test_fraction else "train"].append(rec)
    for name, rows in parts.items():
        if not rows:
            raise ConfigError(
                f"{path}: a {test_fraction:g} held-out split by prompt leaves no {name} records; give --test-data"
            )
    os.makedirs(out_dir, exist_ok=True)
    paths = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "test.jsonl")
    write_jsonl(paths[0], parts["train"])
    write_jsonl(paths[1], parts["test"])
    return paths
