"""Sparse autoencoders: the module (model), reading other formats (formats), training, metrics, matching."""

from .formats import hook_layer, load_gemma_scope, load_gemma_scope2, load_sae, load_saelens, load_sparsify
from .model import SAE, SAEConfig, check_fits, random_sae, resolve_layer

__all__ = [
    "SAE",
    "SAEConfig",
    "check_fits",
    "hook_layer",
    "load_gemma_scope",
    "load_gemma_scope2",
    "load_sae",
    "load_saelens",
    "load_sparsify",
    "random_sae",
    "resolve_layer",
]
