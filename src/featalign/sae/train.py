"""Train SAEs on a causal LM's residual stream: TopK + AuxK, BatchTopK + AuxK, Feature Choice, JumpReLU
(straight-through estimator), ReLU + decoder-norm-weighted L1. Activations are streamed through a shuffle buffer and
scaled to mean norm sqrt(d_in) while training (the scale is folded back into the saved SAE)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..config import Config, check_model_path, setting
from ..data import doc_batches, read_documents
from ..errors import ConfigError
from ..models import capture_layer, check_layer, hidden_size, run_to_layer
from .metrics import OUTLIER_NORM, typical_tokens
from .model import SAE, SAEConfig

# bumped when training changes in a way the settings do not show (init, update rule), so cached SAEs
# keyed on the settings (the comparison's) are retrained
SAE_TRAIN_VERSION = 4


@dataclass
class SAETrainConfig(Config):
    """`featalign sae train`: one SAE on one layer (or one per layer of ``layers``), saved in SAELens' layout."""

    model: str = setting("", "model whose residual stream the SAE reads: HF folder, hub id or .gguf file")
    data: str = setting(
        "", "documents: text, conversations, prompt/response or preference records (prompt + each answer)"
    )
    layer: int = setting(2, "decoder layer whose output (the residual stream) is encoded")
    layers: str = setting(
        "", "several layers, e.g. 4,8,12: one SAE each from the same forward passes, saved to <out>/layers.N"
    )
    out: str = setting("runs/sae", "SAE folder to write (SAELens layout, plus eval.json)")
    architecture: Literal["topk", "batchtopk", "featurechoice", "jumprelu", "relu"] = setting(
        "topk",
        "activation: TopK, BatchTopK, Feature Choice, JumpReLU or ReLU (the docs' SAE page says how each trains)",
    )
    d_sae: int = setting(512, "number of latents", ge=1)
    k: int = setting(32, "TopK: active latents per token (BatchTopK and Feature Choice: on average)", ge=1)
    normalize: bool = setting(
        True, "train on activations scaled to mean norm sqrt(d_in); the saved SAE reads raw activations"
    )
    fc_zipf: float = setting(
        0.0, "Feature Choice: latent i takes a share of the tokens proportional to 1/(i+1)^fc_zipf (0: equal)", ge=0
    )
    fc_max_share: float = setting(
        0.08, "Feature Choice: the largest share of a batch's tokens one latent may take", gt=0, le=1
    )
    l1_coeff: float = setting(5.0, "ReLU: coefficient of the decoder-norm-weighted L1 penalty", ge=0)
    l0_coeff: float = setting(1e-3, "JumpReLU: coefficient of the L0 penalty", ge=0)
    jumprelu_bandwidth: float = setting(0.001, "JumpReLU: width of the straight-through rectangle kernel", gt=0)
    jumprelu_init_threshold: float = setting(0.001, "JumpReLU: initial threshold", gt=0)
    aux_k: int | None = setting(
        None, "TopK, BatchTopK, Feature Choice: dead latents the AuxK loss uses (default: d_in / 2)", ge=1
    )
    aux_coeff: float = setting(1 / 32, "TopK, BatchTopK, Feature Choice: coefficient of the AuxK loss", ge=0)
    dead_tokens: int = setting(
        10_000_000, "a latent silent for this many tokens is dead, and AuxK trains it on the residual", ge=1
    )
    resample_every: int = setting(
        0, "TopK, BatchTopK, Feature Choice: every this many tokens, re-initialise long-dead latents (0: off)", ge=0
    )
    resample_until: float = setting(0.5, "share of the training tokens after which no latent is resampled", ge=0, le=1)
    tokens: int = setting(600_000, "training tokens", ge=1)
    batch_tokens: int = setting(1024, "tokens per optimiser step", ge=1)
    lr: float = setting(3e-3, "Adam learning rate (constant, then a linear decay over the last 20%)", gt=0)
    format: Literal["saelens", "sparsify"] = setting(
        "saelens", "folder layout to save: SAELens, or sparsify (TopK only)"
    )
    buffer_tokens: int = setting(32_768, "shuffle buffer of activations (mixes tokens of many documents)", ge=1)
    model_batch_size: int = setting(32, "documents per forward pass of the model", ge=1)
    max_length: int = setting(128, "tokens kept per document", ge=2)
    eval_tokens: int = setting(40_000, "held-out tokens for the final evaluation (eval.json)", ge=1)
    outlier_norm: float = setting(
        OUTLIER_NORM,
        "leave out tokens whose residual norm exceeds this multiple of the batch median (0: keep all)",
        ge=0,
    )
    seed: int = setting(0, "seed of the init, the document order and the shuffle buffer")
    device: str | None = setting(None, "device to train on (default: the GPU when there is one)")
    progress: bool = setting(True, "show a progress bar")

    def validate(self) -> None:
        super().validate()
        if not self.model or not self.data:
            raise ConfigError("sae train needs model and data (--model, --data)")
        check_model_path(self.model)
        if self.format == "sparsify" and self.architecture != "topk":
            raise ConfigError(
                f"format=sparsify holds TopK SAEs only, not architecture={self.architecture}; use format=saelens"
            )
        _shares(self)  # a Feature Choice setting that cannot add up fails here, before the model is loaded


# ---------------------------------------------------------------- activations
def run_to_layers(model, layers: list[int], **inputs) -> torch.Tensor:
    """Residual streams after each of ``layers`` from one forward pass cut after the deepest: [..., layers, d]."""
    with contextlib.ExitStack() as stack:
        boxes = [stack.enter_context(capture_layer(model, layer, stop=layer == max(layers))) for layer in layers]
        model(**inputs, use_cache=False)
    return torch.stack([b["h"] for b in boxes], -2)


@torch.no_grad()
def iter_activations(
    model,
    tokenizer,
    docs: list[list[int]],
    layer: int | list[int],
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
    loop: bool = True,
    outlier_norm: float = 0.0,
) -> Iterator[torch.Tensor]:
    """Yield [n_tokens, d] residual-stream activations at ``layer`` (padding removed), cycling over docs; for a list
    of layers, [n_tokens, layers, d] from one forward pass. ``outlier_norm > 0`` drops tokens with a massive norm
    (``metrics.typical_tokens``)."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id
    while True:
        order = list(range(len(docs)))
        rng.shuffle(order)
        for ids, att in doc_batches([docs[j] for j in order], batch_size, max_length, pad, device):
            if isinstance(layer, int):
                h = run_to_layer(model, layer, input_ids=ids, attention_mask=att)
            else:
                h = run_to_layers(model, layer, input_ids=ids, attention_mask=att)
            x = h[att.bool()].float()
            yield x[typical_tokens(x, outlier_norm)] if outlier_norm > 0 else x
        if not loop:
            return


def shuffle_buffer(
    source: Iterator[torch.Tensor], buffer_tokens: int, batch_tokens: int, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Mix tokens from many documents: fill a buffer, hand out a random half in batches, refill."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.empty(0)
    for chunk in source:
        buf = chunk if buf.numel() == 0 else torch.cat([buf, chunk.to(buf.device)])
        if len(buf) < buffer_tokens:
            continue
        perm = torch.randperm(len(buf), generator=g).to(buf.device)
        buf = buf[perm]
        half = len(buf) // 2
        for i in range(0, half - batch_tokens + 1, batch_tokens):
            yield buf[i : i + batch_tokens]
        buf = buf[half:]


# ---------------------------------------------------------------- JumpReLU straight-through estimators
def _rect(z: torch.Tensor) -> torch.Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        gx = (x > threshold).to(x.dtype) * grad
        gt = -(threshold / eps) * _rect((x - threshold) / eps) * grad
        return gx, gt.sum(0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        gt = -(1.0 / eps) * _rect((x - threshold) / eps) * grad
        return torch.zeros_like(x), gt.sum(0), None


# ---------------------------------------------------------------- training
SPARSE_ARCHS = (
    "topk",
    "batchtopk",
    "featurechoice",
)  # k-sparse by construction: unit-norm decoder rows, AuxK revives dead latents
THRESHOLD_ARCHS = (
    "batchtopk",
    "featurechoice",
)  # trained by a selection rule, saved as JumpReLU with the threshold it implies


def init_sae(cfg: SAETrainConfig, d_in: int, first: torch.Tensor, layer: int, model_name: str) -> SAE:
    """Decoder rows random unit vectors (scaled by 0.1 for L1/L0-penalised SAEs), encoder their transpose, b_dec the
    mean of the first batch. BatchTopK and Feature Choice SAEs are JumpReLU SAEs whose threshold training estimates."""
    # the layer enters the seed: SAEs of two layers must not share a random init, or matching their
    # latents (SAE Match) would find the shared init rather than shared features
    g = torch.Generator().manual_seed(cfg.seed * 1009 + layer)
    arch = "jumprelu" if cfg.architecture in THRESHOLD_ARCHS else cfg.architecture
    extra = {"trained_as": cfg.architecture, "k": cfg.k} if cfg.architecture in THRESHOLD_ARCHS else {}
    sae = SAE(
        SAEConfig(
            d_in,
            cfg.d_sae,
            arch,
            k=cfg.k if arch == "topk" else None,
            apply_b_dec_to_input=True,
            layer=layer,
            model=model_name,
            extra=extra,
        )
    )
    with torch.no_grad():
        w = torch.randn(cfg.d_sae, d_in, generator=g)
        w /= w.norm(dim=-1, keepdim=True)
        if cfg.architecture not in SPARSE_ARCHS:
            w *= 0.1
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_dec.copy_(first.mean(0))
        if cfg.architecture in SPARSE_ARCHS:
            sae.W_enc.mul_(_init_encoder_scale(sae, first, cfg))
        if cfg.architecture == "jumprelu":
            sae.threshold.fill_(cfg.jumprelu_init_threshold)
        if cfg.architecture in THRESHOLD_ARCHS:
            sae.threshold.fill_(-1.0)  # unset: the decay phase's batches set it
    if cfg.architecture in THRESHOLD_ARCHS:
        sae.threshold.requires_grad_(False)
    return sae


def _init_encoder_scale(sae: SAE, first: torch.Tensor, cfg: SAETrainConfig) -> float:
    """The least-squares scale of the first batch's reconstruction: with the encoder the decoder's transpose the k
    selected latents add up to far more than the input (about 2x its norm at k = d_in / 2), an overshoot the first
    steps spend undoing, worst at large k. Scaling the encoder changes no latent's selection (TopK and BatchTopK
    are invariant to a positive scale), only the values, so the scale is read off one forward pass."""
    c = (
        first.to(sae.W_enc.device, sae.W_enc.dtype) - sae.b_dec
    )  # the SAE is built on the CPU, the batch may be on a GPU
    r = _sparse_codes(sae, c @ sae.W_enc, cfg.architecture, cfg.k, _shares(cfg))[0] - sae.b_dec
    return float(((c * r).sum() / r.pow(2).sum().clamp(min=1e-12)).clamp(min=1e-3, max=1.0))


def input_scale(x: torch.Tensor) -> float:
    """The factor that brings activations to mean norm sqrt(d_in) (SAELens' and dictionary_learning's
    normalisation): learning rates and loss coefficients then mean the same at every layer and model."""
    return float(x.shape[-1] ** 0.5 / x.norm(dim=-1).mean().clamp(min=1e-8))


def _rows_times(idx: torch.Tensor, vals: torch.Tensor, y: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``F^T @ y`` for the k-sparse codes F [tokens, n_rows] given as (idx, vals) [tokens, k]: a sparse-dense
    product, about 2.5x faster on a CPU than the dense one at 1024 latents and k <= 64, and than ``index_add`` of
    the [tokens * k, d] outer products (sparsify's)."""
    n, k = idx.shape
    tok = torch.arange(n, device=idx.device).repeat_interleave(k)
    f_t = torch.sparse_coo_tensor(
        torch.stack([idx.reshape(-1), tok]), vals.reshape(-1), (n_rows, n), check_invariants=False
    )
    return torch.sparse.mm(f_t, y)


class _EncodeTopK(torch.autograd.Function):
    """The k largest of ``x @ W_enc + b`` per token (values, ids). Backward only reaches the k selected latents per
    token, so the encoder's gradient is a sparse product instead of a dense [d_in, tokens] x [tokens, d_sae] one."""

    @staticmethod
    def forward(ctx, x, w_enc, b, k):
        vals, idx = torch.addmm(b, x, w_enc).topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(x, w_enc, idx)
        ctx.d_sae = w_enc.shape[1]
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, g, _):
        x, w_enc, idx = ctx.saved_tensors
        g_x = (
            torch.nn.functional.embedding_bag(idx, w_enc.T, per_sample_weights=g, mode="sum")
            if ctx.needs_input_grad[0]
            else None
        )
        g_w = _rows_times(idx, g, x, ctx.d_sae).T if ctx.needs_input_grad[1] else None
        g_b = torch.zeros(ctx.d_sae, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        return g_x, g_w, g_b, None


@functools.lru_cache(maxsize=8)
def feature_choice_shares(d_sae: int, k: float, zipf: float = 0.0, max_share: float = 1.0) -> torch.Tensor:
    """Share of a batch's tokens each Feature Choice latent takes: proportional to 1/(i+1)^zipf, none above
    ``max_share``, summing to k (so the mean L0 is k). zipf 0 is the paper's equal share k / d_sae; above 0, the
    first latents may track frequent features (a language model's feature frequencies fall off like a power law)
    and the last ones rare ones, none of them dead or dense."""
    if not 0 < max_share <= 1 or zipf < 0:
        raise ConfigError(f"featurechoice: fc_max_share={max_share} must lie in (0, 1] and fc_zipf={zipf} must be >= 0")
    if k / d_sae > max_share:
        raise ConfigError(
            f"featurechoice: k={k} over d_sae={d_sae} latents needs a share of {k / d_sae:.3f} per latent, above fc_max_share={max_share}"
        )
    w = torch.arange(1, d_sae + 1, dtype=torch.float64) ** -zipf
    lo, hi = 0.0, max_share / float(w[-1])  # at hi every latent sits at the cap, which sums to d_sae * max_share >= k
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((mid * w).clamp(max=max_share).sum()) < k else (lo, mid)
    return (hi * w).clamp(max=max_share).float()


def _shares(cfg: SAETrainConfig) -> torch.Tensor | None:
    return (
        feature_choice_shares(cfg.d_sae, cfg.k, cfg.fc_zipf, cfg.fc_max_share)
        if cfg.architecture == "featurechoice"
        else None
    )


def _sparse_codes(
    sae: SAE, pre: torch.Tensor, arch: str, k: int, shares: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_hat, active latent ids, L0, smallest value kept). TopK keeps the k largest per token; BatchTopK keeps
    the k * tokens largest of the whole batch (so a token gets more or fewer); Feature Choice (Ayonrinde 2024,
    arXiv:2411.02124) keeps each latent's share of the tokens (``shares``, from ``feature_choice_shares``), its
    largest, so every latent fires as often as its share says in training and the smallest value kept is one per
    latent."""
    if arch == "topk":
        vals, idx = pre.topk(k, dim=-1, sorted=False) if torch.is_tensor(pre) else _EncodeTopK.apply(*pre, k)
        vals = vals.relu()
        return sae.decode_sparse(idx, vals), idx[vals > 0], (vals > 0).sum(-1).float().mean(), vals.detach().min()
    n = pre.shape[0]
    if arch == "featurechoice":
        m = (shares.to(pre.device) * n).round().clamp(1, n).long()
        low = pre.detach().topk(int(m.max()), dim=0, sorted=True).values.gather(0, (m - 1)[None]).squeeze(0)
        chosen = pre.detach() >= low
        # ReLU forward, identity backward: a latent whose chosen tokens have all turned negative would get no
        # gradient and stay dead; this way the reconstruction error still pulls its encoder towards tokens it helps
        f = (pre + (pre.relu() - pre).detach()) * chosen
        live = chosen & (pre.detach() > 0)
        return sae.decode(f), live.any(0).nonzero().squeeze(1), live.sum().float() / n, low.clamp(min=0)
    vals, flat = pre.relu().flatten().topk(k * n, sorted=False)
    f = torch.zeros(n * sae.d_sae, dtype=pre.dtype, device=pre.device).scatter(0, flat, vals).view(n, sae.d_sae)
    live = vals.detach() > 0
    low = vals.detach()[live].min() if live.any() else vals.new_zeros(())
    return sae.decode(f), flat[live] % sae.d_sae, live.sum().float() / n, low


def sae_loss(sae: SAE, x: torch.Tensor, cfg: SAETrainConfig, dead: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """Loss and metrics for one batch. TopK/BatchTopK: the centring is folded into the encoder bias
    (``(x - b_dec) W + b = x W + (b - b_dec W)``), so b_dec's gradient through the encoder costs a vector-matrix
    product, not a third [tokens, d_sae] x [d_sae, d_in] one; AuxK's pre-activations are computed for the dead
    latents only. On a CPU the TopK encoder's backward reaches only the k selected latents (``_EncodeTopK``)."""
    arch = cfg.architecture
    aux = torch.zeros((), device=x.device)
    if arch in SPARSE_ARCHS:
        b_eff = sae.b_enc - sae.b_dec @ sae.W_enc if sae.cfg.apply_b_dec_to_input else sae.b_enc
        pre = (x, sae.W_enc, b_eff) if arch == "topk" and x.device.type == "cpu" else torch.addmm(b_eff, x, sae.W_enc)
        x_hat, fired_idx, l0, low = _sparse_codes(sae, pre, arch, cfg.k, _shares(cfg))
        fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device).index_fill_(0, fired_idx, True)
    else:
        pre = sae.encode_pre(x)
        if arch == "jumprelu":
            thr = sae.threshold
            f = _JumpReLU.apply(torch.relu(pre), thr, cfg.jumprelu_bandwidth)
            l0_ste = _Step.apply(torch.relu(pre), thr, cfg.jumprelu_bandwidth).sum(-1).mean()
        else:
            f = sae.activate(pre)
        x_hat = sae.decode(f)
        fired = (f > 0).any(0)
        l0 = (f > 0).float().sum(-1).mean()
        low = None
    err = x - x_hat
    mse = err.pow(2).sum(-1).mean()
    var = (x - x.mean(0)).pow(2).sum(-1).mean()
    if arch in SPARSE_ARCHS:
        loss = mse
        n_dead = int(dead.sum()) if dead is not None else 0
        if n_dead:
            k_aux = min(cfg.aux_k or max(1, x.shape[-1] // 2), n_dead)
            ids = dead.nonzero().squeeze(1)  # only the dead latents' pre-activations are needed
            a_vals, pos = torch.addmm(b_eff[ids], x, sae.W_enc[:, ids]).topk(k_aux, dim=-1, sorted=False)
            e_hat = sae.decode_sparse(ids[pos], a_vals.relu(), bias=False)
            target = err.detach()
            aux = (e_hat - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean().clamp(min=1e-8)
            loss = loss + cfg.aux_coeff * aux
    elif arch == "jumprelu":
        loss = mse + cfg.l0_coeff * l0_ste
    else:
        loss = mse + cfg.l1_coeff * (f * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    return loss, {
        "mse": mse.detach(),
        "ev": 1 - mse.detach() / var.clamp(min=1e-8),
        "l0": l0.detach(),
        "aux": aux.detach(),
        "fired": fired,
        "low": low,
    }


class _Fit:
    """One SAE's optimiser state and step. Adam, constant learning rate then linear decay over the last 20%;
    TopK/BatchTopK decoder rows kept unit-norm; a latent is dead once it has not fired for ``cfg.dead_tokens``
    tokens. With ``cfg.normalize`` every batch is scaled by ``input_scale(first)`` and the SAE is rescaled back at
    the end. BatchTopK's inference threshold is the mean over the decay phase (where the weights settle) of each
    batch's smallest kept value (Feature Choice: each latent's): an estimate taken earlier lags the growing encoder."""

    def __init__(self, sae: SAE, first: torch.Tensor, cfg: SAETrainConfig):
        self.sae, self.cfg = sae, cfg
        self.scale = input_scale(first) if cfg.normalize else 1.0
        sae.rescale_inputs(self.scale)
        self.opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.999))
        steps = max(1, cfg.tokens // cfg.batch_tokens)
        self.decay_from = decay_from = int(0.8 * steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 1.0 if s < decay_from else max(0.0, (steps - s) / (steps - decay_from))
        )
        self.since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=first.device)
        self.sparse = cfg.architecture in SPARSE_ARCHS
        self.n = 0

    def step(self, x: torch.Tensor) -> dict:
        sae, cfg = self.sae, self.cfg
        dead = self.since_fired > cfg.dead_tokens if self.sparse else None
        loss, m = sae_loss(sae, x * self.scale, cfg, dead)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.sparse:
            with torch.no_grad():  # rows stay unit-norm: drop the radial part of their gradient (OpenAI)
                w, g = sae.W_dec, sae.W_dec.grad
                g -= (g * w).sum(-1, keepdim=True) * w
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            if self.sparse:
                sae.normalize_decoder()
            if cfg.architecture == "jumprelu":
                sae.threshold.clamp_(min=1e-6)
            if cfg.architecture in THRESHOLD_ARCHS and self.n >= self.decay_from:
                i = self.n - self.decay_from
                sae.threshold.copy_((sae.threshold * i + m["low"]) / (i + 1))
        self.since_fired += len(x)
        self.since_fired[m["fired"]] = 0
        self.n += 1
        every = cfg.resample_every
        seen = self.n * cfg.batch_tokens
        if every and self.sparse and seen % every < cfg.batch_tokens and seen <= cfg.resample_until * cfg.tokens:
            m["resampled"] = self.resample(x * self.scale)
        return m

    @torch.no_grad()
    def resample(self, x: torch.Tensor) -> int:
        """Re-initialise the latents silent for ``resample_every`` tokens: each gets the direction of the residual
        of an input drawn with probability proportional to its squared reconstruction error (decoder row, and
        encoder column at the live latents' mean norm, bias 0), and fresh Adam moments. Returns how many."""
        sae, cfg = self.sae, self.cfg
        dead = (self.since_fired >= cfg.resample_every).nonzero().squeeze(1)
        if not len(dead):
            return 0
        b_eff = sae.b_enc - sae.b_dec @ sae.W_enc if sae.cfg.apply_b_dec_to_input else sae.b_enc
        err = x - _sparse_codes(sae, torch.addmm(b_eff, x, sae.W_enc), cfg.architecture, cfg.k, _shares(cfg))[0]
        w = err.pow(2).sum(-1)
        g = torch.Generator(device=x.device).manual_seed(cfg.seed * 7919 + self.n)
        pick = torch.multinomial(w / w.sum(), len(dead), replacement=len(dead) > len(x), generator=g)
        d = err[pick] / err[pick].norm(dim=-1, keepdim=True).clamp(min=1e-8)
        alive = torch.ones_like(self.since_fired, dtype=torch.bool).index_fill_(0, dead, False)
        scale = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else sae.W_enc.norm(dim=0).mean()
        sae.W_dec[dead] = d.to(sae.W_dec.dtype)
        sae.W_enc[:, dead] = (d.T * scale).to(sae.W_enc.dtype)
        sae.b_enc[dead] = 0
        for p, where in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,))):
            for v in self.opt.state.get(p, {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v[where] = 0
        self.since_fired[dead] = 0
        return len(dead)

    def finish(self) -> torch.Tensor:
        self.sae.rescale_inputs(1 / self.scale)
        return self.since_fired


def fit_many(
    saes: list[SAE], first: torch.Tensor, stream: Iterator[torch.Tensor], cfg: SAETrainConfig, progress: bool = False
) -> list[torch.Tensor]:
    """Train one SAE per layer on batches [tokens, layers, d_in] (``first``, then ``stream``) for ``cfg.tokens``
    tokens: each batch feeds every SAE, so the model runs once for all layers. Returns tokens since each latent fired."""
    fits = [_Fit(sae, first[:, i], cfg) for i, sae in enumerate(saes)]
    steps = max(1, cfg.tokens // cfg.batch_tokens)
    bar = tqdm(range(steps), desc=f"sae {cfg.architecture}", disable=not progress)
    x = first
    for step in bar:
        if step:
            x = next(stream)
        ms = [f.step(x[:, i]) for i, f in enumerate(fits)]
        if progress and (step % 10 == 0 or step == steps - 1):
            m, f = ms[0], fits[0]
            bar.set_postfix(
                mse=f"{m['mse'].item():.4f}",
                ev=f"{m['ev'].item():.3f}",
                l0=f"{m['l0'].item():.1f}",
                dead=int((f.since_fired > cfg.dead_tokens).sum()),
            )
    return [f.finish() for f in fits]


def fit(
    sae: SAE, first: torch.Tensor, stream: Iterator[torch.Tensor], cfg: SAETrainConfig, progress: bool = False
) -> torch.Tensor:
    """``fit_many`` for one SAE on batches [tokens, d_in]."""
    return fit_many([sae], first[:, None], (x[:, None] for x in stream), cfg, progress)[0]


def parse_layers(layers: str | list | None, model) -> list[int]:
    """``--layers 4,8,12`` (or a YAML list) as checked, distinct layer indices."""
    if not layers:
        return []
    try:
        out = [int(v) for v in (layers.split(",") if isinstance(layers, str) else layers)]
    except ValueError:
        raise ConfigError(f"layers={layers!r}: expected comma-separated layer indices such as 4,8,12") from None
    out = [check_layer(model, v) for v in out]
    if len(set(out)) != len(out):
        raise ConfigError(f"layers={layers!r}: a layer is named twice")
    return out


def _buffer_tokens(cfg: SAETrainConfig) -> int:
    """The shuffle buffer, never over twice the training tokens: its first fill hands out half of it, so a larger one
    would run the model over activations that are never trained on."""
    return min(cfg.buffer_tokens, max(2 * cfg.tokens, 2 * cfg.batch_tokens))


def train_sae(cfg: SAETrainConfig, model=None, tokenizer=None) -> tuple[SAE, dict]:
    """Train an SAE on ``cfg.model`` at ``cfg.layer`` over ``cfg.tokens`` tokens; save it to ``cfg.out``. With
    ``cfg.layers``, one SAE per layer from the same forward passes, saved to ``cfg.out/layers.N`` (sparsify's
    multi-layer layout, which ``load_sae(out, layer)`` reads); returns the first and a report per layer."""
    from ..models import load_model, load_tokenizer
    from .metrics import evaluate_sae

    cfg.validate()
    torch.manual_seed(cfg.seed)
    model = model if model is not None else load_model(cfg.model, device=cfg.device or "auto")
    if cfg.device:
        model = model.to(cfg.device)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    model.eval()
    layers = parse_layers(cfg.layers, model) or [check_layer(model, cfg.layer)]
    d_in = hidden_size(model)
    docs = read_documents(cfg.data, tokenizer)
    rng = random.Random(cfg.seed)
    rng.shuffle(docs)
    n_eval_docs = max(1, len(docs) // 10)
    eval_docs, train_docs = docs[:n_eval_docs], docs[n_eval_docs:]
    stream = shuffle_buffer(
        iter_activations(
            model,
            tokenizer,
            train_docs,
            layers,
            cfg.model_batch_size,
            cfg.max_length,
            cfg.seed,
            outlier_norm=cfg.outlier_norm,
        ),
        _buffer_tokens(cfg),
        cfg.batch_tokens,
        cfg.seed,
    )
    t0 = time.perf_counter()
    first = next(stream)
    saes = [init_sae(cfg, d_in, first[:, i], layer, cfg.model).to(first.device) for i, layer in enumerate(layers)]
    since_fired = fit_many(saes, first, stream, cfg, progress=cfg.progress)
    train_s = time.perf_counter() - t0
    reports = {}
    for sae, layer, fired in zip(saes, layers, since_fired):
        sae.eval().requires_grad_(False)
        report = evaluate_sae(
            sae,
            model,
            tokenizer,
            eval_docs,
            layer,
            max_tokens=cfg.eval_tokens,
            batch_size=cfg.model_batch_size,
            max_length=cfg.max_length,
            outlier_norm=cfg.outlier_norm,
        )
        report["train_dead_fraction"] = float((fired > cfg.dead_tokens).float().mean())
        report["train_seconds"] = train_s  # model forward passes and all layers' SAE steps together
        report["train_tokens_per_s"] = cfg.tokens / train_s
        out = os.path.join(cfg.out, f"layers.{layer}") if cfg.layers else cfg.out
        sae.save(out, extra={"train_config": asdict(cfg), "eval": report}, format=cfg.format)
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(report, f, indent=2)
        reports[layer] = report
    return saes[0], (reports if cfg.layers else reports[layers[0]])
