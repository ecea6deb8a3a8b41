"""One SAE module for ReLU, TopK and JumpReLU, saved in the formats researchers already have (``formats`` reads them).

featalign saves the SAELens layout by default (sparsify's on request, TopK only), adding a ``featalign`` block to
``cfg.json`` (layer, model, training stats); both libraries' loaders read what featalign writes and ignore it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..atomic import replace_dir, write_json
from ..errors import ConfigError

ARCHITECTURES = ("relu", "topk", "jumprelu")
_TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}
SAVE_FORMATS = ("saelens", "sparsify")


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
