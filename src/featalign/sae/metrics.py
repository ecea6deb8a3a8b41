"""SAE metrics on held-out activations: MSE, normalised MSE / explained variance, L0, dead and dense
latents, and CE loss recovered / KL when the reconstruction is spliced into the model."""

from __future__ import annotations

import contextlib

import torch

from ..data import doc_batches
from ..models import decoder_layers

OUTLIER_NORM = 10.0


def typical_tokens(x: torch.Tensor, ratio: float = OUTLIER_NORM) -> torch.Tensor:
    """Which rows of ``x`` (tokens, [n, d] or [n, layers, d]) have a norm within ``ratio`` times the median (at every
    layer). The others are massive activations (Sun et al. 2024): SmolLM2's first position sits at 145x the median
    norm (measured), so kept they hold ~99% of the variance, set the normalisation scale and make explained variance
    measure them alone. Gemma Scope leaves Gemma-2's BOS out for its norm, SAELens offers `exclude_special_tokens`.
    ``ratio <= 0`` keeps every token."""
    n = x.float().norm(dim=-1)
    if ratio <= 0 or len(n) == 0:
        return torch.ones(len(n), dtype=torch.bool, device=x.device)
    keep = n <= ratio * n.median(0).values
    return keep.all(-1) if keep.dim() > 1 else keep


@contextlib.contextmanager
def splice(model, layer: int, fn):
    """Replace decoder ``layer``'s output hidden state h by ``fn(h)`` for the duration of the block."""

    def hook(_m, _i, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + tuple(out[1:])
        return fn(out)

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _ce_and_logp(model, ids, att):
    logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1].float()
    logp = logits.log_softmax(-1)
    mask = att[:, 1:].bool()
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return nll[mask], logp[mask]


@torch.no_grad()
def evaluate_sae(
    sae,
    model,
    tokenizer,
    docs: list[list[int]],
    layer: int,
    max_tokens: int = 8192,
    batch_size: int = 32,
    max_length: int = 128,
    dense_threshold: float = 0.1,
    outlier_norm: float = OUTLIER_NORM,
) -> dict:
    """All metrics in one pass over ``docs`` (token id lists), stopping after ``max_tokens`` tokens. Tokens with a
    massive norm (see ``typical_tokens``) are left out of every metric: neither spliced nor zero-ablated."""
    device = next(model.parameters()).device
    sae = sae.to(device)
    pad = tokenizer.pad_token_id
    sq_err = l0 = 0.0
    xs_for_var = []
    fire_count = torch.zeros(sae.d_sae, device=device)
    n_tok = 0
    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    kl_sum = 0.0
    n_pred = n_outliers = 0
    captured = {}

    def recon(h):
        flat = h.float()
        keep = torch.ones(flat.shape[:-1], dtype=torch.bool, device=flat.device)  # padding is spliced, as ever
        keep[captured["att"]] = typical_tokens(flat[captured["att"]], outlier_norm)
        captured["h"], captured["keep"] = flat, keep
        return torch.where(keep[..., None], sae(flat), flat).to(h.dtype)

    for ids, att in doc_batches(docs, batch_size, max_length, pad, device):
        captured["att"] = att.bool()
        nll_clean, logp_clean = _ce_and_logp(model, ids, att)
        with splice(model, layer, recon):
            nll_spliced, logp_spliced = _ce_and_logp(model, ids, att)
        keep = captured["keep"]
        outliers = int((~keep & captured["att"]).sum())
        with splice(model, layer, lambda h, keep=keep: torch.where(keep[..., None], torch.zeros_like(h), h)):
            nll_zero, _ = _ce_and_logp(model, ids, att)
        ce["clean"] += nll_clean.sum().item()
        ce["spliced"] += nll_spliced.sum().item()
        ce["zero"] += nll_zero.sum().item()
        kl_sum += (logp_clean.exp() * (logp_clean - logp_spliced)).sum().item()
        n_pred += nll_clean.numel()
        x = captured["h"][captured["att"] & keep]
        n_outliers += outliers
        f = sae.encode(x)
        x_hat = sae.decode(f)
        sq_err += (x - x_hat).pow(2).sum().item()
        xs_for_var.append(x)
        l0 += (f > 0).sum().item()
        fire_count += (f > 0).sum(0)
        n_tok += len(x)
        if n_tok >= max_tokens:
            break
    allx = torch.cat(xs_for_var)
    sq_dev = (allx - allx.mean(0)).pow(2).sum().item()
    frac = fire_count / n_tok
    denom = ce["zero"] - ce["clean"]
    return {
        "tokens": n_tok,
        "outlier_tokens": n_outliers,
        "mse": sq_err / n_tok,
        "normalized_mse": sq_err / sq_dev,
        "explained_variance": 1 - sq_err / sq_dev,
        "l0": l0 / n_tok,
        "dead_fraction": float((fire_count == 0).float().mean()),
        "dense_fraction": float((frac > dense_threshold).float().mean()),
        "ce_clean": ce["clean"] / n_pred,
        "ce_spliced": ce["spliced"] / n_pred,
        "ce_zero_ablation": ce["zero"] / n_pred,
        "ce_loss_recovered": (ce["zero"] - ce["spliced"]) / denom if abs(denom) > 1e-12 else float("nan"),
        "kl_to_clean": kl_sum / n_pred,
    }


def format_table(report: dict) -> str:
    """A metric/value table; for reports keyed by layer (``sae train --layers``), one table per layer."""
    if report and all(isinstance(v, dict) for v in report.values()):
        return "\n\n".join(f"layer {layer}\n{format_table(r)}" for layer, r in report.items())
    rows = [("metric", "value")] + [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in report.items()]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def decoder_cosine_to_init(sae) -> float | None:
    """Median cosine between each decoder row and its random init (regenerated from the seed the way
    ``train.init_sae`` draws it): near 1 means training barely moved the dictionary. None unless the SAE
    carries its training settings, as one loaded from a folder `featalign sae train` wrote does."""
    tc = sae.cfg.extra.get("train_config")
    if not tc or sae.cfg.layer is None:
        return None
    g = torch.Generator().manual_seed(tc["seed"] * 1009 + sae.cfg.layer)
    init = torch.randn(sae.d_sae, sae.cfg.d_in, generator=g)
    return float(torch.nn.functional.cosine_similarity(sae.W_dec.detach().float().cpu(), init, dim=-1).median())
