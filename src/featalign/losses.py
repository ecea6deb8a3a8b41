"""Preference losses as pure tensor functions, plus a registry keyed by method name.

Every function takes per-pair tensors (shape [B]) and returns ``(loss, metrics)``: the mean loss and a
dict of detached tensors under TRL's metric names. ``metrics["logits"]`` is the per-pair logit ``u``
(for IPO, the per-pair value inside the square) so that peers can be compared pair by pair.
Exact definitions: ``shared/spec/losses.md``; paper defaults are the keyword defaults.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps, logits, **extra):
    m = {
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().detach(),
        "rewards/margins": (chosen_rewards - rejected_rewards).detach().mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
        "logits": logits.detach(),
    }
    m.update({k: v.detach().mean() for k, v in extra.items()})
    return m


def _per_token_ratios(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_len, rejected_len
):
    """The length-normalised log-ratios r(y_w)/|y_w| and r(y_l)/|y_l| (a response of no tokens counts as one)."""
    cr = (policy_chosen_logps - ref_chosen_logps) / chosen_len.clamp(min=1)
    rr = (policy_rejected_logps - ref_rejected_logps) / rejected_len.clamp(min=1)
    return cr, rr


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1):
    """DPO: u = beta * (r(y_w) - r(y_l)), r = summed log-ratio."""
    cr, rr = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    u = beta * (cr - rr)
    return -F.logsigmoid(u).mean(), _metrics(beta * cr, beta * rr, policy_chosen_logps, policy_rejected_logps, u)


def dpo_ln_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_len,
    rejected_len,
    beta: float = 0.1,
):
    """DPO with length-normalised log-ratios (TRL ``sigmoid_norm``)."""
    cr, rr = _per_token_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_len, rejected_len
    )
    u = beta * (cr - rr)
    return -F.logsigmoid(u).mean(), _metrics(beta * cr, beta * rr, policy_chosen_logps, policy_rejected_logps, u)


def ipo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_len,
    rejected_len,
    beta: float = 0.1,
):
    """IPO, length-averaged as TRL ``ipo``: (r_w/|y_w| - r_l/|y_l| - 1/(2 beta))^2."""
    cr, rr = _per_token_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_len, rejected_len
    )
    h = cr - rr
    loss = (h - 1 / (2 * beta)) ** 2
    return loss.mean(), _metrics(
        beta * (policy_chosen_logps - ref_chosen_logps),
        beta * (policy_rejected_logps - ref_rejected_logps),
        policy_chosen_logps,
        policy_rejected_logps,
        h,
    )


def simpo_loss(
    policy_chosen_logps, policy_rejected_logps, chosen_len, rejected_len, beta: float = 2.0, gamma: float = 0.5
):
    """SimPO: reference-free, u = beta * (avg logp_w - avg logp_l) - gamma."""
    cr = policy_chosen_logps / chosen_len.clamp(min=1)
    rr = policy_rejected_logps / rejected_len.clamp(min=1)
    u = beta * (cr - rr) - gamma
    return -F.logsigmoid(u).mean(), _metrics(beta * cr, beta * rr, policy_chosen_logps, policy_rejected_logps, u)


def tdpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    kl_chosen,
    kl_rejected,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: int = 2,
):
    """TDPO with sequential KL K(y) (sum over response positions of KL(ref || policy)).

    variant 1: u = beta * ((r_w - r_l) - (K_l - K_w));
    variant 2: u = beta * ((r_w - r_l) - alpha * (K_l - sg K_w)).
    """
    cr, rr = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    if variant == 1:
        kl_term = kl_rejected - kl_chosen
    elif variant == 2:
        kl_term = alpha * (kl_rejected - kl_chosen.detach())
    else:
        raise ValueError(f"TDPO variant must be 1 or 2, got {variant}")
    u = beta * ((cr - rr) - kl_term)
    return -F.logsigmoid(u).mean(), _metrics(
        beta * cr,
        beta * rr,
        policy_chosen_logps,
        policy_rejected_logps,
        u,
        **{"kl/chosen": kl_chosen, "kl/rejected": kl_rejected},
    )


def fpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    chosen_len,
    rejected_len,
    ref_chosen_avg_logps,
    ref_rejected_avg_logps,
    feat_mse_chosen,
    feat_mse_rejected,
    beta: float = 0.1,
    alpha: float = 0.5,
    rewards_add_d: bool = False,
):
    """FPO: u = beta * (r_w/|y_w| - r_l/|y_l|) - alpha * (beta * D_l - sg(beta * D_w)).

    The reference enters only through its length-normalised log-probs (an offline cache) and the feature
    discrepancies D, which ``feature_mse`` computes against cached sparse reference activations.
    ``rewards_add_d``: report rewards as the released code does, beta * (margin + D), instead of beta * margin.
    """
    cr = policy_chosen_logps / chosen_len.clamp(min=1) - ref_chosen_avg_logps
    rr = policy_rejected_logps / rejected_len.clamp(min=1) - ref_rejected_avg_logps
    u = beta * (cr - rr) - alpha * (beta * feat_mse_rejected - (beta * feat_mse_chosen).detach())
    shown_c, shown_r = (cr + feat_mse_chosen, rr + feat_mse_rejected) if rewards_add_d else (cr, rr)
    return -F.logsigmoid(u).mean(), _metrics(
        beta * shown_c,
        beta * shown_r,
        policy_chosen_logps,
        policy_rejected_logps,
        u,
        **{"fpo/feature_mse_chosen": feat_mse_chosen, "fpo/feature_mse_rejected": feat_mse_rejected},
    )


def feature_mse(
    policy_feats: torch.Tensor,
    ref_indices: torch.Tensor,
    ref_values: torch.Tensor,
    k: int = 50,
    topk_from: str = "union",
) -> torch.Tensor:
    """FPO's D(y) = (1/k) * sum_{i in I_k} (c_theta,i - c_ref,i)^2, per row.

    ``policy_feats`` [N, d_sae] are the policy's pooled SAE activations (with gradient); the reference is
    given sparsely by its top activations ``ref_indices``/``ref_values`` [N, k_ref] (sorted by value,
    descending); its other activations count as 0. ``topk_from``: ``"union"`` (the paper's I_k = top-k of
    policy UNION top-k of reference) or ``"policy"`` (the public code's policy-only top-k, kept as an
    option for reproduction).
    """
    n, d = policy_feats.shape
    k = min(k, d)
    ref_dense = torch.zeros_like(policy_feats).scatter(1, ref_indices.long(), ref_values.to(policy_feats.dtype))
    sel = torch.zeros((n, d), dtype=torch.bool, device=policy_feats.device)
    sel.scatter_(1, policy_feats.detach().topk(k, dim=-1).indices, True)
    if topk_from == "union":
        sel.scatter_(1, ref_indices[:, :k].long(), True)
    elif topk_from != "policy":
        raise ValueError(f"topk_from must be 'union' or 'policy', got {topk_from!r}")
    return ((policy_feats - ref_dense) ** 2 * sel).sum(-1) / k


@dataclass(frozen=True)
class Method:
    """What a method needs from the trainer: the reference's log-probs (offline-cacheable), a live
    reference model (full next-token distributions, or in-training updates), SAE features."""

    name: str
    fn: Callable
    ref_logps: bool = True
    live_reference: bool = False
    features: bool = False
    defaults: tuple = ()


METHODS: dict[str, Method] = {
    "dpo": Method("dpo", dpo_loss, defaults=(("beta", 0.1),)),
    "ipo": Method("ipo", ipo_loss, defaults=(("beta", 0.1),)),
    "simpo": Method("simpo", simpo_loss, ref_logps=False, defaults=(("beta", 2.0), ("gamma", 0.5))),
    "dpo_ln": Method("dpo_ln", dpo_ln_loss, defaults=(("beta", 0.1),)),
    "tdpo1": Method("tdpo1", tdpo_loss, live_reference=True, defaults=(("beta", 0.1), ("variant", 1))),
    "tdpo2": Method("tdpo2", tdpo_loss, live_reference=True, defaults=(("beta", 0.1), ("alpha", 0.5), ("variant", 2))),
    "trdpo": Method("trdpo", dpo_loss, live_reference=True, defaults=(("beta", 0.1),)),
    "fpo": Method("fpo", fpo_loss, features=True, defaults=(("beta", 0.1), ("alpha", 0.5))),
}
LOSSES = {name: m.fn for name, m in METHODS.items()}


@functools.cache
def _signature(fn) -> dict:
    return dict(inspect.signature(fn).parameters)


def compute_loss(method: str, terms: dict[str, torch.Tensor], **hparams):
    """Call a method's loss with the per-pair ``terms`` it needs, taken by argument name from ``terms``.

    ``terms`` keys: policy_chosen_logps, policy_rejected_logps, chosen_len, rejected_len,
    ref_chosen_logps, ref_rejected_logps, ref_chosen_avg_logps, ref_rejected_avg_logps, kl_chosen,
    kl_rejected, feat_mse_chosen, feat_mse_rejected. Unset hparams take the method's published defaults.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    m = METHODS[method]
    params = _signature(m.fn)
    kwargs = {k: v for k, v in dict(m.defaults).items()}
    kwargs.update({k: v for k, v in hparams.items() if k in params and v is not None})
    for name, p in params.items():
        if p.default is inspect.Parameter.empty:
            if name not in terms:
                raise KeyError(f"method {method!r} needs '{name}'")
            kwargs[name] = terms[name]
    return m.fn(**kwargs)
