"""One SAE module for ReLU, TopK and JumpReLU, and loading/saving in the formats researchers already have.

Formats: Gemma Scope ``params.npz``; SAELens folders (``cfg.json`` + ``sae_weights.safetensors``). featalign
saves the SAELens layout, adding a ``featalign`` block to ``cfg.json`` (layer, model, training stats), so
SAELens' ``SAE.load_from_disk`` reads what featalign trains and featalign reads SAELens' folders as is.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..atomic import replace_dir
from ..errors import ConfigError

ARCHITECTURES = ("relu", "topk", "jumprelu")
_SAELENS_ARCH = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}
_TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int | None = 32
    apply_b_dec_to_input: bool = True
    layer: int | None = None
    model: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown SAE architecture {self.architecture!r}; choose from {list(ARCHITECTURES)}")
        if self.architecture == "topk" and not (self.k and 0 < self.k <= self.d_sae):
            raise ConfigError(f"a TopK SAE needs 0 < k <= d_sae ({self.d_sae}), got k={self.k}")


class SAE(nn.Module):
    """``pre = (x - b_dec*centre) @ W_enc + b_enc``; ``f = act(pre)``; ``x_hat = f @ W_dec + b_dec``."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae))

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(pre)
        if arch == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.encode_pre(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def decode_sparse(self, indices: torch.Tensor, values: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """Decode from (indices, values) [..., k]: a weighted sum of only the k active decoder rows
        (``embedding_bag``: no [tokens, d_sae] matrix, and no [tokens, k, d_in] gather either)."""
        k = indices.shape[-1]
        out = torch.nn.functional.embedding_bag(indices.reshape(-1, k), self.W_dec, per_sample_weights=values.reshape(-1, k).to(self.W_dec.dtype),
                                                mode="sum").reshape(*indices.shape[:-1], self.d_in)
        return out + self.b_dec if bias else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.architecture == "topk":
            vals, idx = self.encode_pre(x).topk(self.cfg.k, dim=-1, sorted=False)
            return self.decode_sparse(idx, vals.relu())
        return self.decode(self.encode(x))

    def encode_pooled(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of ``encode`` over the positions where ``mask`` [N, T] is set, for ``h`` [N, T, d_in].

        Equal to ``pool_response(encode(h), mask)`` but encodes only the masked positions, and for TopK
        adds the k active values straight into the pooled rows: the dense per-token activations are never
        materialised for backward, which is most of FPO's memory beyond the policy itself.
        """
        sel = mask.bool()
        x = h[sel].to(self.W_enc.dtype)
        rows = sel.nonzero()[:, 0]
        pooled = torch.zeros(h.shape[0], self.d_sae, dtype=x.dtype, device=x.device)
        if self.cfg.architecture == "topk":
            vals, idx = self.encode_pre(x).topk(self.cfg.k, dim=-1, sorted=False)
            pooled = pooled.index_put((rows[:, None].expand_as(idx).reshape(-1), idx.reshape(-1)), vals.relu().reshape(-1),
                                      accumulate=True)
        else:
            pooled = pooled.index_add(0, rows, self.encode(x))
        return pooled / sel.sum(1, keepdim=True).clamp(min=1).to(x.dtype)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True).clamp(min=1e-8)

    # --- persistence -----------------------------------------------------------------------------
    def save(self, path: str, extra: dict | None = None) -> str:
        """Save in the SAELens folder layout, atomically (temp folder + rename)."""
        from safetensors.torch import save_file

        tmp = f"{path.rstrip('/')}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, os.path.join(tmp, "sae_weights.safetensors"))
        cfg = {
            "architecture": _TO_SAELENS[self.cfg.architecture], "d_in": self.cfg.d_in, "d_sae": self.cfg.d_sae,
            "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": self.cfg.apply_b_dec_to_input,
            "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"hook_name": f"layers.{self.cfg.layer}" if self.cfg.layer is not None else None,
                         "model_name": self.cfg.model},
            "featalign": {**asdict(self.cfg), "extra": {**self.cfg.extra, **(extra or {})}},
        }
        if self.cfg.architecture == "topk":
            cfg["k"] = self.cfg.k
            cfg["rescale_acts_by_decoder_norm"] = False
        with open(os.path.join(tmp, "cfg.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        replace_dir(tmp, path)
        return path


def _check_shapes(t: dict[str, torch.Tensor], source: str, arch: str) -> tuple[int, int]:
    need = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    for name in need:
        if name not in t:
            raise ConfigError(f"{source}: missing tensor '{name}' (has {sorted(t)})")
    d_in, d_sae = t["W_enc"].shape
    want = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for name, shape in want.items():
        if name in t and tuple(t[name].shape) != shape:
            raise ConfigError(f"{source}: tensor '{name}' has shape {tuple(t[name].shape)}, expected {shape} "
                              f"(from W_enc {tuple(t['W_enc'].shape)} = [d_in, d_sae])")
    return d_in, d_sae


def from_tensors(t: dict[str, torch.Tensor], cfg: SAEConfig, source: str = "<tensors>") -> SAE:
    d_in, d_sae = _check_shapes(t, source, cfg.architecture)
    if (d_in, d_sae) != (cfg.d_in, cfg.d_sae):
        raise ConfigError(f"{source}: tensors are {d_in}->{d_sae} but the config says {cfg.d_in}->{cfg.d_sae}")
    sae = SAE(cfg)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(t[name].float())
    return sae


def load_gemma_scope(path: str, layer: int | None = None, model: str | None = None) -> SAE:
    """Gemma Scope ``params.npz``: JumpReLU, no input centring."""
    import numpy as np

    with np.load(path) as z:
        t = {k: torch.from_numpy(np.asarray(z[k], dtype=np.float32)) for k in z.files}
    d_in, d_sae = _check_shapes(t, path, "jumprelu")
    cfg = SAEConfig(d_in, d_sae, "jumprelu", k=None, apply_b_dec_to_input=False, layer=layer, model=model)
    return from_tensors(t, cfg, path)


def load_saelens(path: str) -> SAE:
    from safetensors.torch import load_file

    cfg_path, w_path = os.path.join(path, "cfg.json"), os.path.join(path, "sae_weights.safetensors")
    for p in (cfg_path, w_path):
        if not os.path.exists(p):
            raise ConfigError(f"{path}: not an SAE folder, missing {os.path.basename(p)}")
    with open(cfg_path) as f:
        raw = json.load(f)
    arch_name = raw.get("architecture", "standard")
    if arch_name not in _SAELENS_ARCH:
        raise ConfigError(f"{cfg_path}: unknown architecture {arch_name!r}; featalign reads {sorted(_SAELENS_ARCH)}")
    if raw.get("normalize_activations", "none") not in ("none", None):
        raise ConfigError(f"{cfg_path}: normalize_activations={raw['normalize_activations']!r} is not supported yet")
    fa = raw.get("featalign", {})
    meta = raw.get("metadata") or {}
    layer = fa.get("layer", raw.get("hook_layer", meta.get("hook_layer")))
    cfg = SAEConfig(
        d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]), architecture=_SAELENS_ARCH[arch_name],
        k=raw.get("k") if _SAELENS_ARCH[arch_name] == "topk" else None,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)), layer=layer,
        model=fa.get("model", meta.get("model_name", raw.get("model_name"))), extra=fa.get("extra", {}),
    )
    return from_tensors(load_file(w_path), cfg, w_path)


def load_sae(path: str, layer: int | None = None) -> SAE:
    """Load an SAE from a Gemma Scope ``params.npz``, a SAELens folder or a featalign folder."""
    if path.endswith(".npz"):
        sae = load_gemma_scope(path, layer)
    elif os.path.isdir(path):
        sae = load_saelens(path)
    else:
        raise ConfigError(f"{path}: not an SAE (expected a params.npz file or a folder with cfg.json)")
    if layer is not None:
        sae.cfg.layer = layer
    return sae.eval().requires_grad_(False)


def resolve_layer(sae: SAE, layer: int | None, model, source: str, flag: str = "--layer") -> int:
    """The layer to use (given, else the one the SAE records), checked against the model."""
    layer = layer if layer is not None else sae.cfg.layer
    if layer is None:
        raise ConfigError(f"{source}: the SAE does not record its layer; pass {flag}")
    check_fits(sae, model, layer)
    return layer


def check_fits(sae: SAE, model, layer: int) -> None:
    """Refuse an SAE whose d_in is not the model's hidden size at ``layer``."""
    from ..models import check_layer, hidden_size

    check_layer(model, layer)
    h = hidden_size(model)
    if sae.d_in != h:
        raise ConfigError(f"SAE d_in={sae.d_in} does not match the model's hidden size {h} at layer {layer}")
