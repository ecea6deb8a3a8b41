"""The SAE-feature terms of a training step: FPO's feature discrepancy D of each response, from the policy's pooled SAE
activations at one layer and the reference's, which the offline cache holds sparsely (its top-k)."""

from __future__ import annotations

import torch

from .losses import feature_mse


def fpo_discrepancy(
    sae, h: torch.Tensor, response_mask: torch.Tensor, cache_rows: dict[str, torch.Tensor], k: int, topk_from: str
) -> dict[str, torch.Tensor]:
    """D of each pair's chosen and rejected response (``feat_mse_chosen``, ``feat_mse_rejected``): the policy's
    hidden states ``h`` [2n, T, d] at the SAE's layer, pooled over response tokens, against the cache's rows."""
    n = h.shape[0] // 2
    pooled = sae.encode_pooled(h, response_mask)
    c = cache_rows
    return {
        "feat_mse_chosen": feature_mse(pooled[:n], c["chosen_feat_idx"], c["chosen_feat_val"], k, topk_from),
        "feat_mse_rejected": feature_mse(pooled[n:], c["rejected_feat_idx"], c["rejected_feat_val"], k, topk_from),
    }
