"""Sparse autoencoders: architectures and formats (model), training, metrics, matching."""

from .model import (
    SAE,
    SAEConfig,
    check_fits,
    load_gemma_scope,
    load_sae,
    load_saelens,
    load_sparsify,
    random_sae,
    resolve_layer,
)

__all__ = [
    "SAE",
    "SAEConfig",
    "check_fits",
    "load_gemma_scope",
    "load_sae",
    "load_saelens",
    "load_sparsify",
    "random_sae",
    "resolve_layer",
]
