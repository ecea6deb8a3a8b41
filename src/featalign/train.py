"""`featalign train`: its settings (``TrainConfig``) and its entry point. The loop is ``trainer.Trainer``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from . import data as D
from .config import check_model_path, setting
from .errors import ConfigError
from .losses import METHODS

METHOD = Literal[tuple(METHODS)]


@dataclass
class TrainConfig(D.DataOptions):
    """`featalign train`. Loss settings left unset take the method's published default (``losses.METHODS``)."""

    method: METHOD = setting("fpo", "preference method (formulas and papers: the docs' Methods page)")
    model: str = setting(
        "", "policy to train, and the reference unless ref_model is set: HF folder, hub id or .gguf file"
    )
    out: str = setting(
        "runs/train", "run folder: checkpoint/, final/ (a save_pretrained model), metrics.jsonl, summary.json"
    )
    ref_model: str | None = setting(None, "reference model (default: the policy's starting point, --model)")
    sae: str | None = setting(
        None, "SAE for FPO's feature term: SAELens, sparsify or Gemma Scope folder, or params.npz"
    )
    layer: int | None = setting(None, "decoder layer the SAE reads (default: the layer the SAE records)")
    cache: str | None = setting(
        None, "offline reference cache from `featalign cache` (default: built in <out>/ref_cache)"
    )
    beta: float | None = setting(None, "KL strength beta (default: the method's, 0.1; SimPO 2.0)", gt=0)
    alpha: float | None = setting(None, "weight of TDPO-2's KL term or FPO's feature term (default 0.5)", ge=0)
    gamma: float | None = setting(None, "SimPO's target reward margin gamma (default 0.5)", ge=0)
    k: int = setting(50, "FPO: top SAE features compared per response (the paper's k)", ge=1)
    topk_from: Literal["union", "policy"] = setting(
        "union", "FPO: features compared, the top-k of policy and reference (paper) or of the policy"
    )
    fpo_variant: Literal["paper", "released"] = setting(
        "paper", "FPO as the paper writes it, or as its released code computes D (the docs' Methods page lists how)"
    )
    ablate_features: str = setting(
        "", "features to project out of the SAE layer's output in training: indices (3,17) or a features file"
    )
    preserve_features: str = setting("", "features held near the reference's activations (an MSE, from the cache)")
    preserve_weight: float = setting(1.0, "weight of the preserved features' MSE", ge=0)
    suppress_features: str = setting("", "features whose pooled activation is penalised")
    suppress_weight: float = setting(1.0, "weight of the suppressed features' penalty", ge=0)
    trdpo_alpha: float = setting(
        0.6, "TR-DPO: weight of the policy when the reference is updated (1: hard copy)", gt=0, le=1
    )
    trdpo_tau: int = setting(512, "TR-DPO: update the reference every tau steps", ge=1)
    lr: float = setting(5e-6, "peak learning rate (AdamW, linear warm-up, then cosine decay)", gt=0)
    batch_size: int = setting(8, "pairs per micro-batch per process", ge=1)
    grad_accum: int = setting(1, "micro-batches per optimiser step", ge=1)
    epochs: float = setting(1.0, "passes over the data (ignored when max_steps is set)", gt=0)
    max_steps: int = setting(-1, "optimiser steps (-1: from epochs)", ge=-1)
    warmup_ratio: float = setting(0.1, "share of the steps spent warming the learning rate up", ge=0, lt=1)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = setting(1.0, "gradient-norm clip (0: off; not applied with optim_in_backward)", ge=0)
    optim_in_backward: bool = setting(
        False, "step AdamW per weight inside backward: gradients never all exist at once (no clip, one process)"
    )
    seed: int = setting(0, "seed of the data order and of any sampling")
    group_by_length: bool = setting(
        True, "batch pairs of similar length together, in a seeded order (less padding, exact resume)"
    )
    bf16: bool = setting(True, "bf16 autocast on GPUs that support it (CPU runs stay float32)")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward to save memory")
    pack: Literal["auto", "on", "off"] = setting(
        "auto", "padding-free batches, one row per micro-batch (auto: on with flash attention only)"
    )
    fused_head: bool = setting(
        True, "compute each pair's logits once, with the LM head's gradients (off: recompute them in backward)"
    )
    lean_mlp: bool = setting(
        True, "gated MLPs keep 2 of their 4 activations for backward and recompute the rest (same results)"
    )
    lora_r: int = setting(0, "LoRA rank (0: train all weights); the saved model has the adapter merged", ge=0)
    lora_alpha: int = setting(16, "LoRA alpha", ge=1)
    log_every: int = setting(10, "log metrics every N steps", ge=1)
    save_every: int = setting(0, "checkpoint every N steps (0: only the final model)", ge=0)
    resume: bool = setting(True, "resume from <out>/checkpoint when it exists")
    progress: bool = setting(True, "show a progress bar")
    tensorboard: bool = setting(True, "also log to TensorBoard (<out>/tb)")

    def validate(self) -> None:
        super().validate()
        if not self.model or not self.data:
            raise ConfigError("train needs both model and data (--model, --data)")
        check_model_path(self.model)
        check_model_path(self.ref_model or "", "ref_model")
        if self.max_steps == 0:
            raise ConfigError("max_steps: must be -1 (from epochs) or at least 1, got 0")
        if METHODS[self.method].features and self.sae is None:
            raise ConfigError("FPO needs an SAE (--sae, and --layer if the SAE does not record its layer)")
        if self.wants_controls() and self.sae is None:
            raise ConfigError(
                "feature controls name SAE features: give the SAE (--sae, and --layer if it does not record it)"
            )
        if self.wants_controls() and self.fpo_variant == "released":
            raise ConfigError(
                "feature controls read the chosen layer, the released FPO variant the final norm: use one"
            )

        if self.optim_in_backward and self.grad_accum > 1:
            raise ConfigError("optim_in_backward steps each weight once per backward: it cannot accumulate grad_accum")

    def wants_controls(self) -> bool:
        return bool(self.ablate_features or self.preserve_features or self.suppress_features)


def run_train(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; returns the run's summary (also written to ``<out>/summary.json``)."""
    from .trainer import Trainer

    return Trainer(cfg).train()
