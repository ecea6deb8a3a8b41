"""AdamW stepped inside backward, one parameter at a time, so that the gradients of the whole model never exist at
once (torchtune's optimizer-in-backward). Where the embedding is most of the model, as in Gemma 3 270M whose 262k x
640 embedding holds 168M of its 268M weights, that saves a model-sized buffer at the peak.

Each parameter has its own AdamW, stepped by a post-accumulate-grad hook as soon as its gradient is complete; the
gradient is then freed. The outer object is an ordinary ``torch.optim.Optimizer`` whose one param group carries the
learning rate a scheduler sets; ``step`` and ``zero_grad`` have nothing left to do. The price: no gradient-norm clip
(it needs every gradient at once) and no gradient accumulation (a parameter would be stepped per micro-batch).
"""

from __future__ import annotations

import torch


class BackwardAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float, weight_decay: float = 0.0):
        params = list(params)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.inner = {p: torch.optim.AdamW([p], lr=lr, weight_decay=weight_decay, foreach=False) for p in params}
        self.handles = [p.register_post_accumulate_grad_hook(self._step_one) for p in params]

    @torch.no_grad()
    def _step_one(self, p: torch.Tensor) -> None:
        opt = self.inner[p]
        opt.param_groups[0]["lr"] = self.param_groups[0]["lr"]
        opt.step()
        p.grad = None

    def step(self, closure=None):  # every parameter was stepped in backward
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # every gradient was freed in backward
        return None

    def state_dict(self) -> dict:
        return {"lr": self.param_groups[0]["lr"], "inner": [o.state_dict() for o in self.inner.values()]}

    def load_state_dict(self, state: dict) -> None:
        self.param_groups[0]["lr"] = state["lr"]
        for opt, s in zip(self.inner.values(), state["inner"]):
            opt.load_state_dict(s)

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
