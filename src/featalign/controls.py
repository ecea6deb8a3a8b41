"""Feature controls: training that acts on the SAE features a user names, for any method.

- ``ablate``: the named features' decoder directions are projected out of the SAE layer's output in every forward
  pass of training (and of the reference the offline cache is built from), so the policy cannot route through them
  (concept-ablation fine-tuning); the saved model carries no hook and runs unablated.
- ``preserve``: an FPO-style mean squared difference between the policy's and the reference's pooled activations of
  the named features; the reference's values come from the offline cache.
- ``suppress``: a penalty on the policy's pooled activations of the named features.

Features are named by index (``12,40``) or by a JSON file that ``select-features`` (its ``features`` list),
``explain`` (its ``up`` and ``down`` rows) or ``attribute`` (its ``top`` rows) wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

import torch

from .errors import ConfigError


def named_features(spec: str, d_sae: int | None = None) -> list[int]:
    """The feature ids ``spec`` names: comma-separated indices, or a file of ``features`` (select-features),
    ``up``/``down`` (explain) or ``top`` (attribute); checked against the SAE's width when given."""
    if not spec:
        return []
    if os.path.isfile(spec):
        with open(spec) as f:
            data = json.load(f)
        if isinstance(data, dict) and "features" in data:
            ids = [int(x["feature"] if isinstance(x, dict) else x) for x in data["features"]]
        elif isinstance(data, dict) and ("up" in data or "top" in data):
            ids = [int(r["feature"]) for key in ("up", "down", "top") for r in data.get(key, [])]
        else:
            raise ConfigError(f"{spec}: not a features file (no 'features', 'up'/'down' or 'top' list)")
    else:
        try:
            ids = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"{spec!r}: name features by comma-separated indices or by a features file") from None
    bad = [i for i in ids if i < 0 or (d_sae is not None and i >= d_sae)]
    if bad:
        raise ConfigError(f"{spec}: feature(s) {bad} are not in the SAE's 0..{(d_sae or 0) - 1}")
    return sorted(set(ids))


def ablation_basis(sae, features: list[int]) -> torch.Tensor:
    """An orthonormal basis [d_in, m] of the span of the named features' decoder rows (QR: the rows need not be
    orthogonal, and projecting each out in turn would not remove their span)."""
    q, _ = torch.linalg.qr(sae.W_dec.detach()[features].T.float())
    return q


@contextlib.contextmanager
def ablation(models: list, layer: int, basis: torch.Tensor | None):
    """While open, decoder ``layer`` of each model outputs h - Q Q^T h: the named directions removed (exact
    gradients: a linear map)."""
    from .models import decoder_layers

    if basis is None:
        yield
        return

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        q = basis.to(h.device, h.dtype)
        h = h - (h @ q) @ q.T
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handles = [decoder_layers(m)[layer].register_forward_hook(hook) for m in models if m is not None]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Controls:
    """The controls of one run: the features each names and the weights of the two penalties."""

    ablate: list[int] = field(default_factory=list)
    preserve: list[int] = field(default_factory=list)
    suppress: list[int] = field(default_factory=list)
    preserve_weight: float = 1.0
    suppress_weight: float = 1.0

    def __bool__(self) -> bool:
        return bool(self.ablate or self.preserve or self.suppress)

    @classmethod
    def of(cls, cfg, d_sae: int | None = None) -> Controls:
        return cls(
            named_features(cfg.ablate_features, d_sae),
            named_features(cfg.preserve_features, d_sae),
            named_features(cfg.suppress_features, d_sae),
            cfg.preserve_weight,
            cfg.suppress_weight,
        )

    def terms(self, pooled: torch.Tensor, cache_rows: dict[str, torch.Tensor] | None):
        """(the penalty to add to the loss, its metrics) from the policy's pooled activations [2n, d_sae] (chosen rows
        first) and, for ``preserve``, the cache's rows of the reference's values at the preserved features."""
        loss = pooled.new_zeros(())
        metrics: dict[str, torch.Tensor] = {}
        if self.preserve:
            ref = torch.cat([cache_rows["chosen_named_val"], cache_rows["rejected_named_val"]]).to(pooled.dtype)
            mse = (pooled[:, self.preserve] - ref).pow(2).mean()
            loss = loss + self.preserve_weight * mse
            metrics["controls/preserve_mse"] = mse.detach()
        if self.suppress:
            act = pooled[:, self.suppress].sum(-1).mean()
            loss = loss + self.suppress_weight * act
            metrics["controls/suppressed_activation"] = act.detach()
        return loss, metrics
