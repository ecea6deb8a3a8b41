"""Where a training run's metrics go: ``metrics.jsonl`` (trimmed to the checkpoint's history on resume), TensorBoard
and the progress bar. Per-step metrics stay tensors until a logged step (one host sync per logged step, not one per
metric per step), are averaged over the steps since the last one and over processes."""

from __future__ import annotations

import json
import os

import torch
from tqdm.auto import tqdm


class RunLog:
    def __init__(
        self,
        out: str,
        acc,
        total: int,
        initial: int,
        desc: str,
        history: list[dict],
        resumed: bool,
        progress: bool,
        tensorboard: bool,
    ):
        self.acc, self.history = acc, history
        self.main = acc.is_main_process
        self.path = os.path.join(out, "metrics.jsonl")
        self.window: dict[str, list[torch.Tensor]] = {}
        self.writer = None
        if tensorboard and self.main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(out, "tb"))
            except ImportError:
                self.writer = None
        if self.main:
            # a killed run may have logged steps after its last checkpoint: keep only what the checkpoint saw
            with open(self.path, "w") as f:
                for rec in history if resumed else []:
                    f.write(json.dumps(rec) + "\n")
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not (progress and self.main))

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        """A micro-batch's loss and scalar metrics, kept as tensors."""
        self.window.setdefault("loss", []).append(loss.detach())
        for k, v in metrics.items():
            if v.dim() == 0:
                self.window.setdefault(k, []).append(v.detach())

    def losses(self) -> list[torch.Tensor]:
        return self.window.get("loss", [])

    def write(self, step: int, lr: float) -> dict:
        """The record of a logged step: each metric's mean since the last one, averaged over processes."""
        rec = {"step": step, "lr": lr, **{k: torch.stack(v).float().mean().item() for k, v in self.window.items()}}
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec.get('rewards/accuracies', float('nan')):.2f}")
        device = self.acc.device
        rec = {
            k: self.acc.reduce(torch.tensor(v, device=device), "mean").item()
            if isinstance(v, float) and k != "lr"
            else v
            for k, v in rec.items()
        }
        self.window = {}
        self.history.append(rec)
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.writer is not None:
                for k, v in rec.items():
                    if k != "step":
                        self.writer.add_scalar(k, v, step)
        return rec

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
