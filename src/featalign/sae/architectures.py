"""SAE architectures as trained: one class each, registered by name in ``ARCHITECTURES``.

Each says what it saves as (``saved_as``: the inference SAE of ``sae.model``), how a batch is encoded and decoded in
training (``forward``), its penalty (AuxK for the k-sparse ones, L0 for JumpReLU, L1 for ReLU), and what happens to
its threshold after a step. The k-sparse ones (TopK, BatchTopK, Feature Choice) keep unit-norm decoder rows and fold
the encoder's centring into its bias (``(x - b_dec) W + b = x W + (b - b_dec W)``), so b_dec's gradient through the
encoder costs a vector-matrix product, not a third [tokens, d_sae] x [d_sae, d_in] one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .model import SAE


# ---------------------------------------------------------------- straight-through estimators (JumpReLU)
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


# ---------------------------------------------------------------- the sparse TopK encoder
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
            f"featurechoice: k={k} over d_sae={d_sae} latents needs a share of {k / d_sae:.3f} per latent, above "
            f"fc_max_share={max_share}"
        )
    w = torch.arange(1, d_sae + 1, dtype=torch.float64) ** -zipf
    lo, hi = 0.0, max_share / float(w[-1])  # at hi every latent sits at the cap, which sums to d_sae * max_share >= k
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((mid * w).clamp(max=max_share).sum()) < k else (lo, mid)
    return (hi * w).clamp(max=max_share).float()


@dataclass
class Codes:
    """One batch through an SAE in training."""

    x_hat: torch.Tensor  # [tokens, d_in] the reconstruction
    fired: torch.Tensor  # [d_sae] bool: latents active on any token of the batch
    l0: torch.Tensor  # mean active latents per token
    low: torch.Tensor | None  # the smallest value kept (per latent for Feature Choice): what a threshold estimates
    f: torch.Tensor | None = None  # [tokens, d_sae] dense activations (the penalised architectures)
    b_eff: torch.Tensor | None = None  # the encoder bias with the centring folded in (the k-sparse architectures)
    l0_ste: torch.Tensor | None = None  # JumpReLU's L0 with a straight-through gradient to the threshold


def _fired(ids: torch.Tensor, d_sae: int) -> torch.Tensor:
    return torch.zeros(d_sae, dtype=torch.bool, device=ids.device).index_fill_(0, ids, True)


class Architecture:
    """How one SAE architecture trains."""

    name = ""
    saved_as = ""  # the inference architecture it is saved as: topk, jumprelu or relu
    sparse = False  # k-sparse by construction: unit-norm decoder rows; AuxK and resampling revive dead latents
    learns_threshold = False  # chosen by a rule in training, saved as JumpReLU with the threshold that rule implies

    def check(self, cfg) -> None:
        """Refuse settings this architecture cannot honour (before the model is loaded)."""

    def forward(self, sae: SAE, x: torch.Tensor, cfg) -> Codes:
        raise NotImplementedError

    def penalty(
        self, sae: SAE, x: torch.Tensor, err: torch.Tensor, codes: Codes, cfg, dead
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(what is added to the MSE, the auxiliary loss for the metrics)."""
        zero = torch.zeros((), device=x.device)
        return zero, zero

    def init(self, sae: SAE, cfg) -> None:
        """Set what the shared init (random unit decoder rows, encoder their transpose) does not."""

    @torch.no_grad()
    def after_step(self, sae: SAE, low: torch.Tensor | None, step: int, decay_from: int) -> None:
        """Keep the SAE's constraints after an optimiser step."""


class Sparse(Architecture):
    """The k-sparse architectures: AuxK (reconstruct the residual error from the ``aux_k`` largest pre-activations
    of the dead latents, computed for those latents only) and unit-norm decoder rows."""

    sparse = True

    def pre(self, sae: SAE, x: torch.Tensor, b_eff: torch.Tensor):
        return torch.addmm(b_eff, x, sae.W_enc)

    def codes(self, sae: SAE, pre, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_hat, active latent ids, L0, smallest value kept) from the pre-activations."""
        raise NotImplementedError

    def forward(self, sae: SAE, x: torch.Tensor, cfg) -> Codes:
        b_eff = sae.b_enc - sae.b_dec @ sae.W_enc if sae.cfg.apply_b_dec_to_input else sae.b_enc
        x_hat, fired_idx, l0, low = self.codes(sae, self.pre(sae, x, b_eff), cfg)
        return Codes(x_hat, _fired(fired_idx, sae.d_sae), l0, low, b_eff=b_eff)

    def penalty(self, sae, x, err, codes, cfg, dead):
        n_dead = int(dead.sum()) if dead is not None else 0
        if not n_dead:
            zero = torch.zeros((), device=x.device)
            return zero, zero
        k_aux = min(cfg.aux_k or max(1, x.shape[-1] // 2), n_dead)
        ids = dead.nonzero().squeeze(1)  # only the dead latents' pre-activations are needed
        a_vals, pos = torch.addmm(codes.b_eff[ids], x, sae.W_enc[:, ids]).topk(k_aux, dim=-1, sorted=False)
        e_hat = sae.decode_sparse(ids[pos], a_vals.relu(), bias=False)
        target = err.detach()
        aux = (e_hat - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean().clamp(min=1e-8)
        return cfg.aux_coeff * aux, aux

    def init(self, sae: SAE, cfg) -> None:
        if self.learns_threshold:
            sae.threshold.fill_(-1.0)  # unset: the decay phase's batches set it
            sae.threshold.requires_grad_(False)

    @torch.no_grad()
    def after_step(self, sae, low, step, decay_from):
        sae.normalize_decoder()
        if self.learns_threshold and step >= decay_from:
            # the mean over the decay phase (where the weights settle) of each batch's smallest kept value: an
            # estimate taken earlier lags the growing encoder
            i = step - decay_from
            sae.threshold.copy_((sae.threshold * i + low) / (i + 1))


class TopK(Sparse):
    """The k largest pre-activations per token (OpenAI, sparsify). On a CPU the encoder's backward reaches only the k
    selected latents (``_EncodeTopK``)."""

    name = saved_as = "topk"

    def pre(self, sae, x, b_eff):
        return (x, sae.W_enc, b_eff) if x.device.type == "cpu" else torch.addmm(b_eff, x, sae.W_enc)

    def codes(self, sae, pre, cfg):
        vals, idx = pre.topk(cfg.k, dim=-1, sorted=False) if torch.is_tensor(pre) else _EncodeTopK.apply(*pre, cfg.k)
        vals = vals.relu()
        return sae.decode_sparse(idx, vals), idx[vals > 0], (vals > 0).sum(-1).float().mean(), vals.detach().min()


class BatchTopK(Sparse):
    """The k * tokens largest of the whole batch, so a token gets more or fewer than k; a threshold at inference."""

    name, saved_as, learns_threshold = "batchtopk", "jumprelu", True

    def codes(self, sae, pre, cfg):
        n = pre.shape[0]
        vals, flat = pre.relu().flatten().topk(cfg.k * n, sorted=False)
        f = torch.zeros(n * sae.d_sae, dtype=pre.dtype, device=pre.device).scatter(0, flat, vals).view(n, sae.d_sae)
        live = vals.detach() > 0
        low = vals.detach()[live].min() if live.any() else vals.new_zeros(())
        return sae.decode(f), flat[live] % sae.d_sae, live.sum().float() / n, low


class FeatureChoice(Sparse):
    """Each latent takes its share of the batch's tokens, its largest (Ayonrinde 2024, arXiv:2411.02124), so every
    latent fires as often as its share says in training; a threshold per latent at inference."""

    name, saved_as, learns_threshold = "featurechoice", "jumprelu", True

    def check(self, cfg):
        self.shares(cfg)

    def shares(self, cfg) -> torch.Tensor:
        return feature_choice_shares(cfg.d_sae, cfg.k, cfg.fc_zipf, cfg.fc_max_share)

    def codes(self, sae, pre, cfg):
        n = pre.shape[0]
        m = (self.shares(cfg).to(pre.device) * n).round().clamp(1, n).long()
        low = pre.detach().topk(int(m.max()), dim=0, sorted=True).values.gather(0, (m - 1)[None]).squeeze(0)
        chosen = pre.detach() >= low
        # ReLU forward, identity backward: a latent whose chosen tokens have all turned negative would get no
        # gradient and stay dead; this way the reconstruction error still pulls its encoder towards tokens it helps
        f = (pre + (pre.relu() - pre).detach()) * chosen
        live = chosen & (pre.detach() > 0)
        return sae.decode(f), live.any(0).nonzero().squeeze(1), live.sum().float() / n, low.clamp(min=0)


class JumpReLU(Architecture):
    """``pre * H(pre - theta)`` with a learnt threshold per latent, trained with MSE + l0_coeff * L0 and
    straight-through gradients of a rectangle kernel (Gemma Scope)."""

    name = saved_as = "jumprelu"

    def forward(self, sae, x, cfg):
        pre = torch.relu(sae.encode_pre(x))
        f = _JumpReLU.apply(pre, sae.threshold, cfg.jumprelu_bandwidth)
        l0_ste = _Step.apply(pre, sae.threshold, cfg.jumprelu_bandwidth).sum(-1).mean()
        return Codes(sae.decode(f), (f > 0).any(0), (f > 0).float().sum(-1).mean(), None, f=f, l0_ste=l0_ste)

    def penalty(self, sae, x, err, codes, cfg, dead):
        return cfg.l0_coeff * codes.l0_ste, torch.zeros((), device=x.device)

    def init(self, sae, cfg):
        sae.threshold.fill_(cfg.jumprelu_init_threshold)

    @torch.no_grad()
    def after_step(self, sae, low, step, decay_from):
        sae.threshold.clamp_(min=1e-6)


class ReLU(Architecture):
    """``relu(pre)``, trained with MSE + l1_coeff * the decoder-norm-weighted L1 of the activations."""

    name = saved_as = "relu"

    def forward(self, sae, x, cfg):
        f = sae.activate(sae.encode_pre(x))
        return Codes(sae.decode(f), (f > 0).any(0), (f > 0).float().sum(-1).mean(), None, f=f)

    def penalty(self, sae, x, err, codes, cfg, dead):
        return cfg.l1_coeff * (codes.f * sae.W_dec.norm(dim=-1)).sum(-1).mean(), torch.zeros((), device=x.device)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (TopK(), BatchTopK(), FeatureChoice(), JumpReLU(), ReLU())}
