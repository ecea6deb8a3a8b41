"""Per-token log-probs, TDPO's per-position KL and predictive entropy, a chunk of positions at a time.

Full-vocabulary logits are the largest tensors of a preference step: 8 rows x 512 tokens x a 256k
vocabulary is 4 GiB in float32, held three times over (logits, log-softmax, their gradient). Here they exist
for one chunk of positions at a time. The forward pass keeps only per-token results; the backward pass
recomputes each chunk's logits from the last hidden state and the LM head (the idea of Liger's fused linear
cross-entropy and of Cut Cross-Entropy, in plain torch so it runs on CPU). Only the positions that predict a
response token are projected onto the vocabulary at all: prompt and padding logits are never computed.

The hidden state comes from a hook on the model's decoder while the model's own forward runs with
``logits_to_keep=1`` (so DDP and PEFT wrappers see an ordinary call); the head is ``get_output_embeddings()``
with Gemma-2's final soft-capping and Cohere/Granite logit scales applied. The first call on a model checks
the head against the model's own last-position logits and falls back to full logits if they disagree.

``token_logps``/``response_logps``/``sequential_kl`` are the plain (full-logits) versions, kept as the oracle
of the tests and for callers that already hold logits.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 2**25  # logits per chunk: 128 MiB of float32, 131 positions of a 256k vocabulary
FUSED_ELEMENTS = 2**28  # the most logits of one pair that `Forward.fused_loss` holds at once (1 GiB of float32)


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


# ---------------------------------------------------------------------------------------------- the head
@dataclass
class Head:
    """The LM head as a function of the last hidden state: cap * tanh(scale * (h W^T + b) / cap)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    dtype: torch.dtype = torch.float32  # the matmul's dtype (the autocast dtype under mixed precision)

    def detached(self) -> Head:
        """The same head outside autograd (a reference's head: no gradient reaches it)."""
        return Head(
            self.weight.detach(),
            None if self.bias is None else self.bias.detach(),
            self.scale,
            self.softcap,
            self.dtype,
        )

    def cast_weight(self) -> torch.Tensor:
        """The weight in the matmul dtype, cast once per head (not once per chunk)."""
        if getattr(self, "_cast", None) is None:
            self._cast = self.weight.detach().to(self.dtype)
        return self._cast

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the rows of ``h`` [n, H] -> [n, V]."""
        b = None if self.bias is None else self.bias.detach().to(self.dtype)
        z = F.linear(h.to(self.dtype), self.cast_weight(), b).float()
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z


def unwrap(model):
    """The causal LM inside DDP / torch.compile / PEFT wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def output_head(model, dtype: torch.dtype | None = None) -> Head:
    lm = unwrap(model)
    out = lm.get_output_embeddings()
    cfg = getattr(lm.config, "text_config", None) or lm.config
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)  # Cohere multiplies
    if getattr(cfg, "logits_scaling", None):  # Granite divides
        scale /= float(cfg.logits_scaling)
    return Head(
        out.weight,
        getattr(out, "bias", None),
        scale,
        getattr(cfg, "final_logit_softcapping", None),
        dtype or out.weight.dtype,
    )


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _chunked_ok(model) -> bool:
    # FSDP shards the head's weight outside its forward; checked first, since the model may have been
    # marked chunkable before it was wrapped (the offline cache is built from the unwrapped policy)
    if type(model).__name__.startswith(("FullyShardedDataParallel", "FSDP")) or hasattr(model, "_fsdp_wrapped_module"):
        return False
    lm = unwrap(model)
    ok = getattr(lm, "_featalign_chunked", None)
    if ok is None:
        try:
            ok = "logits_to_keep" in inspect.signature(lm.forward).parameters and lm.get_output_embeddings() is not None
            lm.get_decoder()
        except (AttributeError, NotImplementedError):
            ok = False
    return ok


def hidden_states(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, packed: Packing | None = None
) -> tuple[torch.Tensor, Head] | None:
    """(last hidden state [N, T, H], head) from one forward pass that projects only the last position;
    None for a model this module cannot split into decoder + head (the caller then uses full logits).
    With ``packed``, the batch runs as one row without padding and the hidden state is [1, M, H]."""
    if not _chunked_ok(model):
        return None
    lm = unwrap(model)
    box = {}
    handle = lm.get_decoder().register_forward_hook(lambda _m, _i, out: box.__setitem__("h", out[0]))
    try:
        if packed is not None:
            out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False, logits_to_keep=1)
        else:
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    h = box["h"]
    head = output_head(model, _autocast_dtype(h.device))
    if getattr(lm, "_featalign_chunked", None) is None:
        with torch.no_grad():  # once per model: does our head reproduce the model's own logits?
            mine, theirs = head.logits(h[:, -1]), out.logits[:, -1].float()
            tol = 1e-3 if head.dtype == torch.float32 else 5e-2
            ok = bool(torch.allclose(mine, theirs, rtol=tol, atol=tol * max(1.0, theirs.abs().max().item())))
        lm._featalign_chunked = ok
        if not ok:
            log.warning("%s: the LM head does not reproduce the model's logits; using full logits", type(lm).__name__)
            return None
    return h, head


# ---------------------------------------------------------------------------------------------- packing
@dataclass
class Packing:
    """A right-padded batch as one row without padding: sequences side by side, position ids restarting at 0
    at each, which transformers turns into a block-diagonal causal mask (``find_packed_sequence_indices``)."""

    input_ids: torch.Tensor  # [1, M]
    position_ids: torch.Tensor  # [1, M]
    keep: torch.Tensor  # [N, T] bool: the real tokens of the padded batch
    flat: torch.Tensor  # [N * T]: a padded position's index in the packed row (where kept)

    @classmethod
    def of(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Packing:
        keep = attention_mask.bool()
        n, t = input_ids.shape
        pos = torch.arange(t, device=input_ids.device).expand(n, t)
        flat = keep.reshape(-1).long().cumsum(0) - 1
        return cls(input_ids[keep][None], pos[keep][None], keep, flat)

    def index(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return self.flat[rows * self.keep.shape[1] + cols]

    def unpack(self, h: torch.Tensor) -> torch.Tensor:
        """[1, M, H] -> [N, T, H], zeros at padding (the layout the SAE's pooling reads)."""
        out = h.new_zeros(*self.keep.shape, h.shape[-1])
        return out.index_put((self.keep,), h[0])


def packing_ok(model) -> bool:
    """Whether ``model`` gives a packed row the hidden states it gives the padded batch: checked once per model
    on two short sequences (right-padded vs packed), since it depends on the model's attention code."""
    lm = unwrap(model)
    ok = getattr(lm, "_featalign_pack_ok", None)
    if ok is not None:
        return ok
    p = next(lm.parameters())
    vocab = lm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0)).to(p.device)
    att = torch.ones_like(ids)
    att[1, 7:] = 0
    pk = Packing.of(ids, att)
    training = lm.training
    try:
        lm.eval()  # no dropout: the two passes must be comparable
        with torch.no_grad():
            a = lm(input_ids=ids, attention_mask=att, use_cache=False).logits[att.bool()].float()
            b = lm(input_ids=pk.input_ids, position_ids=pk.position_ids, use_cache=False).logits[0].float()
        tol = 1e-4 if p.dtype == torch.float32 else 5e-2
        ok = bool(torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, a.abs().max().item())))
    except Exception as e:  # noqa: BLE001  (a model that refuses position ids is a model that cannot pack)
        log.info("%s: packing check failed: %s", type(lm).__name__, e)
        ok = False
    finally:
        lm.train(training)
    if not ok:
        log.warning("%s: a packed row does not give the padded batch's outputs; batches stay padded", type(lm).__name__)
    lm._featalign_pack_ok = ok
    return ok


# ---------------------------------------------------------------------------------------------- chunked core
def chunk_size(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def _forward(h, head: Head, targets, ref_h=None, ref_head: Head | None = None, chunk: int = 0):
    """Per-token log p(target), and with a reference KL(p_ref || p) and log p_ref(target); plus logsumexps."""
    n = h.shape[0]
    chunk = chunk or chunk_size(head.weight.shape[0])
    lp, lse = h.new_empty(n, dtype=torch.float32), h.new_empty(n, dtype=torch.float32)
    kl = ref_lp = ref_lse = None
    if ref_h is not None:
        kl, ref_lp, ref_lse = (h.new_empty(n, dtype=torch.float32) for _ in range(3))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
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


class _ChunkedHead(torch.autograd.Function):
    """Per-token log-probs (and KL to a fixed reference) through the LM head, recomputing logits in backward."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ref_h, head: Head, ref_head: Head | None, chunk: int):
        with torch.autocast(h.device.type, enabled=False):
            lp, kl, ref_lp, lse, ref_lse = _forward(h, head, targets, ref_h, ref_head, chunk)
        ctx.save_for_backward(h, targets, lse, ref_h, ref_lse)
        head._cast = None  # a cast copy of the weight is not kept between forward and backward
        if ref_head is not None:
            ref_head._cast = None
        ctx.head, ctx.ref_head, ctx.chunk = head, ref_head, chunk or chunk_size(head.weight.shape[0])
        if kl is None:
            kl, ref_lp = lp.new_zeros(0), lp.new_zeros(0)
        ctx.mark_non_differentiable(ref_lp)
        return lp, kl, ref_lp

    @staticmethod
    def backward(ctx, g_lp, g_kl, _g_ref):
        h, targets, lse, ref_h, ref_lse = ctx.saved_tensors
        head, ref_head, chunk = ctx.head, ctx.ref_head, ctx.chunk
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grads = _Grads(h, head, want_h, want_w, want_b)
        use_kl = ref_h is not None and g_kl is not None
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float()
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                e = min(h.shape[0], s + chunk)
                z = head.logits(h[s:e])
                dcap = 1 - (z / head.softcap) ** 2 if head.softcap else None
                p = z.sub_(lse[s:e, None]).exp_()
                pr = ref_head.logits(ref_h[s:e]).sub_(ref_lse[s:e, None]).exp_() if use_kl else None
                gz = _logit_grad(p, targets[s:e], g_lp[s:e], g_kl[s:e].float() if use_kl else None, pr, dcap, head)
                grads.add(slice(s, e), gz)
        return (*grads.result(), None, None, None, None, None)


def _spans(n: int, chunk: int):
    return [(s, min(n, s + chunk)) for s in range(0, n, chunk)]


def _chunked_lse(z, spans):
    return torch.cat([z[s:e].logsumexp(-1) for s, e in spans]) if spans else z.new_zeros(0)


def _logit_grad(p, targets, g_lp, g_kl, pr, dcap, head: Head):
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


class _Grads:
    """Gradients of the head's input rows, weight and bias, accumulated a chunk of logit gradients at a time."""

    def __init__(self, h, head: Head, want_h, want_w, want_b):
        self.h, self.head, self.w = h, head, head.cast_weight()
        self.h_ = torch.zeros_like(h) if want_h else None
        self.w_ = torch.zeros(head.weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        self.b_ = torch.zeros(head.weight.shape[0], dtype=torch.float32, device=h.device) if want_b else None

    def add(self, idx, gz):
        head = self.head
        gzc = gz.to(head.dtype)
        if self.h_ is not None:
            self.h_[idx] = gzc @ self.w
        if self.w_ is not None:
            hs = self.h[idx]
            if head.dtype == torch.float32:
                self.w_.addmm_(gzc.t(), hs.float())
            else:
                self.w_.add_(gzc.t() @ hs.to(head.dtype))
        if self.b_ is not None:
            self.b_.add_(gz.sum(0))

    def result(self):
        head = self.head
        return (
            self.h_,
            None if self.w_ is None else self.w_.to(head.weight.dtype),
            None if self.b_ is None else self.b_.to(head.bias.dtype),
        )


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
        lp, kl, ref_lp, _, _ = _forward(h, head, targets, ref_h, ref_head, chunk)
    return lp, kl, ref_lp


# ---------------------------------------------------------------------------------------------- batches
def response_positions(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of every hidden state that predicts a response token (position t predicts token t+1).

    Computed on the CPU copy of the mask before the batch moves to the GPU, it costs no device sync."""
    rows, cols = response_mask[:, 1:].nonzero(as_tuple=True)
    return rows, cols


def _gather(h, rows, cols):
    return h[rows.to(h.device), cols.to(h.device)]


class Forward:
    """One forward pass of the policy (and of a live reference) over a batch, before anything touches the LM head.

    ``terms()`` gives per-row sums (the plain autograd path, any loss); ``fused_loss()`` gives a preference loss
    whose head gradients are computed during the forward (no recomputed head matmul). Made by ``forward``."""

    def __init__(
        self,
        n,
        length,
        h=None,
        head=None,
        targets=None,
        rows=None,
        row_counts=None,
        ref_h=None,
        ref_head=None,
        with_ref=False,
        kl=False,
        chunk=0,
        terms=None,
    ):
        self.n, self.length, self.h, self.head, self.targets, self.rows = n, length, h, head, targets, rows
        self.row_counts, self.ref_h, self.ref_head, self.with_ref, self.kl, self.chunk = (
            row_counts,
            ref_h,
            ref_head,
            with_ref,
            kl,
            chunk,
        )
        self._terms = terms  # set when the model could not be split: computed from full logits already
        self.packing: Packing | None = None  # set by ``forward`` when the batch ran as one packed row

    def terms(self) -> dict[str, torch.Tensor]:
        if self._terms is not None:
            return self._terms
        out, n, rows = {"length": self.length}, self.n, self.rows
        if self.with_ref and self.kl:
            lp, tok_kl, ref_lp = chunked_token_terms(
                self.h, self.head, self.targets, self.ref_h, self.ref_head, self.chunk
            )
            out["kl"] = _row_sum(tok_kl, rows, n)
        else:
            lp, _, _ = chunked_token_terms(self.h, self.head, self.targets, chunk=self.chunk)
            if self.with_ref:  # reference log-probs alone need no graph
                with torch.no_grad():
                    ref_lp, _, _ = chunked_token_terms(self.ref_h, self.ref_head, self.targets, chunk=self.chunk)
        out["logps"] = _row_sum(lp, rows, n)
        if self.with_ref:
            out["ref_logps"] = _row_sum(ref_lp.detach(), rows, n)
        return out

    def can_fuse(self, budget: int | None = None) -> bool:
        """Whether ``fused_loss`` applies: a split model, a graph to build, pairs (rows i and n/2 + i) whose
        logits fit ``budget`` elements (``FUSED_ELEMENTS``; doubled need with a live reference)."""
        if self._terms is not None or self.n % 2 or not torch.is_grad_enabled():
            return False
        if not (self.h.requires_grad or self.head.weight.requires_grad):
            return False
        half = self.n // 2
        largest = int((self.row_counts[:half] + self.row_counts[half:]).max()) if half else 0
        return largest * self.head.weight.shape[0] * (2 if self.with_ref else 1) <= (budget or FUSED_ELEMENTS)

    def fused_loss(self, pair_loss, extras: dict[str, torch.Tensor]):
        """``mean_i pair_loss(rows_i, extras_i)`` over the batch's pairs, and the per-row terms (detached).

        ``pair_loss(rows, extras)`` gets ``rows`` = {"logps", "length", and with a reference "ref_logps" (and
        "kl")} of the pair's two rows (chosen, rejected; shape [2]) and each ``extras`` tensor [P] cut to the
        pair ([1]); it returns the pair's loss. Every method of ``losses`` is such a mean over pairs. Each
        pair's logits are computed once: the pair's loss is differentiated with respect to its row sums right
        away, so the head's gradients are known before the logits are dropped (what the plain path gets by
        recomputing every chunk's logits in backward: one vocabulary-sized matmul per token fewer)."""
        keys = [k for k, v in extras.items() if torch.is_tensor(v)]
        out = _FusedPairLoss.apply(
            self.h, self.head.weight, self.head.bias, self, pair_loss, keys, *[extras[k] for k in keys]
        )
        return out[0], {"length": self.length, **dict(zip(self.row_names(), out[1:]))}

    def row_names(self) -> list[str]:
        """The per-row terms besides ``length``: log-probs, and with a reference its log-probs (and the KL)."""
        return ["logps"] + (["ref_logps"] if self.with_ref else []) + (["kl"] if self.with_ref and self.kl else [])


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
    if pack and all(_chunked_ok(m) and packing_ok(m) for m in ([model] if ref is None else [model, ref])):
        packing = Packing.of(input_ids, attention_mask)
    pol = hidden_states(model, input_ids, attention_mask, packing)
    ref_split = None
    if with_ref and pol is not None:
        with torch.no_grad(), _reference(model, ref, ref_adapter_off) as rm:
            ref_split = hidden_states(rm, input_ids, attention_mask, packing)
    if pol is None or (with_ref and ref_split is None):  # a model this module cannot split: full logits
        out = {"length": length}
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        out["logps"], _ = response_logps(logits, input_ids, response_mask)
        if with_ref:
            with torch.no_grad(), _reference(model, ref, ref_adapter_off) as rm:
                ref_logits = rm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            out["ref_logps"], _ = response_logps(ref_logits, input_ids, response_mask)
            if kl:
                out["kl"] = sequential_kl(logits, ref_logits, response_mask)
        fw = Forward(n, length, terms=out)
        fw.packing = packing  # a hook may have captured the packed pass before the head check failed
        return fw
    h, head = pol
    if packing is not None:  # the packed row: position (row, col) of the padded batch is packed index flat[...]
        at = packing.index(rows, cols)
        sel, ref_sel = h[0, at], None if ref_split is None else ref_split[0][0, at]
    else:
        sel, ref_sel = _gather(h, rows, cols), None if ref_split is None else _gather(ref_split[0], rows, cols)
    fw = Forward(
        n,
        length,
        sel,
        head,
        input_ids[:, 1:][rows, cols],
        rows,
        torch.bincount(rows_cpu, minlength=n),
        ref_sel,
        None if ref_split is None else ref_split[1],
        with_ref,
        kl,
        chunk,
    )
    fw.packing = packing
    return fw


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


class _FusedPairLoss(torch.autograd.Function):
    """A mean-over-pairs loss through the LM head, one pair's logits at a time, with the head's gradients
    computed in forward (scaled by the incoming gradient in backward)."""

    @staticmethod
    def forward(ctx, h, weight, bias, fw: Forward, pair_loss, keys, *extras):
        head, n, half = fw.head, fw.n, fw.n // 2
        ref = fw.ref_h is not None
        use_kl = ref and fw.kl
        ref_head = fw.ref_head.detached() if ref else None
        grads = _Grads(h.detach(), head, *ctx.needs_input_grad[:3])
        chunk = fw.chunk or chunk_size(head.weight.shape[0])
        offsets = [0, *torch.cumsum(fw.row_counts, 0).tolist()]
        outs = {k: torch.zeros(n, dtype=torch.float32, device=h.device) for k in fw.row_names()}
        extra_grads = [torch.zeros_like(e, dtype=torch.float32) if e.requires_grad else None for e in extras]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for i in range(half):
                (a, b), (c, d) = (offsets[i], offsets[i + 1]), (offsets[half + i], offsets[half + i + 1])
                idx = torch.cat([torch.arange(a, b), torch.arange(c, d)]).to(h.device)
                m_c = b - a
                tg = fw.targets[idx]
                z = head.logits(h[idx].detach())
                spans = _spans(len(tg), chunk)
                lse = _chunked_lse(z, spans)  # logsumexp of the whole pair would allocate a second pair-sized tensor
                lp = z.gather(1, tg[:, None]).squeeze(1) - lse
                z.sub_(lse[:, None])  # log p, kept until the pair's gradient is known
                rows = {"logps": _pair_sums(lp, m_c), "length": fw.length[[i, half + i]]}
                lr = None
                if ref:
                    lr = ref_head.logits(fw.ref_h[idx])
                    lr.sub_(_chunked_lse(lr, spans)[:, None])  # log p_ref
                    ref_lp = lr.gather(1, tg[:, None]).squeeze(1)
                    rows["ref_logps"] = _pair_sums(ref_lp, m_c)
                    if use_kl:  # KL(ref || p) = sum p_ref (log p_ref - log p), a chunk at a time
                        tok_kl = torch.cat([(lr[s:e].exp() * (lr[s:e] - z[s:e])).sum(-1) for s, e in spans])
                        rows["kl"] = _pair_sums(tok_kl, m_c)
                    else:
                        lr = None
                for k, out in outs.items():
                    out[[i, half + i]] = rows[k]
                # the pair's loss and its gradient with respect to the pair's row sums (and extras)
                leaves = {"logps": rows["logps"].clone().requires_grad_()}
                if use_kl:
                    leaves["kl"] = rows["kl"].clone().requires_grad_()
                ex = {k: e[i : i + 1].detach().clone().requires_grad_(e.requires_grad) for k, e in zip(keys, extras)}
                with torch.enable_grad():
                    loss = pair_loss({**rows, **leaves}, ex)
                    wrt = [*leaves.values(), *[v for v in ex.values() if v.requires_grad]]
                    got = torch.autograd.grad(loss, wrt, allow_unused=True)
                total += loss.detach().float()
                got = [torch.zeros_like(w) if g is None else g for g, w in zip(got, wrt)]
                g_lp = _per_token(got[0], m_c, len(tg))
                g_kl = _per_token(got[1], m_c, len(tg)) if use_kl else None
                j = len(leaves)
                for eg in extra_grads:
                    if eg is not None:
                        eg[i] = got[j].reshape(())
                        j += 1
                for s, e in spans:  # temporaries of one chunk, not of the pair
                    zs = z[s:e]
                    dcap = 1 - ((zs + lse[s:e, None]) / head.softcap) ** 2 if head.softcap else None
                    pr = lr[s:e].exp() if use_kl else None
                    gz = _logit_grad(zs.exp_(), tg[s:e], g_lp[s:e], None if g_kl is None else g_kl[s:e], pr, dcap, head)
                    grads.add(idx[s:e], gz)
                del z, lr
        head._cast = None
        ctx.grads, ctx.half = (*grads.result(), *extra_grads), max(half, 1)
        ctx.mark_non_differentiable(*outs.values())
        return (total / max(half, 1), *outs.values())

    @staticmethod
    def backward(ctx, g_loss, *_):
        grads, ctx.grads = ctx.grads, None
        g = g_loss / ctx.half  # the loss is the mean of the pairs' losses
        for x in grads:  # in place: a second [vocabulary x hidden] buffer would double the head's gradient memory
            if x is not None:
                x.mul_(g.to(x.dtype))
        return (*grads[:3], None, None, None, *grads[3:])


def _pair_sums(x, m_c):
    """A pair's per-token values [m] summed over its chosen (first ``m_c``) and its rejected tokens: [2]."""
    return torch.stack([x[:m_c].sum(), x[m_c:].sum()])


def _per_token(g, m_c, m):
    """The pair's two row gradients [2] spread over its tokens [m] (chosen first)."""
    g = g.float()
    return torch.cat([g[0].expand(m_c), g[1].expand(m - m_c)])


def _row_sum(x, rows, n):
    return x.new_zeros(n).index_add(0, rows, x)


class _reference:
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
    h, head = pol
    h = _gather(h, rows, cols)
    targets = input_ids[:, 1:][rows, cols]
    chunk = chunk or chunk_size(head.weight.shape[0])
    with torch.autocast(h.device.type, enabled=False):
        for s in range(0, h.shape[0], chunk):
            e = min(h.shape[0], s + chunk)
            logp = head.logits(h[s:e]).log_softmax(-1)
            lp_out[rows[s:e], cols[s:e]] = logp.gather(1, targets[s:e, None]).squeeze(1)
            ent_out[rows[s:e], cols[s:e]] = -(logp.exp() * logp).sum(-1)
    return lp_out, ent_out
