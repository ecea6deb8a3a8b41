"""Padding-free batches: a right-padded batch run as one row, its sequences side by side with position ids restarting
at 0, which transformers turns into a block-diagonal causal mask (and flash attention into variable-length kernels).
Whether a model gives the same outputs that way depends on its attention code, so it is checked once per model."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class Packing:
    """A right-padded batch as one row without padding (``find_packed_sequence_indices`` in transformers)."""

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
    """Whether ``model`` gives a packed row the outputs it gives the padded batch: checked once per model on two
    short sequences (right-padded vs packed), in eval mode."""
    from .head import unwrap

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
