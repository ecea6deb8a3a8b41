"""Per-token log-probs, TDPO's per-position KL and predictive entropy, a chunk of positions at a time.

Full-vocabulary logits are the largest tensors of a preference step: 8 rows x 512 tokens x a 256k vocabulary is
4 GiB in float32, held three times over (logits, log-softmax, their gradient). Here they exist for one chunk of
positions at a time. The forward pass keeps only per-token results; the backward pass recomputes each chunk's logits
from the last hidden state and the LM head (the idea of Liger's fused linear cross-entropy and of Cut Cross-Entropy,
in plain torch so it runs on CPU). Only the positions that predict a response token are projected onto the vocabulary
at all: prompt and padding logits are never computed. ``fused`` goes further for training: each pair's logits once,
with the head's gradients, and no recomputation.

``token_logps``/``response_logps``/``sequential_kl`` are the plain (full-logits) versions, kept as the oracle of the
tests and for callers that already hold logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .head import Head, hidden_states, splittable
from .packing import Packing, packing_ok

CHUNK_ELEMENTS = 2**25  # logits per chunk: 128 MiB of float32, 131 positions of a 256k vocabulary


# ---------------------------------------------------------------------------------------------- plain path
def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_t | <t) for t >= 1: shape [N, T-1], computed in float32."""
    logits = logits[:, :-1].float()
    return torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:, None]).squeeze(2)


def response_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-prob and response length per row (prompt and padding masked)."""
    mask = response_mask[:, 1:].to(torch.float32)
    lp = token_logps(logits, input_ids)
    return (lp * mask).sum(-1), mask.sum(-1)


def sequential_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """TDPO's K(y) = sum over response positions of KL(p_ref || p_theta) of the next-token distributions."""
    mask = response_mask[:, 1:].to(torch.float32)
    lp = F.log_softmax(policy_logits[:, :-1].float(), -1)
    lr = F.log_softmax(ref_logits[:, :-1].float(), -1)
    kl = (lr.exp() * (lr - lp)).sum(-1)
    return (kl * mask).sum(-1)


# ---------------------------------------------------------------------------------------------- chunked core
def chunk_size(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def spans(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + chunk)) for s in range(0, n, chunk)]


def _forward(h, head: Head, targets, ref_h=None, ref_head: Head | None = None, chunk: int = 0):
    """Per-token log p(target), and with a reference KL(p_ref || p) and log p_ref(target); plus logsumexps.
    ``head`` and ``ref_head`` are cast (``Head.cast``)."""
    n = h.shape[0]
    chunk = chunk or chunk_size(head.weight.shape[0])
    lp, lse = h.new_empty(n, dtype=torch.float32), h.new_empty(n, dtype=torch.float32)
    kl = ref_lp = ref_lse = None
    if ref_h is not None:
        kl, ref_lp, ref_lse = (h.new_empty(n, dtype=torch.float32) for _ in range(3))
    for s, e in spans(n, chunk):
        z = head.logits(h[s:e])
        lse[s:e] = z.logsumexp(-1)
        lp[s:e] = z.gather(1, targets[s:e, None]).squeeze(1) - lse[s:e]
        if ref_h is not None:
            zr = ref_head.logits(ref_h[s:e])
            ref_lse[s:e] = zr.logsumexp(-1)
            ref_lp[s:e] = zr.gather(1, targets[s:e, None]).squeeze(1) - ref_lse[s:e]
            # KL = sum_v p_ref (lr - lp) with lr = zr - lse_r, lp = z - lse
            zr.sub_(ref_lse[s:e, None])
            z.sub_(lse[s:e, None]).neg_().add_(zr)
            kl[s:e] = (zr.exp_() * z).sum(-1)
    return lp, kl, ref_lp, lse, ref_lse


def logit_grad(p, targets, g_lp, g_kl, pr, dcap, head: Head):
    """d(sum g_lp * lp + sum g_kl * KL)/d(pre-cap logits), in place of ``p`` (the policy's probabilities).

    d lp / d z = onehot(target) - p;  d KL(ref || p) / d z = p - p_ref."""
    coef = -g_lp if g_kl is None else g_kl - g_lp
    gz = p.mul_(coef[:, None])
    gz.scatter_add_(1, targets[:, None], g_lp[:, None])
    if g_kl is not None:
        gz.sub_(pr.mul_(g_kl[:, None]))
    if dcap is not None:
        gz.mul_(dcap)
    if head.scale != 1.0:
        gz.mul_(head.scale)
    return gz


class HeadGrads:
    """Gradients of the head's input rows, weight and bias, accumulated a chunk of logit gradients at a time.
    ``head`` is the parameters' head (their dtypes), ``cast`` its ``Head.cast()``."""

    def __init__(self, h, head: Head, cast: Head, want_h: bool, want_w: bool, want_b: bool):
        self.h, self.head, self.cast = h, head, cast
        self.h_ = torch.zeros_like(h) if want_h else None
        self.w_ = torch.zeros(head.weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        self.b_ = torch.zeros(head.weight.shape[0], dtype=torch.float32, device=h.device) if want_b else None

    def add(self, idx, gz):
        dtype = self.cast.dtype
        gzc = gz.to(dtype)
        if self.h_ is not None:
            self.h_[idx] = gzc @ self.cast.weight
        if self.w_ is not None:
            hs = self.h[idx]
            if dtype == torch.float32:
                self.w_.addmm_(gzc.t(), hs.float())
            else:
                self.w_.add_(gzc.t() @ hs.to(dtype))
        if self.b_ is not None:
            self.b_.add_(gz.sum(0))

    def result(self):
        w = None if self.w_ is None else self.w_.to(self.head.weight.dtype)
        return self.h_, w, None if self.b_ is None else self.b_.to(self.head.bias.dtype)


class _ChunkedHead(torch.autograd.Function):
    """Per-token log-probs (and KL to a fixed reference) through the LM head, recomputing logits in backward."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ref_h, head: Head, ref_head: Head | None, chunk: int):
        ctx.head, ctx.ref_head, ctx.chunk = head, ref_head, chunk or chunk_size(head.weight.shape[0])
        with torch.autocast(h.device.type, enabled=False):
            cast_ref = None if ref_head is None else ref_head.cast()
            lp, kl, ref_lp, lse, ref_lse = _forward(h, head.cast(), targets, ref_h, cast_ref, chunk)
        ctx.save_for_backward(h, targets, lse, ref_h, ref_lse)
        if kl is None:
            kl, ref_lp = lp.new_zeros(0), lp.new_zeros(0)
        ctx.mark_non_differentiable(ref_lp)
        return lp, kl, ref_lp

    @staticmethod
    def backward(ctx, g_lp, g_kl, _g_ref):
        h, targets, lse, ref_h, ref_lse = ctx.saved_tensors
        head, chunk = ctx.head, ctx.chunk
        cast = head.cast()
        ref_cast = None if ctx.ref_head is None else ctx.ref_head.cast()
        grads = HeadGrads(h, head, cast, *ctx.needs_input_grad[:3])
        use_kl = ref_h is not None and g_kl is not None
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float()
        with torch.autocast(h.device.type, enabled=False):
            for s, e in spans(h.shape[0], chunk):
                z = cast.logits(h[s:e])
                dcap = 1 - (z / head.softcap) ** 2 if head.softcap else None
                p = z.sub_(lse[s:e, None]).exp_()
                pr = ref_cast.logits(ref_h[s:e]).sub_(ref_lse[s:e, None]).exp_() if use_kl else None
                gz = logit_grad(p, targets[s:e], g_lp[s:e], g_kl[s:e].float() if use_kl else None, pr, dcap, head)
                grads.add(slice(s, e), gz)
        return (*grads.result(), None, None, None, None, None)


def chunked_token_terms(
    h: torch.Tensor,
    head: Head,
    targets: torch.Tensor,
    ref_h: torch.Tensor | None = None,
    ref_head: Head | None = None,
    chunk: int = 0,
):
    """(log p [M], KL(ref || policy) [M] or None, log p_ref [M] or None) for M selected positions.

    ``h``/``ref_h`` [M, H] are the hidden states of the positions, ``targets`` [M] the tokens they predict.
    The reference enters without gradient."""
    if ref_h is not None:
        ref_h, ref_head = ref_h.detach(), ref_head.detached()
    if torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad):
        lp, kl, ref_lp = _ChunkedHead.apply(h, head.weight, head.bias, targets, ref_h, head, ref_head, chunk)
        return lp, (kl if ref_h is not None else None), (ref_lp if ref_h is not None else None)
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        cast_ref = None if ref_head is None else ref_head.cast()
        lp, kl, ref_lp, _, _ = _forward(h, head.cast(), targets, ref_h, cast_ref, chunk)
    return lp, kl, ref_lp


# ---------------------------------------------------------------------------------------------- batches
def response_positions(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of every hidden state that predicts a response token (position t predicts token t+1).

    Computed on the CPU copy of the mask before the batch moves to the GPU, it costs no device sync."""
    rows, cols = response_mask[:, 1:].nonzero(as_tuple=True)
    return rows, cols


def row_sum(x, rows, n):
    return x.new_zeros(n).index_add(0, rows, x)


@dataclass
class Selected:
    """One model's last hidden states at the positions that predict a response token, and the head that reads them."""

    h: torch.Tensor  # [M, H]
    head: Head


@dataclass
class Forward:
    """One forward pass of the policy (and of a live reference) over a batch, before anything touches the LM head.

    ``terms()`` gives per-row sums (the plain autograd path, any loss); ``fused.fused_loss`` gives a preference loss
    whose head gradients are computed during the forward. Made by ``forward``."""

    n: int  # rows: the chosen rows first, then the rejected ones
    length: torch.Tensor  # [N] response tokens per row
    policy: Selected | None = None  # None: the model could not be split, and ``full_terms`` holds the terms
    reference: Selected | None = None  # a live reference's, at the same positions
    targets: torch.Tensor | None = None  # [M] the token each position predicts
    rows: torch.Tensor | None = None  # [M] the row of each position
    row_counts: torch.Tensor | None = None  # [N] positions per row, on the CPU
    with_ref: bool = False  # reference log-probs wanted (a live reference, or the policy with its adapter off)
    kl: bool = False  # TDPO's per-position KL wanted too
    chunk: int = 0  # positions per chunk through the head (0: ``chunk_size`` of the vocabulary)
    full_terms: dict[str, torch.Tensor] | None = None
    packing: Packing | None = None  # set when the batch ran as one packed row

    def terms(self) -> dict[str, torch.Tensor]:
        if self.full_terms is not None:
            return self.full_terms
        out, n, rows, pol, ref = {"length": self.length}, self.n, self.rows, self.policy, self.reference
        if self.with_ref and self.kl:
            lp, tok_kl, ref_lp = chunked_token_terms(pol.h, pol.head, self.targets, ref.h, ref.head, self.chunk)
            out["kl"] = row_sum(tok_kl, rows, n)
        else:
            lp, _, _ = chunked_token_terms(pol.h, pol.head, self.targets, chunk=self.chunk)
            if self.with_ref:  # reference log-probs alone need no graph
                with torch.no_grad():
                    ref_lp, _, _ = chunked_token_terms(ref.h, ref.head, self.targets, chunk=self.chunk)
        out["logps"] = row_sum(lp, rows, n)
        if self.with_ref:
            out["ref_logps"] = row_sum(ref_lp.detach(), rows, n)
        return out

    def row_names(self) -> list[str]:
        """The per-row terms besides ``length``: log-probs, and with a reference its log-probs (and the KL)."""
        return ["logps"] + (["ref_logps"] if self.with_ref else []) + (["kl"] if self.with_ref and self.kl else [])


class reference_model:
    """The reference model: ``ref`` itself, or ``model`` with its PEFT adapter switched off."""

    def __init__(self, model, ref, adapter_off):
        self.model, self.ref, self.adapter_off, self.ctx = model, ref, adapter_off, None

    def __enter__(self):
        if not self.adapter_off:
            return self.ref
        peft_model = self.model
        while not hasattr(peft_model, "disable_adapter"):
            peft_model = getattr(peft_model, "module", None) or peft_model._orig_mod
        self.ctx = peft_model.disable_adapter()
        self.ctx.__enter__()
        return peft_model

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _full_logits(model, ref, ref_adapter_off, input_ids, attention_mask, response_mask, length, kl, with_ref):
    """The terms from full logits, for a model that cannot be split into decoder + head."""
    out = {"length": length}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    out["logps"], _ = response_logps(logits, input_ids, response_mask)
    if with_ref:
        with torch.no_grad(), reference_model(model, ref, ref_adapter_off) as rm:
            ref_logits = rm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        out["ref_logps"], _ = response_logps(ref_logits, input_ids, response_mask)
        if kl:
            out["kl"] = sequential_kl(logits, ref_logits, response_mask)
    return out


def forward(
    model,
    input_ids,
    attention_mask,
    response_mask,
    positions=None,
    ref=None,
    kl: bool = False,
    chunk: int = 0,
    ref_adapter_off: bool = False,
    pack: bool = False,
) -> Forward:
    """Run the policy (and a live reference: a model, or ``model`` itself with its PEFT adapter disabled when
    ``ref_adapter_off``) and keep the last hidden states of the positions that predict a response token.
    ``positions``: ``response_positions`` of the mask, precomputed on the CPU (else computed here, a device
    sync on a GPU). A model that cannot be split into decoder + head gets its terms from full logits here.
    ``pack``: run the batch as one row without padding (``Packing``) where the model allows it; then
    ``Forward.packing`` is set, and hidden states captured by hooks are packed ([1, M, H])."""
    if positions is None:
        positions = response_positions(response_mask.cpu())
    rows_cpu = positions[0].cpu()
    rows, cols = (x.to(input_ids.device, non_blocking=True) for x in positions)
    n = input_ids.shape[0]
    length = response_mask[:, 1:].to(torch.float32).sum(-1)
    with_ref = ref is not None or ref_adapter_off
    packing = None
    if pack and all(splittable(m) and packing_ok(m) for m in ([model] if ref is None else [model, ref])):
        packing = Packing.of(input_ids, attention_mask)
    pol = hidden_states(model, input_ids, attention_mask, packing)
    ref_split = None
    if with_ref and pol is not None:
        with torch.no_grad(), reference_model(model, ref, ref_adapter_off) as rm:
            ref_split = hidden_states(rm, input_ids, attention_mask, packing)
    if pol is None or (with_ref and ref_split is None):
        terms = _full_logits(
            model, ref, ref_adapter_off, input_ids, attention_mask, response_mask, length, kl, with_ref
        )
        # a hook may have captured the packed pass before the head check failed: keep the packing to unpack it
        return Forward(n, length, full_terms=terms, packing=packing)

    def at(h):  # the hidden states of the selected positions, from the padded batch or the packed row
        return h[0, packing.index(rows, cols)] if packing is not None else h[rows, cols]

    reference = None if ref_split is None else Selected(at(ref_split[0]), ref_split[1])
    return Forward(
        n,
        length,
        Selected(at(pol[0]), pol[1]),
        reference,
        input_ids[:, 1:][rows, cols],
        rows,
        torch.bincount(rows_cpu, minlength=n),
        with_ref,
        kl,
        chunk,
        packing=packing,
    )


def response_terms(
    model,
    input_ids,
    attention_mask,
    response_mask,
    positions=None,
    ref=None,
    kl: bool = False,
    chunk: int = 0,
    ref_adapter_off: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-row summed response log-prob ``logps`` and ``length``; with a reference also ``ref_logps`` and, when
    ``kl``, TDPO's summed per-position ``kl``. Gradients flow into ``model`` only (arguments: ``forward``)."""
    return forward(model, input_ids, attention_mask, response_mask, positions, ref, kl, chunk, ref_adapter_off).terms()


@torch.no_grad()
def sample_logps_entropy(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, chunk: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(token) and predictive entropy (nats) of the next-token distribution, both [N, T-1]
    aligned with ``response_mask[:, 1:]`` and zero outside it: what ``eval`` needs for sampled answers."""
    rows, cols = response_positions(response_mask.cpu())
    rows, cols = rows.to(input_ids.device), cols.to(input_ids.device)
    n, t = input_ids.shape
    lp_out = torch.zeros(n, t - 1, device=input_ids.device)
    ent_out = torch.zeros_like(lp_out)
    pol = hidden_states(model, input_ids, attention_mask)
    if pol is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
        logp = logits.log_softmax(-1)
        m = response_mask[:, 1:].bool()
        lp_out = torch.where(m, logp.gather(2, input_ids[:, 1:, None]).squeeze(2), 0.0)
        ent_out = torch.where(m, -(logp.exp() * logp).sum(-1), 0.0)
        return lp_out, ent_out
    h, head = pol[0][rows, cols], pol[1].cast()
    targets = input_ids[:, 1:][rows, cols]
    with torch.autocast(h.device.type, enabled=False):
        for s, e in spans(h.shape[0], chunk or chunk_size(head.weight.shape[0])):
            logp = head.logits(h[s:e]).log_softmax(-1)
            lp_out[rows[s:e], cols[s:e]] = logp.gather(1, targets[s:e, None]).squeeze(1)
            ent_out[rows[s:e], cols[s:e]] = -(logp.exp() * logp).sum(-1)
    return lp_out, ent_out
