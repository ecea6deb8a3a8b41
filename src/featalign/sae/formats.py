"""Reading SAEs in the formats researchers already have, each checked for shapes before it becomes an ``SAE``.

Gemma Scope ``params.npz``; Gemma Scope 2 folders (``params.safetensors`` + ``config.json``); SAELens folders
(``cfg.json`` + ``sae_weights.safetensors``); sparsify folders (``cfg.json`` + ``sae.safetensors``) and sparsify's
multi-layer folder of such folders (``layers.N/``). ``load_sae`` tells them apart by the files a folder holds.
"""

from __future__ import annotations

import json
import os
import re

import torch

from ..errors import ConfigError
from .model import SAE, SAEConfig

_SAELENS_ARCH = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}
_LAYER_DIR = re.compile(r"^(?:.*\.)?(\d+)$")  # sparsify's hookpoint folders: layers.4, model.layers.4, h.4


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
