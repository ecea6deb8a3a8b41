"""One SAE module for ReLU, TopK and JumpReLU, and loading/saving in the formats researchers already have.

Formats: Gemma Scope ``params.npz``; SAELens folders (``cfg.json`` + ``sae_weights.safetensors``); sparsify
folders (``cfg.json`` + ``sae.safetensors``) and sparsify's multi-layer folder of such folders (``layers.N/``).
featalign saves the SAELens layout by default (sparsify's on request, TopK only), adding a ``featalign`` block to
``cfg.json`` (layer, model, training stats); both libraries' loaders read what featalign writes and ignore it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..atomic import replace_dir, write_json
from ..errors import ConfigError

ARCHITECTURES = ("relu", "topk", "jumprelu")
_SAELENS_ARCH = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}
_TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}
SAVE_FORMATS = ("saelens", "sparsify")
_LAYER_DIR = re.compile(r"^(?:.*\.)?(\d+)$")  # sparsify's hookpoint folders: layers.4, model.layers.4, h.4


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
        out = torch.nn.functional.embedding_bag(
            indices.reshape(-1, k),
            self.W_dec,
            per_sample_weights=values.reshape(-1, k).to(self.W_dec.dtype),
            mode="sum",
        ).reshape(*indices.shape[:-1], self.d_in)
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
            pooled = pooled.index_put(
                (rows[:, None].expand_as(idx).reshape(-1), idx.reshape(-1)), vals.relu().reshape(-1), accumulate=True
            )
        else:
            pooled = pooled.index_add(0, rows, self.encode(x))
        return pooled / sel.sum(1, keepdim=True).clamp(min=1).to(x.dtype)

    @torch.no_grad()
    def rescale_inputs(self, c: float) -> SAE:
        """Turn this SAE for inputs ``x`` into the same SAE for inputs ``c * x``: latents scale by ``c``, the
        decoder rows are unchanged (so stay unit-norm), TopK picks the same latents. Training on normalised
        activations calls it with the scale, then with its inverse to save an SAE that reads raw activations."""
        self.b_dec.mul_(c)
        self.b_enc.mul_(c)
        if self.cfg.architecture == "jumprelu":
            self.threshold.mul_(c)
        return self

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True).clamp(min=1e-8)

    # --- persistence -----------------------------------------------------------------------------
    def save(self, path: str, extra: dict | None = None, format: str = "saelens") -> str:
        """Save in the SAELens (or sparsify) folder layout, atomically (temp folder + rename)."""
        if format not in SAVE_FORMATS:
            raise ConfigError(f"unknown SAE format {format!r}; choose from {list(SAVE_FORMATS)}")
        tmp = f"{path.rstrip('/')}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            (self._write_sparsify if format == "sparsify" else self._write_saelens)(tmp, extra)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, path)
        return path

    def _featalign_block(self, extra: dict | None) -> dict:
        return {**asdict(self.cfg), "extra": {**self.cfg.extra, **(extra or {})}}

    def _write_saelens(self, tmp: str, extra: dict | None) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, os.path.join(tmp, "sae_weights.safetensors"))
        cfg = {
            "architecture": _TO_SAELENS[self.cfg.architecture],
            "d_in": self.cfg.d_in,
            "d_sae": self.cfg.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": self.cfg.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {
                "hook_name": f"layers.{self.cfg.layer}" if self.cfg.layer is not None else None,
                "model_name": self.cfg.model,
            },
            "featalign": self._featalign_block(extra),
        }
        if self.cfg.architecture == "topk":
            cfg["k"] = self.cfg.k
            cfg["rescale_acts_by_decoder_norm"] = False
        write_json(os.path.join(tmp, "cfg.json"), cfg, indent=2)

    def _write_sparsify(self, tmp: str, extra: dict | None) -> None:
        """sparsify's SparseCoder always centres on b_dec (``relu((x - b_dec) W^T + b)``, top k): an SAE that does
        not centre is written with ``b_dec @ W_enc`` folded into the encoder bias, which encodes the same."""
        from safetensors.torch import save_file

        if self.cfg.architecture != "topk":
            raise ConfigError(
                f"sparsify's format holds TopK SAEs only; this SAE is {self.cfg.architecture} (save it as saelens)"
            )
        b_enc = self.b_enc if self.cfg.apply_b_dec_to_input else self.b_enc + self.b_dec @ self.W_enc
        tensors = {"encoder.weight": self.W_enc.T, "encoder.bias": b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        save_file(
            {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, os.path.join(tmp, "sae.safetensors")
        )
        cfg = {
            "activation": "topk",
            "expansion_factor": max(1, self.d_sae // self.d_in),
            "normalize_decoder": True,
            "num_latents": self.d_sae,
            "k": self.cfg.k,
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "d_in": self.d_in,
            "featalign": {**self._featalign_block(extra), "apply_b_dec_to_input": True},
        }
        write_json(os.path.join(tmp, "cfg.json"), cfg, indent=2)


def random_sae(
    d_in: int,
    d_sae: int,
    architecture: str = "topk",
    k: int | None = 8,
    seed: int = 0,
    noise: float = 0.1,
    centre: bool = True,
    layer: int | None = None,
) -> SAE:
    """An untrained SAE for tests and benchmarks: random unit-norm decoder rows, the encoder their transpose plus
    ``noise``, biases of scale ``noise``, JumpReLU thresholds in [0.1, 1.1)."""
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(
        d_in, d_sae, architecture, k=k if architecture == "topk" else None, apply_b_dec_to_input=centre, layer=layer
    )
    sae = SAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g))
        sae.normalize_decoder()
        sae.W_enc.copy_(sae.W_dec.T + noise * torch.randn(d_in, d_sae, generator=g))
        sae.b_enc.copy_(noise * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(noise * torch.randn(d_in, generator=g))
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=g) + 0.1)
    return sae


def _check_shapes(t: dict[str, torch.Tensor], source: str, arch: str) -> tuple[int, int]:
    need = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    for name in need:
        if name not in t:
            raise ConfigError(f"{source}: missing tensor '{name}' (has {sorted(t)})")
    d_in, d_sae = t["W_enc"].shape
    want = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for name, shape in want.items():
        if name in t and tuple(t[name].shape) != shape:
            raise ConfigError(
                f"{source}: tensor '{name}' has shape {tuple(t[name].shape)}, expected {shape} "
                f"(from W_enc {tuple(t['W_enc'].shape)} = [d_in, d_sae])"
            )
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


_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_HF_OUTPUT = re.compile(r"^(?:model\.)?(?:language_model\.)?layers\.(\d+)(?:\.output)?$")


def hook_layer(hook: str | None) -> int | None:
    """The decoder layer whose output a hook point reads, in featalign's numbering (the output of decoder layer L):
    TransformerLens' ``blocks.L.hook_resid_post`` is L and ``blocks.L.hook_resid_pre`` is L - 1 (the input of block
    L); HF's ``model.layers.L.output`` (Gemma Scope 2) and featalign's ``layers.L`` are L; anything else (attention or
    MLP outputs, a resid_pre of block 0) reads no decoder layer's output, so None."""
    if not hook:
        return None
    m = _RESID.match(hook)
    if m:
        layer = int(m.group(1)) - (m.group(2) == "pre")
        return layer if layer >= 0 else None
    m = _HF_OUTPUT.match(hook)
    return int(m.group(1)) if m else None


def load_gemma_scope2(path: str, layer: int | None = None) -> SAE:
    """A Gemma Scope 2 folder (``params.safetensors`` with ``w_enc`` [d_in, d_sae], ``w_dec``, ``b_enc``, ``b_dec``,
    ``threshold``, and where present ``config.json``): a JumpReLU SAE without input centring, on the residual stream
    after the decoder layer ``hf_hook_point_in`` names (else the folder's ``layer_N_...`` name)."""
    from safetensors.torch import load_file

    w_path = os.path.join(path, "params.safetensors")
    raw = {}
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
    if raw.get("type", "sae") != "sae" or raw.get("affine_connection"):
        raise ConfigError(f"{path}: a Gemma Scope 2 {raw.get('type', 'transcoder')}, not an SAE of the residual stream")
    arch = str(raw.get("architecture", "jump_relu")).replace("_", "")
    if arch != "jumprelu":
        raise ConfigError(
            f"{path}: architecture {raw['architecture']!r}; Gemma Scope 2 SAEs featalign reads are JumpReLU"
        )
    hook = raw.get("hf_hook_point_in")
    if hook is not None and hook_layer(hook) is None:
        raise ConfigError(f"{path}: reads {hook!r}, not a decoder layer's output (the residual stream featalign hooks)")
    folder = re.match(r"^layer_(\d+)_", os.path.basename(os.path.normpath(path)))
    found = hook_layer(hook) if hook else (int(folder.group(1)) if folder else None)
    t = {k.replace("w_", "W_"): v for k, v in load_file(w_path).items()}
    d_in, d_sae = _check_shapes(t, w_path, "jumprelu")
    if "width" in raw and int(raw["width"]) != d_sae:
        raise ConfigError(f"{path}: config.json says width {raw['width']}, {os.path.basename(w_path)} holds {d_sae}")
    cfg = SAEConfig(
        d_in,
        d_sae,
        "jumprelu",
        k=None,
        apply_b_dec_to_input=False,
        layer=layer if layer is not None else found,
        model=raw.get("model_name"),
    )
    return from_tensors(t, cfg, w_path)


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
    hook = raw.get("hook_name") or meta.get("hook_name")
    layer = fa.get("layer", hook_layer(hook) if hook else raw.get("hook_layer", meta.get("hook_layer")))
    cfg = SAEConfig(
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        architecture=_SAELENS_ARCH[arch_name],
        k=raw.get("k") if _SAELENS_ARCH[arch_name] == "topk" else None,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        layer=layer,
        model=fa.get("model", meta.get("model_name", raw.get("model_name"))),
        extra=fa.get("extra", {}),
    )
    return from_tensors(load_file(w_path), cfg, w_path)


def _layer_dirs(path: str) -> dict[int, str]:
    """A multi-layer folder's SAE subfolders (sparsify's ``layers.N/``, any format) by layer."""
    out = {}
    for name in sorted(os.listdir(path)):
        m = _LAYER_DIR.match(name)
        if m and os.path.isfile(os.path.join(path, name, "cfg.json")):
            out[int(m.group(1))] = os.path.join(path, name)
    return out


def load_sparsify(path: str, layer: int | None = None) -> SAE:
    """A sparsify SparseCoder folder (``cfg.json`` + ``sae.safetensors``): TopK after a ReLU, input centred on b_dec."""
    from safetensors.torch import load_file

    cfg_path, w_path = os.path.join(path, "cfg.json"), os.path.join(path, "sae.safetensors")
    with open(cfg_path) as f:
        raw = json.load(f)
    for key, bad, why in (
        ("transcode", True, "a transcoder (it predicts a module's output), not an SAE"),
        ("skip_connection", True, "has a skip connection, which featalign's SAE does not model"),
        ("activation", "groupmax", "uses the groupmax activation; featalign reads topk"),
    ):
        if raw.get(key, False) == bad:
            raise ConfigError(f"{cfg_path}: {key}={bad!r}: {why}")
    t = load_file(w_path)
    for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        if name not in t:
            raise ConfigError(f"{w_path}: missing tensor '{name}' (has {sorted(t)})")
    t = {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    d_in, d_sae = _check_shapes(t, w_path, "topk")
    if "d_in" in raw and int(raw["d_in"]) != d_in:
        raise ConfigError(f"{cfg_path}: d_in={raw['d_in']} but {os.path.basename(w_path)} holds {d_in}-dim inputs")
    fa = raw.get("featalign", {})
    k = raw.get("k", 32)
    if not 0 < k <= d_sae:
        raise ConfigError(f"{cfg_path}: k={k} is not in 1..{d_sae} (the number of latents)")
    m = _LAYER_DIR.match(os.path.basename(os.path.normpath(path)))
    layer = layer if layer is not None else fa.get("layer", int(m.group(1)) if m else None)
    cfg = SAEConfig(
        d_in,
        d_sae,
        "topk",
        k=k,
        apply_b_dec_to_input=True,
        layer=layer,
        model=fa.get("model"),
        extra=fa.get("extra", {}),
    )
    return from_tensors(t, cfg, w_path)


def load_sae(path: str, layer: int | None = None) -> SAE:
    """Load an SAE from a Gemma Scope ``params.npz``, a SAELens/featalign folder, a sparsify folder, or a
    multi-layer folder of such folders (``layers.N/``, as sparsify and ``featalign sae train --layers`` write)."""
    if path.endswith(".npz"):
        sae = load_gemma_scope(path, layer)
    elif (
        os.path.isdir(path)
        and not os.path.exists(os.path.join(path, "cfg.json"))
        and not os.path.isfile(os.path.join(path, "params.safetensors"))
    ):
        layers = _layer_dirs(path)
        if not layers:
            raise ConfigError(
                f"{path}: not an SAE folder (no cfg.json) nor a multi-layer one (no layers.N/cfg.json inside)"
            )
        if layer is None:
            raise ConfigError(f"{path}: holds SAEs for layers {sorted(layers)}; pass --layer to pick one")
        if layer not in layers:
            raise ConfigError(f"{path}: no SAE for layer {layer}; it holds layers {sorted(layers)}")
        return load_sae(layers[layer], layer)
    elif os.path.isfile(os.path.join(path, "sae.safetensors")):
        sae = load_sparsify(path, layer)
    elif os.path.isfile(os.path.join(path, "params.safetensors")):
        sae = load_gemma_scope2(path, layer)
    elif os.path.isdir(path):
        sae = load_saelens(path)
    else:
        raise ConfigError(f"{path}: not an SAE (expected params.npz, or a folder with cfg.json or params.safetensors)")
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
