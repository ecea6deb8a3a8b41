"""The SAE-feature terms of a training step: FPO's feature discrepancy D of each response.

``paper``: the policy's SAE activations at the chosen layer, pooled over the answer's tokens, against the reference's
top-k, which the offline cache holds sparsely; I_k is the top-k of the policy union the reference's.
``released``: as the FPO authors' released code computes it. The SAE reads the final-norm hidden state (the model's
``hidden_states[-1]``), pools the positions that predict the answer's tokens (the last prompt token to the
second-to-last answer token), divides their sum by the batch's padded length minus one (prompt and padding
included), takes the policy's top-k alone, and reads the reference's values there from its full pooled vector (the
cache holds the unnormalised sums, dense, so each training batch divides by its own length).
"""

from __future__ import annotations

import torch

from .losses import feature_mse

FPO_VARIANTS = ("paper", "released")


def capture(model, layer: int | None, variant: str):
    """A forward hook capturing what the variant's SAE reads: the output of decoder ``layer`` (paper), or the
    decoder's final-norm output (released); only the first pass in the block (a LoRA reference pass follows)."""
    from .models import capture_final, capture_layer

    return capture_final(model, first=True) if variant == "released" else capture_layer(model, layer, first=True)


def pooled(sae, h: torch.Tensor, response_mask: torch.Tensor, predicting: bool = False, padded: bool = False):
    """[N, d_sae] SAE activations pooled over each row: over the answer's tokens (the paper) or over the positions
    that predict them (``predicting``: position t predicts token t+1, as the released code shifts its labels);
    divided by their number (the paper) or by the batch's padded length (``padded``, the released code's mean)."""
    mask = response_mask[:, 1:] if predicting else response_mask
    h = h[:, :-1] if predicting else h
    mean = sae.encode_pooled(h, mask)
    return mean * (mask.sum(1, keepdim=True).to(mean.dtype) / h.shape[1]) if padded else mean


def released_sums(sae, h: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[N, d_sae]: the sum of SAE activations over the positions that predict an answer token, the released code's
    pooling before its division (kept undivided in the cache: a training batch divides by its own length)."""
    return pooled(sae, h, response_mask, predicting=True, padded=True) * (response_mask.shape[1] - 1)


def fpo_discrepancy(
    sae,
    h: torch.Tensor,
    response_mask: torch.Tensor,
    cache_rows: dict[str, torch.Tensor],
    k: int,
    topk_from: str = "union",
    variant: str = "paper",
) -> dict[str, torch.Tensor]:
    """D of each pair's chosen and rejected response (``feat_mse_chosen``, ``feat_mse_rejected``) from the policy's
    captured hidden states ``h`` [2n, T, d] and the cache's rows for the batch."""
    n = h.shape[0] // 2
    c = cache_rows
    if variant == "released":
        divisor = response_mask.shape[1] - 1  # the padded length of the shifted batch, the same for every row
        pooled = released_sums(sae, h, response_mask) / divisor
        every = torch.arange(pooled.shape[1], device=pooled.device).expand(n, -1)
        ref_c, ref_r = c["chosen_feat_sum"] / divisor, c["rejected_feat_sum"] / divisor
        return {
            "feat_mse_chosen": feature_mse(pooled[:n], every, ref_c.to(pooled.dtype), k, "policy"),
            "feat_mse_rejected": feature_mse(pooled[n:], every, ref_r.to(pooled.dtype), k, "policy"),
        }
    pooled = sae.encode_pooled(h, response_mask)
    return {
        "feat_mse_chosen": feature_mse(pooled[:n], c["chosen_feat_idx"], c["chosen_feat_val"], k, topk_from),
        "feat_mse_rejected": feature_mse(pooled[n:], c["rejected_feat_idx"], c["rejected_feat_val"], k, topk_from),
    }


def reference_features(sae, h: torch.Tensor, response_mask: torch.Tensor, k: int, variant: str) -> dict:
    """What the cache stores of the reference per row, by variant: the top-k of the pooled activations (indices and
    values, ``feat_idx``/``feat_val``), or the released code's unnormalised sums (``feat_sum``, dense)."""
    if variant == "released":
        return {"feat_sum": released_sums(sae, h, response_mask)}
    pooled = sae.encode_pooled(h, response_mask)
    vals, idx = pooled.topk(min(k, pooled.shape[-1]), dim=-1)
    return {"feat_idx": idx.int(), "feat_val": vals}
