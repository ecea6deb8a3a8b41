"""The offline reference cache: computed once, then training runs with no reference model in memory.

Per pair it stores the reference's summed log-probs and response lengths of chosen and rejected, and, when
an SAE is given, each response's pooled SAE activations at the layer restricted to their top-k (indices +
values). Shards are written atomically (temp file + rename), so a killed build resumes without redoing
finished shards; ``manifest.json`` holds hashes of the model weights, SAE, data file and settings, and
training refuses a cache whose manifest does not match, naming the part that changed.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from .atomic import atomic_file, write_json
from .config import check_model_path, setting
from .data import DataOptions
from .errors import CacheMismatchError, ConfigError

MANIFEST = "manifest.json"
IDENTITY = ("model", "data", "sae", "settings")


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


HASHED = (
    "*.safetensors",
    "*.bin",
    "*.npz",
    "*.json",
    "*.model",
    "*.jinja",
    "*.gguf",
    "*.arrow",
    "*.parquet",
    "*.jsonl",
)


def path_hash(path: str, patterns=HASHED) -> str:
    """Content hash of a file, or of the weight/config/data files of a folder and its subfolders (the identity of a
    model, an SAE or a `datasets` folder); a name that is not on disk (a hub id) is its own identity."""
    if os.path.isfile(path):
        return file_hash(path)
    if not os.path.isdir(path):
        return f"name:{path}"
    files = sorted({f for p in patterns for f in glob.glob(os.path.join(path, "**", p), recursive=True)})
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.relpath(f, path).encode())
        h.update(file_hash(f).encode())
    return h.hexdigest()[:16]


@dataclass
class CacheSettings:
    """The settings a cache's contents depend on (besides model, data and SAE): a cache built under others is stale."""

    layer: int | None = None
    k: int = 50
    max_length: int = 512
    max_prompt_length: int | None = None
    truncate_responses: bool = False
    split: str = "train"
    limit: int | None = None
    fpo_variant: str = "paper"  # what of the SAE features is stored (feature_terms.reference_features)
    ablate: list[int] | None = None  # features projected out of the reference's layer (feature controls)
    named: list[int] | None = None  # features whose pooled values are stored (feature controls' preserve)

    def __post_init__(self):
        from .data import prompt_limit

        self.max_prompt_length = prompt_limit(self.max_length, self.max_prompt_length)


def cache_settings(
    opts: DataOptions,
    layer: int | None,
    k: int,
    fpo_variant: str = "paper",
    ablate: list[int] | None = None,
    named: list[int] | None = None,
) -> CacheSettings:
    """The cache settings of a command's data options (``layer`` and what of the SAE is stored only when the cache
    holds SAE features)."""
    features = layer is not None
    return CacheSettings(
        layer=layer,
        k=k,
        max_length=opts.max_length,
        max_prompt_length=opts.max_prompt_length,
        truncate_responses=opts.truncate_responses,
        split=opts.split,
        limit=opts.limit,
        fpo_variant=fpo_variant if features else "paper",
        ablate=(ablate or None) if features else None,
        named=(named or None) if features else None,
    )


@dataclass
class CacheConfig(DataOptions):
    """`featalign cache`: the reference's log-probs (and top-k pooled SAE activations) for every pair, on disk."""

    model: str = setting("", "reference model: HF folder, hub id, or .gguf file (or a folder holding one)")
    out: str = setting("", "cache folder to write (a finished build is reused, an unfinished one resumed)")
    sae: str | None = setting(
        None, "SAE whose top-k pooled activations FPO needs: SAELens, sparsify or Gemma Scope folder, or params.npz"
    )
    layer: int | None = setting(None, "decoder layer the SAE reads (default: the layer the SAE records)")
    k: int = setting(50, "top-k pooled SAE activations stored per response (FPO's k)", ge=1)
    batch_size: int = setting(16, "pairs per forward pass", ge=1)
    shard_size: int = setting(512, "pairs per shard (the unit a resumed build skips)", ge=1)
    fpo_variant: Literal["paper", "released"] = setting(
        "paper", "the FPO whose reference features to store: the paper's (top-k), or its released code's (dense sums)"
    )

    def validate(self) -> None:
        super().validate()
        if not self.model or not self.data or not self.out:
            raise ConfigError("cache needs model, data and out (--model, --data, --out)")
        check_model_path(self.model)

    def settings(self, layer: int | None) -> CacheSettings:
        return cache_settings(self, layer, self.k, self.fpo_variant)


def run_cache(cfg: CacheConfig) -> str:
    """Build (or finish, or reuse) the cache ``cfg`` names; returns its folder."""
    from .data import prepare_pairs
    from .models import load_model, load_tokenizer

    cfg.validate()
    tok = load_tokenizer(cfg.model)
    _, pairs, _ = prepare_pairs(cfg, tok)
    model = load_model(cfg.model)
    sae, layer = None, None
    if cfg.sae:
        from .sae import load_sae, resolve_layer

        sae = load_sae(cfg.sae, cfg.layer)
        layer = resolve_layer(sae, cfg.layer, model, cfg.sae)
    manifest = expected_manifest(cfg.model, cfg.data, cfg.sae, cfg.settings(layer))
    build_cache(
        model,
        tok,
        pairs,
        cfg.out,
        manifest,
        sae,
        layer,
        cfg.k,
        batch_size=cfg.batch_size,
        shard_size=cfg.shard_size,
        fpo_variant=cfg.fpo_variant,
    )
    return cfg.out


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
        raise CacheMismatchError(
            f"{cache_dir}: no {MANIFEST}; not a featalign reference cache (or its build never finished)"
        )
    with open(path) as f:
        found = json.load(f)
    names = {"model": "the reference model's weights", "data": "the data file", "sae": "the SAE"}
    if expected.get("sae") is not None and found.get("sae") is None:
        raise CacheMismatchError(
            f"{cache_dir}: built without an SAE, so it holds no SAE features; FPO needs a cache "
            "built with --sae (and --layer)"
        )
    for part, what in names.items():
        if part == "sae" and expected.get("sae") is None:
            continue
        if found.get(part) != expected.get(part):
            raise CacheMismatchError(
                f"{cache_dir}: stale cache, {what} changed since it was built "
                f"({part} hash {found.get(part)} != {expected.get(part)}); rebuild with `featalign cache`"
            )
    for key, val in expected["settings"].items():
        if key in ("layer", "fpo_variant") and expected.get("sae") is None:  # features only
            continue
        if found["settings"].get(key) != val:
            raise CacheMismatchError(
                f"{cache_dir}: stale cache, setting '{key}' was {found['settings'].get(key)} "
                f"at build time, now {val}; rebuild with `featalign cache`"
            )
    if not found.get("complete"):
        raise CacheMismatchError(
            f"{cache_dir}: the cache build did not finish; run `featalign cache` again to resume it"
        )
    return found


@torch.no_grad()
def build_cache(
    model,
    tokenizer,
    pairs,
    out: str,
    manifest: dict,
    sae=None,
    layer: int | None = None,
    k: int = 50,
    batch_size: int = 16,
    shard_size: int = 512,
    progress: bool = True,
    fpo_variant: str = "paper",
    ablate_basis: torch.Tensor | None = None,
    named: list[int] | None = None,
) -> str:
    """Compute the reference's log-probs (and top-k pooled SAE activations) for every pair, in shards. With
    ``ablate_basis`` the reference runs with those directions projected out of its SAE layer (as the policy trains);
    ``named`` features also get their pooled values stored (``named_val``), what ``preserve`` holds the policy to."""
    from .controls import ablation
    from .data import collate_pairs
    from .feature_terms import capture, reference_features
    from .logprobs import response_positions, response_terms
    from .models import check_layer

    t0 = time.time()
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
    write_json(mpath, {**manifest, "complete": False})
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
            b = collate_pairs(mb, tokenizer.pad_token_id)
            positions = response_positions(b["response_mask"])
            b = {kk: v.to(device) for kk, v in b.items()}
            capturing = capture(model, layer, fpo_variant) if sae is not None else contextlib.nullcontext()
            with ablation([model], layer, ablate_basis), capturing as box:
                r = response_terms(model, b["input_ids"], b["attention_mask"], b["response_mask"], positions)
            feats = reference_features(sae, box["h"], b["response_mask"], k, fpo_variant) if sae is not None else {}
            if named:
                feats["named_val"] = sae.encode_pooled(box["h"], b["response_mask"])[:, named]
            lp, length = r["logps"], r["length"]
            n = len(mb)
            new = {
                "index": b["index"],
                "chosen_logps": lp[:n],
                "rejected_logps": lp[n:],
                "chosen_len": length[:n],
                "rejected_len": length[n:],
            }
            for name, v in feats.items():
                new[f"chosen_{name}"], new[f"rejected_{name}"] = v[:n], v[n:]
            for kk, v in new.items():
                parts.setdefault(kk, []).append(v.cpu())
            bar.update(n)
        shard = {kk: torch.cat(v).contiguous() for kk, v in parts.items()}
        atomic_file(shard_path, lambda tmp, shard=shard: save_file(shard, tmp))
    bar.close()
    write_json(
        mpath,
        {
            **manifest,
            "complete": True,
            "n_pairs": len(pairs),
            "n_shards": n_shards,
            "build_seconds": round(time.time() - t0, 2),
        },
    )
    return out


class ReferenceCache:
    """The loaded cache: per-pair tensors addressed by pair index."""

    def __init__(self, cache_dir: str, expected: dict | None = None, n_pairs: int | None = None):
        from safetensors.torch import load_file

        self.manifest = (
            check_manifest(cache_dir, expected)
            if expected is not None
            else json.load(open(os.path.join(cache_dir, MANIFEST)))
        )
        shards = sorted(glob.glob(os.path.join(cache_dir, "shard-*.safetensors")))
        if len(shards) != self.manifest.get("n_shards"):
            raise CacheMismatchError(
                f"{cache_dir}: expected {self.manifest.get('n_shards')} shards, found {len(shards)}"
            )
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
        self.has_features = "chosen_feat_idx" in self.tensors or "chosen_feat_sum" in self.tensors

    def batch(self, index: torch.Tensor, device=None) -> dict[str, torch.Tensor]:
        """The rows of ``index`` (on any device; the cache itself stays in CPU memory), moved to ``device``."""
        index = index.cpu()
        gpu = torch.device(device or "cpu").type == "cuda"
        return {
            kk: (v[index].pin_memory() if gpu else v[index]).to(device, non_blocking=gpu)
            for kk, v in self.tensors.items()
        }

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors.values())


@torch.no_grad()
def update_reference(policy, ref_model, a: float, adapter_off: bool) -> None:
    """TR-DPO: theta_ref <- a * theta + (1 - a) * theta_ref (a = 1: hard copy).

    With LoRA the reference is the base weights W and the policy W + BA, so the update is W <- W + a BA,
    B <- (1 - a) B: the policy is unchanged and the reference (adapter off) is exactly the mix."""
    if adapter_off:
        from peft.tuners.lora import LoraLayer

        for m in policy.modules():
            if isinstance(m, LoraLayer):
                for name in m.active_adapters:
                    if name in m.lora_A:
                        base = m.get_base_layer().weight
                        base.add_(m.get_delta_weight(name).to(base.dtype), alpha=a)
                        m.lora_B[name].weight.mul_(1 - a)
        return
    pol = policy.state_dict()
    for name, p in ref_model.state_dict().items():
        if p.dtype.is_floating_point:
            p.mul_(1 - a).add_(pol[name].to(p.dtype), alpha=a)
