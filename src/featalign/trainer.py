"""The preference-training loop: one `accelerate` loop for every method in `losses.METHODS` (settings:
`train.TrainConfig`).

Why an `accelerate` loop rather than a `transformers.Trainer` subclass: FPO's point is what is *not* in
memory (no reference model), TDPO needs the reference's full distributions, TR-DPO mutates the reference
between steps, and exact resume needs control over data order. A 300-line loop states all of that
plainly; `accelerate` still gives DDP/FSDP/DeepSpeed, mixed precision and gradient accumulation.

Reference handling per method:
- dpo, ipo, dpo_ln, fpo: the reference enters only through an offline cache (built first from the
  reference model if ``cache`` is not given, then the reference is freed); FPO's cache adds top-k pooled
  SAE activations.
- simpo: no reference at all.
- tdpo1, tdpo2, trdpo: a live reference model (full next-token distributions; in-training updates); with
  LoRA, the policy itself with its adapter disabled (no second model).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time

import torch

from . import data as D
from . import logprobs as L
from .atomic import write_json
from .checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint, save_final
from .controls import Controls, ablation, ablation_basis
from .data.batching import epoch_batches, micro_batches, pair_length
from .distributed import check_fsdp_on_cpu, deepspeed_batch_size, env_true, fsdp_on_cpu
from .errors import ConfigError, TrainingDivergedError
from .feature_terms import capture, fpo_discrepancy
from .fused import can_fuse, fused_loss
from .head import splittable
from .logprobs import response_positions
from .losses import METHODS, compute_loss
from .mlp import lean_mlp
from .models import load_model, load_tokenizer
from .optim import BackwardAdamW
from .packing import packing_ok
from .reference import update_reference
from .runlog import RunLog
from .train import TrainConfig


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def pair_terms(r: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-row terms (chosen rows first, then rejected) as the losses' per-pair arguments."""
    n = r["logps"].shape[0] // 2
    t = {
        "policy_chosen_logps": r["logps"][:n],
        "policy_rejected_logps": r["logps"][n:],
        "chosen_len": r["length"][:n],
        "rejected_len": r["length"][n:],
    }
    if "ref_logps" in r:
        t.update(ref_chosen_logps=r["ref_logps"][:n], ref_rejected_logps=r["ref_logps"][n:])
    if "kl" in r:
        t.update(kl_chosen=r["kl"][:n], kl_rejected=r["kl"][n:])
    return t


class Trainer:
    """One training run: ``Trainer(cfg).train()``. The parts a test or a benchmark drives one at a time are methods:
    ``loss`` of a batch, ``save_checkpoint`` / ``load_checkpoint``, ``save_final``."""

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.spec = METHODS[cfg.method]
        self.acc = self._accelerator()
        self.device = self.acc.device
        os.makedirs(cfg.out, exist_ok=True)
        self.tokenizer = load_tokenizer(cfg.model)
        _, self.pairs, self.stats = D.prepare_pairs(cfg, self.tokenizer)
        self.lengths = [pair_length(p) for p in self.pairs]
        self.model = load_model(cfg.model)
        self._sae_and_reference()
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if cfg.lean_mlp:
            lean_mlp(self.model)
        if cfg.lora_r:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:
                raise ConfigError("lora_r needs the `peft` package (pip install 'featalign[lora]')") from None
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear")
            self.model = get_peft_model(self.model, lora)
        # padding-free rows where asked and where the model gives the padded batch's outputs that way (checked here,
        # once: the check's own forward pass must not run inside a layer capture); sharded runs take full logits
        attn = str(getattr(self.model.config, "_attn_implementation", "") or "")
        want = cfg.pack == "on" or (cfg.pack == "auto" and attn.startswith("flash_attention"))
        models = [self.model] + ([self.ref_model] if self.ref_model is not None else [])
        self.packed = bool(want and not self.sharded and splittable(self.model) and all(map(packing_ok, models)))
        per_step = cfg.batch_size * cfg.grad_accum * self.acc.num_processes
        self.steps_per_epoch = max(1, len(self.pairs) // per_step)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, int(cfg.epochs * self.steps_per_epoch))
        self._optimizer()
        self.step = 0
        self.history: list[dict] = []

    def _accelerator(self):
        """The accelerator, with the launcher's FSDP request honoured on CPU processes, and the combinations that
        sharded training does not support refused before any model is loaded."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        cfg = self.cfg
        use_bf16 = cfg.bf16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        check_fsdp_on_cpu()
        # cpu=True on CPU-only machines: without it accelerate ignores a torchrun/gloo process group
        acc = Accelerator(
            gradient_accumulation_steps=cfg.grad_accum,
            mixed_precision="bf16" if use_bf16 else "no",
            cpu=not torch.cuda.is_available(),
        )
        fsdp_on_cpu(acc)
        self.fsdp = acc.distributed_type == DistributedType.FSDP
        self.sharded = self.fsdp or acc.distributed_type == DistributedType.DEEPSPEED
        if self.sharded:
            deepspeed_batch_size(acc, cfg.batch_size, cfg.grad_accum)
        if self.sharded and (cfg.lora_r or cfg.method == "trdpo" or cfg.save_every):
            raise ConfigError(
                "under FSDP or DeepSpeed, --lora-r, trdpo and --save-every are not supported (untested: the weights "
                "are sharded where they are merged, mixed or checkpointed); run them with DDP"
            )
        if self.fsdp and self.spec.live_reference and env_true("FSDP_CPU_RAM_EFFICIENT_LOADING"):
            # transformers then loads real weights on the first process only; FSDP broadcasts the policy's, but the
            # live reference is not wrapped and would stay empty elsewhere
            raise ConfigError(
                f"{cfg.method} under FSDP needs fsdp_cpu_ram_efficient_loading: false (its reference "
                "model is loaded in every process)"
            )
        return acc

    def _sae_and_reference(self) -> None:
        """The SAE (FPO's, or the feature controls'); the reference: a live model, the policy with its adapter off,
        or the offline cache (also for the reference's values of preserved features)."""
        cfg = self.cfg
        self.sae, self.controls, self.ablate_basis = None, Controls(), None
        if self.spec.features or cfg.wants_controls():
            from .sae import load_sae, resolve_layer

            self.sae = load_sae(cfg.sae, cfg.layer).to(self.device)
            cfg.layer = resolve_layer(self.sae, cfg.layer, self.model, cfg.sae)
            self.controls = Controls.of(cfg, self.sae.d_sae)
            if self.controls.ablate:
                self.ablate_basis = ablation_basis(self.sae, self.controls.ablate)
        self.ref_model = None
        self.ref_adapter_off = False
        self.cache = None
        if self.spec.live_reference and cfg.lora_r and cfg.ref_model in (None, cfg.model):
            self.ref_adapter_off = True  # the reference is the policy with its adapter disabled: no second model
        elif self.spec.live_reference:
            self.ref_model = load_model(cfg.ref_model or cfg.model).to(self.device).eval().requires_grad_(False)
        if (self.spec.ref_logps and not self.spec.live_reference) or self.controls.preserve:
            self.cache = self._offline_reference()

    def _optimizer(self) -> None:
        """AdamW and the schedule, prepared by accelerate (the scheduler is stepped by hand once per optimiser step,
        so the schedule is the same for any process count)."""
        cfg = self.cfg
        # FSDP1 replaces the parameters by flat shards when it wraps: its optimiser must be built on the wrapped model
        # (one built before would step tensors the model no longer uses, and nothing would train)
        fsdp1 = self.fsdp and not self.acc.is_fsdp2
        if fsdp1:
            self.model = self.acc.prepare(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optim_in_backward:
            if self.acc.num_processes > 1 or self.fsdp:
                raise ConfigError(
                    "optim_in_backward steps each weight as its gradient completes, before any all-reduce: one process"
                )
            self.opt = BackwardAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            # fused AdamW on GPU: no parameter-sized temporaries at the step (what HF Trainer uses there too)
            fused = {"fused": True} if self.device.type == "cuda" else {}
            self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(self.total_steps, warmup))
        if cfg.optim_in_backward:  # stepped by its own hooks: accelerate wraps the model only
            self.model = self.acc.prepare(self.model)
        elif fsdp1:
            self.opt = self.acc.prepare(self.opt)
        else:
            self.model, self.opt = self.acc.prepare(self.model, self.opt)

    # ------------------------------------------------------------------ reference
    def _offline_reference(self):
        from .reference import ReferenceCache, build_cache, cache_settings, expected_manifest

        cfg = self.cfg
        settings = cache_settings(
            cfg,
            cfg.layer if self.sae is not None else None,
            cfg.k,
            cfg.fpo_variant,
            self.controls.ablate,
            self.controls.preserve,
        )
        ref_path = cfg.ref_model or cfg.model
        expected = expected_manifest(ref_path, cfg.data, cfg.sae if self.sae is not None else None, settings)
        cache_dir = cfg.cache
        if cache_dir is None:
            cache_dir = os.path.join(cfg.out, "ref_cache")
            if self.acc.is_main_process:
                # the policy before its first step is the reference: no second model unless --ref-model differs
                own = cfg.ref_model in (None, cfg.model)
                ref = self.model if own else load_model(ref_path).to(self.device)
                build_cache(
                    ref,
                    self.tokenizer,
                    self.pairs,
                    cache_dir,
                    expected,
                    self.sae,
                    cfg.layer,
                    cfg.k,
                    progress=cfg.progress,
                    fpo_variant=cfg.fpo_variant,
                    ablate_basis=self.ablate_basis,
                    named=self.controls.preserve,
                )
                del ref
            self.acc.wait_for_everyone()
        cache = ReferenceCache(cache_dir, expected, n_pairs=len(self.pairs))
        if self.sae is not None and not cache.has_features:
            raise ConfigError(f"{cache_dir}: FPO needs a cache with SAE features (build it with --sae and --layer)")
        return cache

    def _update_reference(self) -> None:
        update_reference(self.acc.unwrap_model(self.model), self.ref_model, self.cfg.trdpo_alpha, self.ref_adapter_off)

    # ------------------------------------------------------------------ one batch
    def batch_forward(self, model, batch: dict[str, torch.Tensor]):
        """One forward pass of the policy (and of a live reference), and what does not come from the LM head: the
        per-pair terms (cached reference log-probs, FPO's feature discrepancies), and the feature controls' penalty
        with its metrics. Returns (forward, per-pair terms, (penalty, metrics))."""
        cfg = self.cfg
        ids, att, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        positions = (batch["response_rows"], batch["response_cols"]) if "response_rows" in batch else None
        capturing = capture(model, cfg.layer, cfg.fpo_variant) if self.sae is not None else contextlib.nullcontext()
        # the ablation hook goes first, so the captured stream is the one the rest of the model sees
        with ablation([model, self.ref_model], cfg.layer, self.ablate_basis), capturing as box:
            fw = L.forward(
                model,
                ids,
                att,
                resp,
                positions,
                ref=self.ref_model,
                kl=cfg.method.startswith("tdpo"),
                ref_adapter_off=self.ref_adapter_off,
                pack=self.packed,
            )
        other: dict[str, torch.Tensor] = {}
        c = self.cache.batch(batch["index"], self.device) if self.cache is not None else None
        if c is not None and self.ref_model is None and not self.ref_adapter_off:
            other.update(
                ref_chosen_logps=c["chosen_logps"],
                ref_rejected_logps=c["rejected_logps"],
                ref_chosen_avg_logps=c["chosen_logps"] / c["chosen_len"].clamp(min=1),
                ref_rejected_avg_logps=c["rejected_logps"] / c["rejected_len"].clamp(min=1),
            )
        penalty = (torch.zeros((), device=self.device), {})
        if self.sae is not None:
            h = box["h"] if fw.packing is None else fw.packing.unpack(box["h"])
            if self.spec.features:
                other.update(fpo_discrepancy(self.sae, h, resp, c, cfg.k, cfg.topk_from, cfg.fpo_variant))
            if self.controls.preserve or self.controls.suppress:
                penalty = self.controls.terms(self.sae.encode_pooled(h, resp), c)
        return fw, other, penalty

    def batch_terms(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-pair tensors the losses need (the plain autograd path)."""
        fw, other, _ = self.batch_forward(model, batch)
        return {**pair_terms(fw.terms()), **other}

    def loss(self, model, batch):
        """The method's loss (plus the feature controls' penalty) and metrics. When training, each pair's logits are
        computed once and the head's gradients with them (``fused.fused_loss``); the same loss as ``compute_loss``
        on ``batch_terms``."""
        c = self.cfg
        hp = dict(beta=c.beta, alpha=c.alpha, gamma=c.gamma, rewards_add_d=c.fpo_variant == "released")
        fw, other, (penalty, control_metrics) = self.batch_forward(model, batch)
        if not (c.fused_head and can_fuse(fw)):
            loss, metrics = compute_loss(c.method, {**pair_terms(fw.terms()), **other}, **hp)
            return loss + penalty, {**metrics, **control_metrics}
        loss, rows = fused_loss(fw, lambda r, ex: compute_loss(c.method, {**pair_terms(r), **ex}, **hp)[0], other)
        with torch.no_grad():
            _, metrics = compute_loss(c.method, {**pair_terms(rows), **{k: v.detach() for k, v in other.items()}}, **hp)
        return loss + penalty, {**metrics, **control_metrics}

    def _device_batch(self, idx: list[int]) -> dict:
        """Collate on the CPU (response positions and token count included, so no step reads the device back)
        and copy to the device asynchronously from pinned memory. ``index`` stays on the CPU for the cache."""
        batch = D.collate_pairs([self.pairs[i] for i in idx], self.tokenizer.pad_token_id)
        batch["response_rows"], batch["response_cols"] = response_positions(batch["response_mask"])
        n_tokens = int(batch["attention_mask"].sum())
        out = {
            "n_tokens": n_tokens,
            "n_positions": n_tokens if self.packed else batch["attention_mask"].numel(),
            "index": batch.pop("index"),
        }
        gpu = self.device.type == "cuda"
        out.update({k: (v.pin_memory() if gpu else v).to(self.device, non_blocking=gpu) for k, v in batch.items()})
        return out

    def _check_finite(self, losses: list[torch.Tensor], seen: list[tuple[int, list[int]]]) -> None:
        """Raise on the first non-finite loss among the unchecked micro-batches (one host sync for all of them)."""
        if not losses or not seen:
            return
        recent = torch.stack(losses[-len(seen) :])
        bad = (~torch.isfinite(recent)).nonzero()
        if len(bad):
            i = int(bad[0])
            step, idx = seen[i]
            pairs = f"{idx[:8]}{'...' if len(idx) > 8 else ''}"
            kept = self.ckpt_dir() if os.path.exists(self.ckpt_dir()) else None
            raise TrainingDivergedError(
                f"loss is {recent[i].item()} at step {step + 1} on the data's kept pairs {pairs} (0-based); "
                + (f"the last checkpoint is kept in {kept}" if kept else "no checkpoint was written (--save-every 0)")
            )

    # ------------------------------------------------------------------ data order
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(
            len(self.pairs),
            self.lengths if self.cfg.group_by_length else None,
            self.cfg.seed,
            epoch,
            self.cfg.batch_size,
            self.acc.num_processes,
            self.acc.process_index,
        )

    def _micro_batches(self):
        return micro_batches(self._epoch_batches, self.cfg.grad_accum, self.step)

    # ------------------------------------------------------------------ checkpoints
    def ckpt_dir(self) -> str:
        return checkpoint_dir(self.cfg.out)

    def save_checkpoint(self) -> None:
        save_checkpoint(self)

    def load_checkpoint(self) -> bool:
        return load_checkpoint(self)

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        cfg = self.cfg
        resumed = self.load_checkpoint()
        torch.manual_seed(cfg.seed + self.step)
        log = RunLog(
            cfg.out,
            self.acc,
            self.total_steps,
            self.step,
            f"train {cfg.method}",
            self.history,
            resumed,
            cfg.progress,
            cfg.tensorboard,
        )
        t0 = time.time()
        tokens = positions = 0
        self.model.train()
        micro = self._micro_batches()
        seen: list[tuple[int, list[int]]] = []  # (step, pairs) of the micro-batches whose losses are not yet checked
        while self.step < self.total_steps:
            for _ in range(cfg.grad_accum):
                idx = next(micro)
                batch = self._device_batch(idx)
                tokens += batch.pop("n_tokens")
                positions += batch.pop("n_positions")
                with self.acc.accumulate(self.model):
                    loss, metrics = self.loss(self.model, batch)
                    seen.append((self.step, idx))
                    self.acc.backward(loss)
                    if self.acc.sync_gradients and cfg.max_grad_norm and not cfg.optim_in_backward:
                        self.acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.opt.step()
                    if self.acc.sync_gradients:
                        self.sched.step()
                    self.opt.zero_grad(set_to_none=True)
                log.add(loss, metrics)
            self.step += 1
            if cfg.method == "trdpo" and self.step % cfg.trdpo_tau == 0:
                self._update_reference()
            log.bar.update(1)
            logged = self.step % cfg.log_every == 0 or self.step == self.total_steps
            saving = cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps
            if logged or saving or self.device.type == "cpu":  # the one host sync: never a diverged checkpoint
                self._check_finite(log.losses(), seen)
                seen = []
            if logged:
                log.write(self.step, self.sched.get_last_lr()[0])
            if saving:
                self.save_checkpoint()
        log.close()
        wall = time.time() - t0
        summary = {
            "method": cfg.method,
            "steps": self.step,
            "wall_seconds": round(wall, 2),
            "tokens_per_second": round(tokens * self.acc.num_processes / max(wall, 1e-9), 1),
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
            "padded_share": round(1 - tokens / max(positions, 1), 4),
            "packed": self.packed,
            "reference_model_loaded": self.ref_model is not None,
            "distributed": {
                "type": self.acc.distributed_type.value,
                "processes": self.acc.num_processes,
                "fsdp_version": self.acc.state.fsdp_plugin.fsdp_version if self.fsdp else None,
            },
            "final": self.history[-1] if self.history else {},
            "data": self.stats.summary(),
        }
        self.save_final()
        if self.acc.is_main_process:
            write_json(os.path.join(cfg.out, "summary.json"), summary)
        return summary

    def save_final(self) -> str:
        return save_final(self)
