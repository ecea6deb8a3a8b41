"""The offline reference cache: computed once, then training runs with no reference model in memory.

Per pair it stores the reference's summed log-probs and response lengths of chosen and rejected, and, when
an SAE is given, each response's pooled SAE activations at the layer restricted to their top-k (indices +
values). Shards are written atomically (temp file + rename), so a killed build resumes without redoing
finished shards; ``manifest.json`` holds hashes of the model weights, SAE, data file and settings, and
training refuses a cache whose manifest does not match, naming the part that changed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .atomic import atomic_file
from .errors import CacheMismatchError, ConfigError

MANIFEST = "manifest.json"
IDENTITY = ("model", "data", "sae", "settings")


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def path_hash(path: str, patterns=("*.safetensors", "*.bin", "*.npz", "*.json", "*.model")) -> str:
    """Content hash of a file, or of the weight/config files of a folder (the identity of a model or SAE)."""
    if os.path.isfile(path):
        return file_hash(path)
    if not os.path.isdir(path):
        return f"name:{path}"
    files = sorted({f for p in patterns for f in glob.glob(os.path.join(path, p))})
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.basename(f).encode())
        h.update(file_hash(f).encode())
    return h.hexdigest()[:16]


@dataclass
class CacheSettings:
    layer: int | None = None
    k: int = 50
    max_length: int = 512
    max_prompt_length: int = 256


def expected_manifest(model: str, data: str, sae: str | None, settings: CacheSettings) -> dict:
    return {
        "model": path_hash(model),
        "data": path_hash(data),
        "sae": path_hash(sae) if sae else None,
        "settings": asdict(settings),
    }


def check_manifest(cache_dir: str, expected: dict) -> dict:
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.exists(path):
        raise CacheMismatchError(f"{cache_dir}: no {MANIFEST}; not a featalign reference cache (or its build never finished)")
    with open(path) as f:
        found = json.load(f)
    names = {"model": "the reference model's weights", "data": "the data file", "sae": "the SAE"}
    for part, what in names.items():
        if part == "sae" and expected.get("sae") is None:
            continue
        if found.get(part) != expected.get(part):
            raise CacheMismatchError(f"{cache_dir}: stale cache, {what} changed since it was built "
                                     f"({part} hash {found.get(part)} != {expected.get(part)}); rebuild with `featalign cache`")
    for key, val in expected["settings"].items():
        if key == "layer" and expected.get("sae") is None:
            continue
        if found["settings"].get(key) != val:
            raise CacheMismatchError(f"{cache_dir}: stale cache, setting '{key}' was {found['settings'].get(key)} "
                                     f"at build time, now {val}; rebuild with `featalign cache`")
    if not found.get("complete"):
        raise CacheMismatchError(f"{cache_dir}: the cache build did not finish; run `featalign cache` again to resume it")
    return found


@torch.no_grad()
def build_cache(model, tokenizer, pairs, out: str, manifest: dict, sae=None, layer: int | None = None, k: int = 50,
                batch_size: int = 16, shard_size: int = 512, progress: bool = True) -> str:
    """Compute the reference's log-probs (and top-k pooled SAE activations) for every pair, in shards."""
    from .data import collate_pairs
    from .models import capture_layer, check_layer, response_logps

    if sae is not None:
        if layer is None:
            raise ConfigError("a feature cache needs the SAE's layer (--layer)")
        check_layer(model, layer)
    os.makedirs(out, exist_ok=True)
    mpath = os.path.join(out, MANIFEST)
    if os.path.exists(mpath):
        with open(mpath) as f:
            old = json.load(f)
        if {k_: old.get(k_) for k_ in IDENTITY} != {k_: manifest.get(k_) for k_ in IDENTITY}:
            for f in glob.glob(os.path.join(out, "shard-*.safetensors")):
                os.remove(f)
    _write_json(mpath, {**manifest, "complete": False})
    model.eval()
    device = next(model.parameters()).device
    if sae is not None:
        sae = sae.to(device)
    n_shards = (len(pairs) + shard_size - 1) // shard_size
    bar = tqdm(total=len(pairs), desc="reference cache", disable=not progress)
    from safetensors.torch import save_file

    for s in range(n_shards):
        shard_path = os.path.join(out, f"shard-{s:05d}.safetensors")
        chunk = pairs[s * shard_size : (s + 1) * shard_size]
        if os.path.exists(shard_path):
            bar.update(len(chunk))
            continue
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(chunk), batch_size):
            mb = chunk[i : i + batch_size]
            b = {kk: v.to(device) for kk, v in collate_pairs(mb, tokenizer.pad_token_id).items()}
            if sae is not None:
                with capture_layer(model, layer) as box:
                    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
                pooled = sae.encode_pooled(box["h"], b["response_mask"])
                vals, idx = pooled.topk(min(k, pooled.shape[-1]), dim=-1)
            else:
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            lp, length = response_logps(logits, b["input_ids"], b["response_mask"])
            n = len(mb)
            new = {"index": b["index"], "chosen_logps": lp[:n], "rejected_logps": lp[n:],
                   "chosen_len": length[:n], "rejected_len": length[n:]}
            if sae is not None:
                new.update({"chosen_feat_idx": idx[:n].int(), "chosen_feat_val": vals[:n],
                            "rejected_feat_idx": idx[n:].int(), "rejected_feat_val": vals[n:]})
            for kk, v in new.items():
                parts.setdefault(kk, []).append(v.cpu())
            bar.update(n)
        atomic_file(shard_path, lambda tmp: save_file({kk: torch.cat(v).contiguous() for kk, v in parts.items()}, tmp))
    bar.close()
    _write_json(mpath, {**manifest, "complete": True, "n_pairs": len(pairs), "n_shards": n_shards})
    return out


def _write_json(path: str, obj: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    atomic_file(path, write)


class ReferenceCache:
    """The loaded cache: per-pair tensors addressed by pair index."""

    def __init__(self, cache_dir: str, expected: dict | None = None, n_pairs: int | None = None):
        from safetensors.torch import load_file

        self.manifest = check_manifest(cache_dir, expected) if expected is not None else json.load(open(os.path.join(cache_dir, MANIFEST)))
        shards = sorted(glob.glob(os.path.join(cache_dir, "shard-*.safetensors")))
        if len(shards) != self.manifest.get("n_shards"):
            raise CacheMismatchError(f"{cache_dir}: expected {self.manifest.get('n_shards')} shards, found {len(shards)}")
        parts: dict[str, list[torch.Tensor]] = {}
        for s in shards:
            for kk, v in load_file(s).items():
                parts.setdefault(kk, []).append(v)
        t = {kk: torch.cat(v) for kk, v in parts.items()}
        order = torch.argsort(t.pop("index"))
        self.tensors = {kk: v[order] for kk, v in t.items()}
        self.n = len(order)
        if n_pairs is not None and n_pairs != self.n:
            raise CacheMismatchError(f"{cache_dir}: cache holds {self.n} pairs, the data has {n_pairs}")
        self.has_features = "chosen_feat_idx" in self.tensors

    def batch(self, index: torch.Tensor, device=None) -> dict[str, torch.Tensor]:
        """The rows of ``index`` (on any device; the cache itself stays in CPU memory), moved to ``device``."""
        index = index.cpu()
        return {kk: v[index].to(device, non_blocking=True) for kk, v in self.tensors.items()}

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors.values())
