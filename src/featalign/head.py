"""The LM head as a function of the decoder's last hidden state, and the forward pass that gives that state.

featalign projects only the positions it needs onto the vocabulary, a chunk at a time (``logprobs``), so it needs
the model split into decoder + head: the hidden state comes from a hook on the decoder while the model's own
forward runs with ``logits_to_keep=1`` (DDP and PEFT wrappers see an ordinary call), and the head is
``get_output_embeddings()`` with Gemma-2's final soft-capping and Cohere/Granite logit scales applied. The first
call on a model checks the head against the model's own last-position logits; a model that fails, or cannot be
split, gets full logits instead.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packing import Packing

log = logging.getLogger(__name__)


@dataclass
class Head:
    """The LM head: logits = cap * tanh(scale * (h W^T + b) / cap), computed in ``dtype`` (the autocast dtype under
    mixed precision), returned in float32. Loops call ``cast()`` once, so the weight is not cast per chunk."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    dtype: torch.dtype = torch.float32

    def detached(self) -> Head:
        """The same head outside autograd (a reference's head: no gradient reaches it)."""
        bias = None if self.bias is None else self.bias.detach()
        return Head(self.weight.detach(), bias, self.scale, self.softcap, self.dtype)

    def cast(self) -> Head:
        """The head with its weight and bias already in the matmul dtype, outside autograd: the copy a loop over
        chunks uses, dropped when the loop's caller returns."""
        bias = None if self.bias is None else self.bias.detach().to(self.dtype)
        return Head(self.weight.detach().to(self.dtype), bias, self.scale, self.softcap, self.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the rows of ``h`` [n, H] -> [n, V]."""
        b = None if self.bias is None else self.bias.detach().to(self.dtype)
        z = F.linear(h.to(self.dtype), self.weight.detach().to(self.dtype), b).float()
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
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return Head(out.weight, getattr(out, "bias", None), scale, softcap, dtype or out.weight.dtype)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def splittable(model) -> bool:
    """Whether ``model`` can be run as decoder + head (``hidden_states``): not under FSDP, which shards the head's
    weight outside its forward (checked first: the model may have been marked splittable before it was wrapped), a
    forward that takes ``logits_to_keep``, and a head whose logits were checked equal to the model's own."""
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
    None for a model that cannot be split into decoder + head (the caller then uses full logits).
    With ``packed``, the batch runs as one row without padding and the hidden state is [1, M, H]."""
    if not splittable(model):
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
    head = output_head(model, autocast_dtype(h.device))
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
