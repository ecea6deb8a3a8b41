"""A mean-over-pairs preference loss through the LM head with each pair's logits computed once.

Every method of ``losses`` is a mean over pairs of a function of the pair's row sums (log-probs, a live reference's
log-probs and KL) and of per-pair extras (FPO's feature terms). So each pair's logits can be computed, the pair's loss
differentiated with respect to its row sums right away, and the head's gradients accumulated before the logits are
dropped: at most one pair's logits exist, and none is recomputed in backward (the chunked path's extra
vocabulary-sized matmul per token). The gradients are known when the loss is; ``_KnownGrads`` hands them to autograd,
scaled by the incoming gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .logprobs import Forward, HeadGrads, chunk_size, logit_grad, spans

FUSED_ELEMENTS = 2**28  # the most logits of one pair held at once (1 GiB of float32)

# pair_loss(rows, extras) -> the pair's loss: rows = {"logps", "length", with a reference "ref_logps" (and "kl")}
# of the pair's two rows (chosen, rejected; shape [2]), extras = each extra tensor cut to the pair ([1])
PairLoss = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


def can_fuse(fw: Forward, budget: int | None = None) -> bool:
    """Whether ``fused_loss`` applies: a split model, a graph to build, pairs (rows i and n/2 + i) whose logits fit
    ``budget`` elements (``FUSED_ELEMENTS``; doubled need with a live reference)."""
    if fw.full_terms is not None or fw.n % 2 or not torch.is_grad_enabled():
        return False
    if not (fw.policy.h.requires_grad or fw.policy.head.weight.requires_grad):
        return False
    half = fw.n // 2
    largest = int((fw.row_counts[:half] + fw.row_counts[half:]).max()) if half else 0
    return largest * fw.policy.head.weight.shape[0] * (2 if fw.with_ref else 1) <= (budget or FUSED_ELEMENTS)


def fused_loss(fw: Forward, pair_loss: PairLoss, extras: dict[str, torch.Tensor]):
    """``mean_i pair_loss(rows_i, extras_i)`` over the batch's pairs, with gradients reaching the policy's hidden
    states, the head and the extras; and the per-row terms (detached), as ``Forward.terms()`` names them."""
    head = fw.policy.head
    inputs = {"h": fw.policy.h, "weight": head.weight, "bias": head.bias}
    inputs.update({k: v for k, v in extras.items() if torch.is_tensor(v)})
    want = {k: v is not None and v.requires_grad for k, v in inputs.items()}
    extra_inputs = {k: v for k, v in inputs.items() if k not in ("h", "weight", "bias")}
    with torch.no_grad():
        total, rows, grads = _pairs(fw, pair_loss, extra_inputs, want)
    tensors = [v for v in inputs.values() if v is not None]
    loss = _KnownGrads.apply(total, [grads.get(k) for k, v in inputs.items() if v is not None], *tensors)
    return loss, {"length": fw.length, **rows}


class _KnownGrads(torch.autograd.Function):
    """``loss`` whose gradients with respect to ``inputs`` are already known (for a unit incoming gradient)."""

    @staticmethod
    def forward(ctx, loss, grads, *inputs):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, g_loss):
        grads, ctx.grads = ctx.grads, None
        for x in grads:  # in place: a second [vocabulary x hidden] buffer would double the head's gradient memory
            if x is not None:
                x.mul_(g_loss.to(x.dtype))
        return (None, None, *grads)


def _pairs(fw: Forward, pair_loss: PairLoss, extras: dict[str, torch.Tensor], want: dict[str, bool]):
    """One pass over the pairs: (mean loss, per-row terms, gradients by input name for a unit incoming gradient)."""
    pol, ref = fw.policy, fw.reference
    head, cast, n, half = pol.head, pol.head.cast(), fw.n, fw.n // 2
    h = pol.h.detach()
    use_kl = ref is not None and fw.kl
    ref_cast = ref.head.cast() if ref is not None else None
    grads = HeadGrads(h, head, cast, want["h"], want["weight"], want["bias"])
    chunk = fw.chunk or chunk_size(head.weight.shape[0])
    offsets = [0, *torch.cumsum(fw.row_counts, 0).tolist()]
    outs = {k: torch.zeros(n, dtype=torch.float32, device=h.device) for k in fw.row_names()}
    extra_grads = {k: torch.zeros_like(e, dtype=torch.float32) for k, e in extras.items() if want[k]}
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        for i in range(half):
            (a, b), (c, d) = (offsets[i], offsets[i + 1]), (offsets[half + i], offsets[half + i + 1])
            idx = torch.cat([torch.arange(a, b), torch.arange(c, d)]).to(h.device)
            m_c = b - a
            tg = fw.targets[idx]
            z = cast.logits(h[idx])
            parts = spans(len(tg), chunk)
            lse = _chunked_lse(z, parts)  # logsumexp of the whole pair would allocate a second pair-sized tensor
            lp = z.gather(1, tg[:, None]).squeeze(1) - lse
            z.sub_(lse[:, None])  # log p, kept until the pair's gradient is known
            rows = {"logps": _pair_sums(lp, m_c), "length": fw.length[[i, half + i]]}
            lr = None
            if ref is not None:
                lr = ref_cast.logits(ref.h[idx])
                lr.sub_(_chunked_lse(lr, parts)[:, None])  # log p_ref
                rows["ref_logps"] = _pair_sums(lr.gather(1, tg[:, None]).squeeze(1), m_c)
                if use_kl:  # KL(ref || p) = sum p_ref (log p_ref - log p), a chunk at a time
                    tok_kl = torch.cat([(lr[s:e].exp() * (lr[s:e] - z[s:e])).sum(-1) for s, e in parts])
                    rows["kl"] = _pair_sums(tok_kl, m_c)
                else:
                    lr = None
            for k, out in outs.items():
                out[[i, half + i]] = rows[k]
            loss, g_rows, g_extras = _pair_grads(pair_loss, rows, use_kl, extras, i)
            total += loss
            for k, g in g_extras.items():
                extra_grads[k][i] = g
            g_lp = _per_token(g_rows["logps"], m_c, len(tg))
            g_kl = _per_token(g_rows["kl"], m_c, len(tg)) if use_kl else None
            for s, e in parts:  # temporaries of one chunk, not of the pair
                zs = z[s:e]
                dcap = 1 - ((zs + lse[s:e, None]) / head.softcap) ** 2 if head.softcap else None
                pr = lr[s:e].exp() if use_kl else None
                gz = logit_grad(zs.exp_(), tg[s:e], g_lp[s:e], None if g_kl is None else g_kl[s:e], pr, dcap, head)
                grads.add(idx[s:e], gz)
            del z, lr
    scale = 1 / max(half, 1)  # the loss is the mean of the pairs' losses
    g_h, g_w, g_b = grads.result()
    found = {"h": g_h, "weight": g_w, "bias": g_b, **extra_grads}
    for g in found.values():
        if g is not None:
            g.mul_(scale)
    return total * scale, outs, found


def _pair_grads(pair_loss: PairLoss, rows: dict, use_kl: bool, extras: dict, i: int):
    """The pair's loss, and its gradients with respect to the pair's row sums and its extras."""
    leaves = {"logps": rows["logps"].clone().requires_grad_()}
    if use_kl:
        leaves["kl"] = rows["kl"].clone().requires_grad_()
    ex = {k: e[i : i + 1].detach().clone().requires_grad_(e.requires_grad) for k, e in extras.items()}
    with torch.enable_grad():
        loss = pair_loss({**rows, **leaves}, ex)
        wrt = [*leaves.values(), *[v for v in ex.values() if v.requires_grad]]
        got = torch.autograd.grad(loss, wrt, allow_unused=True)
    got = [torch.zeros_like(w) if g is None else g for g, w in zip(got, wrt)]
    g_rows = dict(zip(leaves, got))
    g_extras = dict(zip([k for k, v in ex.items() if v.requires_grad], (g.reshape(()) for g in got[len(leaves) :])))
    return loss.detach().float(), g_rows, g_extras


def _chunked_lse(z, parts):
    return torch.cat([z[s:e].logsumexp(-1) for s, e in parts]) if parts else z.new_zeros(0)


def _pair_sums(x, m_c):
    """A pair's per-token values [m] summed over its chosen (first ``m_c``) and its rejected tokens: [2]."""
    return torch.stack([x[:m_c].sum(), x[m_c:].sum()])


def _per_token(g, m_c, m):
    """The pair's two row gradients [2] spread over its tokens [m] (chosen first)."""
    g = g.float()
    return torch.cat([g[0].expand(m_c), g[1].expand(m - m_c)])
