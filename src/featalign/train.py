"""The preference-training loop: one config dataclass, an `accelerate` loop, every method in `losses.METHODS`.

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
import json
import math
import os
import random
import resource
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from . import data as D
from . import logprobs as L
from .atomic import atomic_dir
from .config import check_model_path, setting
from .data.batching import group_by_length, pair_length
from .errors import ConfigError, TrainingDivergedError
from .logprobs import response_positions
from .losses import METHODS, compute_loss, feature_mse
from .mlp import lean_mlp
from .models import capture_layer, load_model, load_tokenizer

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
    max_grad_norm: float = setting(1.0, "gradient-norm clip (0: off)", ge=0)
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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _env_true(name: str) -> bool:
    """An accelerate launcher setting passed through the environment, read the way accelerate reads booleans."""
    return os.environ.get(name, "").strip().lower() in ("1", "y", "yes", "t", "true", "on")


def _check_fsdp_on_cpu() -> None:
    """Refuse, before accelerate is asked, an FSDP1 launch on a machine without a GPU that needs one.

    FSDP1's ``sync_module_states`` (forced on by ``cpu_ram_efficient_loading``) broadcasts the weights from a GPU;
    with none there is nothing to broadcast from. FSDP2 has no such step and runs on CPU processes."""
    if torch.cuda.is_available() or not _env_true("ACCELERATE_USE_FSDP"):
        return
    if os.environ.get("FSDP_VERSION", "1").strip() != "1":
        return
    on = [k for k in ("FSDP_SYNC_MODULE_STATES", "FSDP_CPU_RAM_EFFICIENT_LOADING") if _env_true(k)]
    if on:
        settings = " and ".join(f"fsdp_{k[5:].lower()}" for k in on)
        raise ConfigError(
            f"FSDP1 on CPU cannot use {settings} (it broadcasts weights from a GPU): set "
            "fsdp_sync_module_states: false and fsdp_cpu_ram_efficient_loading: false in the accelerate "
            "config, or use fsdp_version: 2"
        )


def _fsdp_on_cpu(acc) -> None:
    """Let a launcher's FSDP request (``accelerate launch`` with an FSDP config, or ACCELERATE_USE_FSDP=true) shard on CPUs.

    torch's FSDP (1 and 2) runs on CPU processes over gloo, but accelerate only honours the request for GPU-like
    devices (``AcceleratorState.__init__`` switches to FSDP in its MULTI_GPU/NPU/XPU... branch), so a gloo group
    of CPU processes silently stays DDP. Switching the shared state to FSDP with the launcher's plugin runs
    accelerate's own FSDP path (wrapping, gradient clipping, state-dict gathering): the code GPUs run."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if acc.distributed_type != DistributedType.MULTI_CPU or os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return
    plugin = FullyShardedDataParallelPlugin()
    PartialState._shared_state["distributed_type"] = acc.state.distributed_type = DistributedType.FSDP
    # FSDP1 takes device_id=acc.device and insists it equals its compute device "cpu" (MULTI_CPU's device is "cpu:0")
    PartialState._shared_state["device"] = acc.state.device = torch.device("cpu")
    acc.state.fsdp_plugin = plugin


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
    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        cfg.validate()
        self.cfg = cfg
        self.spec = METHODS[cfg.method]
        use_bf16 = cfg.bf16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        _check_fsdp_on_cpu()
        # cpu=True on CPU-only machines: without it accelerate ignores a torchrun/gloo process group
        self.acc = Accelerator(
            gradient_accumulation_steps=cfg.grad_accum,
            mixed_precision="bf16" if use_bf16 else "no",
            cpu=not torch.cuda.is_available(),
        )
        _fsdp_on_cpu(self.acc)
        self.fsdp = self.acc.distributed_type == DistributedType.FSDP
        if self.fsdp and (cfg.lora_r or cfg.method == "trdpo" or cfg.save_every):
            raise ConfigError(
                "under FSDP, --lora-r, trdpo and --save-every are not supported (untested: the weights are "
                "sharded where they are merged, mixed or checkpointed); run them with DDP"
            )
        if (
            self.fsdp
            and self.spec.live_reference
            and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() == "true"
        ):
            # transformers then loads real weights on the first process only; FSDP broadcasts the policy's, but the
            # live reference is not wrapped and would stay empty elsewhere
            raise ConfigError(
                f"{cfg.method} under FSDP needs fsdp_cpu_ram_efficient_loading: false (its reference "
                "model is loaded in every process)"
            )
        self.device = self.acc.device
        os.makedirs(cfg.out, exist_ok=True)
        self.tokenizer = load_tokenizer(cfg.model)
        _, self.pairs, self.stats = D.prepare_pairs(cfg, self.tokenizer)
        self.lengths = [pair_length(p) for p in self.pairs]
        self.model = load_model(cfg.model)
        self.sae = None
        if self.spec.features:
            from .sae import load_sae, resolve_layer

            self.sae = load_sae(cfg.sae, cfg.layer).to(self.device)
            cfg.layer = resolve_layer(self.sae, cfg.layer, self.model, cfg.sae)
        self.ref_model = None
        self.ref_adapter_off = False
        self.cache = None
        if self.spec.live_reference and cfg.lora_r and cfg.ref_model in (None, cfg.model):
            self.ref_adapter_off = True  # the reference is the policy with its adapter disabled: no second model
        elif self.spec.live_reference:
            self.ref_model = load_model(cfg.ref_model or cfg.model).to(self.device).eval().requires_grad_(False)
        elif self.spec.ref_logps:
            self.cache = self._offline_reference()
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if cfg.lean_mlp:
            lean_mlp(self.model)
        if cfg.lora_r:
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(
                self.model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear")
            )
        # padding-free rows where asked and where the model gives the padded batch's outputs that way (checked here,
        # once: the check's own forward pass must not run inside a layer capture); FSDP runs take full logits, unpacked
        attn = str(getattr(self.model.config, "_attn_implementation", "") or "")
        want = cfg.pack == "on" or (cfg.pack == "auto" and attn.startswith("flash_attention"))
        self.packed = bool(
            want
            and not self.fsdp
            and L._chunked_ok(self.model)
            and L.packing_ok(self.model)
            and (self.ref_model is None or L.packing_ok(self.ref_model))
        )
        per_step = cfg.batch_size * cfg.grad_accum * self.acc.num_processes
        self.steps_per_epoch = max(1, len(self.pairs) // per_step)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, int(cfg.epochs * self.steps_per_epoch))
        # FSDP1 replaces the parameters by flat shards when it wraps: its optimiser must be built on the wrapped model
        # (one built before would step tensors the model no longer uses, and nothing would train)
        fsdp1 = self.fsdp and not self.acc.is_fsdp2
        if fsdp1:
            self.model = self.acc.prepare(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused AdamW on GPU: no parameter-sized temporaries at the step (what HF Trainer uses there too)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, _lr_lambda(self.total_steps, int(cfg.warmup_ratio * self.total_steps))
        )
        # the scheduler is stepped by hand once per optimiser step, so the schedule is the same for any process count
        if fsdp1:
            self.opt = self.acc.prepare(self.opt)
        else:
            self.model, self.opt = self.acc.prepare(self.model, self.opt)
        self.step = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ reference
    def _offline_reference(self):
        from .reference import ReferenceCache, build_cache, cache_settings, expected_manifest

        cfg = self.cfg
        settings = cache_settings(cfg, cfg.layer if self.sae is not None else None, cfg.k)
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
                )
                del ref
            self.acc.wait_for_everyone()
        cache = ReferenceCache(cache_dir, expected, n_pairs=len(self.pairs))
        if self.sae is not None and not cache.has_features:
            raise ConfigError(f"{cache_dir}: FPO needs a cache with SAE features (build it with --sae and --layer)")
        return cache

    @torch.no_grad()
    def _update_reference(self) -> None:
        """TR-DPO: theta_ref <- a * theta + (1 - a) * theta_ref (a = 1: hard copy).

        With LoRA the reference is the base weights W and the policy W + BA, so the update is W <- W + a BA,
        B <- (1 - a) B: the policy is unchanged and the reference (adapter off) is exactly the mix."""
        a = self.cfg.trdpo_alpha
        if self.ref_adapter_off:
            from peft.tuners.lora import LoraLayer

            for m in self.acc.unwrap_model(self.model).modules():
                if isinstance(m, LoraLayer):
                    for name in m.active_adapters:
                        if name in m.lora_A:
                            m.get_base_layer().weight.add_(
                                m.get_delta_weight(name).to(m.get_base_layer().weight.dtype), alpha=a
                            )
                            m.lora_B[name].weight.mul_(1 - a)
            return
        pol = self.acc.unwrap_model(self.model).state_dict()
        for name, p in self.ref_model.state_dict().items():
            if p.dtype.is_floating_point:
                p.mul_(1 - a).add_(pol[name].to(p.dtype), alpha=a)

    # ------------------------------------------------------------------ one batch
    def batch_forward(self, model, batch: dict[str, torch.Tensor]) -> tuple[L.Forward, dict[str, torch.Tensor]]:
        """One forward pass of the policy (and of a live reference), and the per-pair terms that do not come
        from the LM head: cached reference log-probs, FPO's feature discrepancies."""
        cfg = self.cfg
        ids, att, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        n = ids.shape[0] // 2
        positions = (batch["response_rows"], batch["response_cols"]) if "response_rows" in batch else None
        with capture_layer(model, cfg.layer, first=True) if self.sae is not None else contextlib.nullcontext() as box:
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
        if self.ref_model is None and not self.ref_adapter_off and self.cache is not None:
            c = self.cache.batch(batch["index"], self.device)
            other.update(
                ref_chosen_logps=c["chosen_logps"],
                ref_rejected_logps=c["rejected_logps"],
                ref_chosen_avg_logps=c["chosen_logps"] / c["chosen_len"].clamp(min=1),
                ref_rejected_avg_logps=c["rejected_logps"] / c["rejected_len"].clamp(min=1),
            )
            if self.sae is not None:
                h = box["h"] if fw.packing is None else fw.packing.unpack(box["h"])
                pooled = self.sae.encode_pooled(h, resp)
                d_c = feature_mse(pooled[:n], c["chosen_feat_idx"], c["chosen_feat_val"], cfg.k, cfg.topk_from)
                d_r = feature_mse(pooled[n:], c["rejected_feat_idx"], c["rejected_feat_val"], cfg.k, cfg.topk_from)
                other.update(feat_mse_chosen=d_c, feat_mse_rejected=d_r)
        return fw, other

    def batch_terms(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-pair tensors the losses need (the plain autograd path)."""
        fw, other = self.batch_forward(model, batch)
        return {**pair_terms(fw.terms()), **other}

    def loss(self, model, batch):
        """The method's loss and metrics. When training, each pair's logits are computed once and the head's
        gradients with them (``Forward.fused_loss``); the same loss as ``compute_loss`` on ``batch_terms``."""
        c = self.cfg
        hp = dict(beta=c.beta, alpha=c.alpha, gamma=c.gamma)
        fw, other = self.batch_forward(model, batch)
        if not (c.fused_head and fw.can_fuse()):
            return compute_loss(c.method, {**pair_terms(fw.terms()), **other}, **hp)
        loss, rows = fw.fused_loss(lambda r, ex: compute_loss(c.method, {**pair_terms(r), **ex}, **hp)[0], other)
        with torch.no_grad():
            _, metrics = compute_loss(c.method, {**pair_terms(rows), **{k: v.detach() for k, v in other.items()}}, **hp)
        return loss, metrics

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
            raise TrainingDivergedError(
                f"loss is {recent[i].item()} at step {step} on pairs {idx[:8]}{'...' if len(idx) > 8 else ''}; "
                f"last checkpoint kept in {self.ckpt_dir()}"
            )

    # ------------------------------------------------------------------ data order
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches for an epoch: a seeded permutation (grouped by length), split across processes."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        perm = torch.randperm(len(self.pairs), generator=g).tolist()
        bs, world, rank = self.cfg.batch_size, self.acc.num_processes, self.acc.process_index
        global_bs = bs * world
        if self.cfg.group_by_length:
            perm = group_by_length(perm, self.lengths, global_bs, g)
        out = []
        for i in range(0, len(perm) - global_bs + 1, global_bs):
            out.append(perm[i + rank * bs : i + (rank + 1) * bs])
        return out

    def _micro_batches(self):
        accum = self.cfg.grad_accum
        micro = self.step * accum
        epoch = 0
        while True:
            batches = self._epoch_batches(epoch)
            n_full = (len(batches) // accum) * accum
            if micro < n_full:
                for b in batches[micro:n_full]:
                    yield b
                micro = 0
            else:
                micro -= n_full
            epoch += 1

    # ------------------------------------------------------------------ checkpoints
    def ckpt_dir(self) -> str:
        return os.path.join(self.cfg.out, "checkpoint")

    def save_checkpoint(self) -> None:
        if not self.acc.is_main_process:
            return

        def write(tmp):
            from safetensors.torch import save_model

            save_model(self.acc.unwrap_model(self.model), os.path.join(tmp, "model.safetensors"))
            state = {
                "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "py_rng": random.getstate(),
            }
            if self.ref_model is not None:
                state["ref"] = self.ref_model.state_dict()
            torch.save(state, os.path.join(tmp, "state.pt"))
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({"step": self.step, "config": asdict(self.cfg), "history": self.history}, f)

        atomic_dir(self.ckpt_dir(), write)

    def load_checkpoint(self) -> bool:
        d = self.ckpt_dir()
        if not (self.cfg.resume and os.path.exists(os.path.join(d, "trainer_state.json"))):
            return False
        if self.fsdp:
            raise ConfigError(
                f"{d}: resuming under FSDP is not supported (the checkpoint holds whole weights); "
                "resume with DDP or pass --no-resume"
            )
        from safetensors.torch import load_model as load_weights

        with open(os.path.join(d, "trainer_state.json")) as f:
            meta = json.load(f)
        load_weights(self.acc.unwrap_model(self.model), os.path.join(d, "model.safetensors"))
        state = torch.load(os.path.join(d, "state.pt"), weights_only=False)
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["py_rng"])
        if self.ref_model is not None and "ref" in state:
            self.ref_model.load_state_dict(state["ref"])
        self.step, self.history = meta["step"], meta["history"]
        return True

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        cfg = self.cfg
        resumed = self.load_checkpoint()
        torch.manual_seed(cfg.seed + self.step)
        writer = None
        if cfg.tensorboard and self.acc.is_main_process:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(os.path.join(cfg.out, "tb"))
            except ImportError:
                writer = None
        log_path = os.path.join(cfg.out, "metrics.jsonl")
        if self.acc.is_main_process:
            # a killed run may have logged steps after its last checkpoint: keep only what the checkpoint saw
            with open(log_path, "w") as f:
                for rec in self.history if resumed else []:
                    f.write(json.dumps(rec) + "\n")
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"train {cfg.method}",
            disable=not (cfg.progress and self.acc.is_main_process),
        )
        t0 = time.time()
        tokens = positions = 0
        self.model.train()
        micro = self._micro_batches()
        window: dict[str, list[torch.Tensor]] = {}
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
                    if self.acc.sync_gradients and cfg.max_grad_norm:
                        self.acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.opt.step()
                    if self.acc.sync_gradients:
                        self.sched.step()
                    self.opt.zero_grad(set_to_none=True)
                # kept as tensors: one host sync per logged step instead of one per metric per step
                window.setdefault("loss", []).append(loss.detach())
                for k, v in metrics.items():
                    if v.dim() == 0:
                        window.setdefault(k, []).append(v.detach())
            self.step += 1
            if cfg.method == "trdpo" and self.step % cfg.trdpo_tau == 0:
                self._update_reference()
            bar.update(1)
            logged = self.step % cfg.log_every == 0 or self.step == self.total_steps
            saving = cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps
            if logged or saving or self.device.type == "cpu":  # the one host sync: never a diverged checkpoint
                self._check_finite(window.get("loss", []), seen)
                seen = []
            if logged:
                rec = {
                    "step": self.step,
                    "lr": self.sched.get_last_lr()[0],
                    **{k: torch.stack(v).float().mean().item() for k, v in window.items()},
                }
                bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec.get('rewards/accuracies', float('nan')):.2f}")
                rec = {
                    k: (
                        self.acc.reduce(torch.tensor(v, device=self.device), "mean").item()
                        if isinstance(v, float) and k != "lr"
                        else v
                    )
                    for k, v in rec.items()
                }
                window = {}
                self.history.append(rec)
                if self.acc.is_main_process:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if writer is not None:
                        for k, v in rec.items():
                            if k != "step":
                                writer.add_scalar(k, v, self.step)
            if saving:
                self.save_checkpoint()
        bar.close()
        if writer is not None:
            writer.close()
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
            with open(os.path.join(cfg.out, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return summary

    def _full_state_dict(self) -> dict | None:
        """Under FSDP the whole model's weights, gathered on the main process (every process must call this);
        otherwise None (the model holds them)."""
        if not self.fsdp:
            return None
        if self.acc.is_fsdp2 or self.device.type != "cpu":
            sd = self.acc.get_state_dict(self.model)
        else:
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            # accelerate gathers with offload_to_cpu=True, which on a CPU device frees the unsharded storage it then
            # reads (torch: "setStorage: ... out of bounds for storage of size 0"); the weights are on the CPU already
            cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
            with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, cfg):
                sd = self.model.state_dict()
        # gathered tied weights (a tied LM head) are separate copies: alias them so save_pretrained writes one
        for name, source in (getattr(self.acc.unwrap_model(self.model), "all_tied_weights_keys", None) or {}).items():
            if sd and name in sd and source in sd and torch.equal(sd[name], sd[source]):
                sd[name] = sd[source]
        return sd

    def save_final(self) -> str:
        final = os.path.join(self.cfg.out, "final")
        self.acc.wait_for_everyone()
        state_dict = self._full_state_dict()
        if self.acc.is_main_process:
            model = self.acc.unwrap_model(self.model)
            if self.cfg.lora_r:
                model = model.merge_and_unload()

            def write(tmp):
                model.save_pretrained(tmp, state_dict=state_dict)
                self.tokenizer.save_pretrained(tmp)

            atomic_dir(final, write)
        return final


def run_train(cfg: TrainConfig) -> dict:
    return Trainer(cfg).train()
