"""A gated MLP that keeps two of its four intermediate activations for backward.

Llama-family and Gemma MLPs compute ``down(act(gate(x)) * up(x))``. Plain autograd saves four tensors of the
intermediate width per token for backward: ``gate(x)``, ``act(gate(x))``, ``up(x)`` and their product (the
input of ``down``). Intermediate widths are 2.7-8x the hidden size, so these are most of a decoder layer's
activation memory. ``lean_mlp`` makes the product and the down projection one autograd function that keeps
only ``gate(x)`` and ``up(x)`` and recomputes ``act(gate) * up`` in backward: elementwise work, no matmul, and
the same operations as the plain path, so the same numbers (tested). Liger's SwiGLU kernel does the same on
GPUs; this is plain torch, so it also serves CPU runs.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

from .models import decoder_layers

log = logging.getLogger(__name__)


class _GatedDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, bias, act):
        y = F.linear(act(gate) * up, weight, bias)
        ctx.save_for_backward(gate, up, weight)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx, gy):
        gate, up, weight = ctx.saved_tensors
        want_gate, want_up, want_w, want_b = ctx.needs_input_grad[:4]
        with torch.enable_grad():
            g = gate.detach().requires_grad_(want_gate)
            u = up.detach().requires_grad_(want_up)
            a = ctx.act(g) * u
        gw = gb = gg = gu = None
        if want_w:
            gw = (gy.reshape(-1, gy.shape[-1]).t() @ a.detach().reshape(-1, a.shape[-1]).to(gy.dtype)).to(weight.dtype)
        if want_b:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0).to(weight.dtype)
        if want_gate or want_up:
            ga = gy @ weight.to(gy.dtype)
            wrt = [t for t, w in ((g, want_gate), (u, want_up)) if w]
            got = iter(torch.autograd.grad(a, wrt, ga.to(a.dtype)))
            gg = next(got) if want_gate else None
            gu = next(got) if want_up else None
        return gg, gu, gw, gb, None


def _plain_forward(mlp, x):
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def _lean_forward(self, x):
    down = self.down_proj
    if type(down) is not torch.nn.Linear or not torch.is_grad_enabled():  # e.g. wrapped by PEFT later; no graph
        return _plain_forward(self, x)
    return _GatedDown.apply(self.gate_proj(x), self.up_proj(x), down.weight, down.bias, self.act_fn)


def lean_mlp(model) -> int:
    """Give every gated MLP of ``model``'s decoder layers the lean backward; returns how many were changed.

    An MLP qualifies when it has ``gate_proj``/``up_proj``/``down_proj`` linears and an ``act_fn``, and its own
    forward gives the same output as ``down(act(gate(x)) * up(x))`` on a random input (checked once per MLP
    class); any other MLP keeps its forward."""
    try:
        layers = decoder_layers(model)
    except Exception:  # noqa: BLE001  (a model without the usual layout keeps its MLPs)
        return 0
    verdict: dict[type, bool] = {}
    n = 0
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, k) for k in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        if not all(isinstance(getattr(mlp, k), torch.nn.Linear) for k in ("gate_proj", "up_proj", "down_proj")):
            continue
        if type(mlp) not in verdict:
            p = mlp.gate_proj.weight
            with torch.no_grad():
                x = torch.randn(2, 3, mlp.gate_proj.in_features, dtype=p.dtype, device=p.device)
                verdict[type(mlp)] = bool(torch.allclose(mlp(x), _plain_forward(mlp, x), rtol=1e-4, atol=1e-5))
            if not verdict[type(mlp)]:
                log.info("%s: its forward is not down(act(gate(x)) * up(x)); left as it is", type(mlp).__name__)
        if verdict[type(mlp)]:
            mlp.forward = types.MethodType(_lean_forward, mlp)
            n += 1
    return n
