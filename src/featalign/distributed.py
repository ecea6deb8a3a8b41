"""What the training loop needs from ``accelerate`` beyond ``prepare``: FSDP on CPU processes, and the whole model's
weights gathered from shards for saving."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError


def env_true(name: str) -> bool:
    """An accelerate launcher setting passed through the environment, read the way accelerate reads booleans."""
    return os.environ.get(name, "").strip().lower() in ("1", "y", "yes", "t", "true", "on")


def check_fsdp_on_cpu() -> None:
    """Refuse, before accelerate is asked, an FSDP1 launch on a machine without a GPU that needs one.

    FSDP1's ``sync_module_states`` (forced on by ``cpu_ram_efficient_loading``) broadcasts the weights from a GPU;
    with none there is nothing to broadcast from. FSDP2 has no such step and runs on CPU processes."""
    if torch.cuda.is_available() or not env_true("ACCELERATE_USE_FSDP"):
        return
    if os.environ.get("FSDP_VERSION", "1").strip() != "1":
        return
    on = [k for k in ("FSDP_SYNC_MODULE_STATES", "FSDP_CPU_RAM_EFFICIENT_LOADING") if env_true(k)]
    if on:
        settings = " and ".join(f"fsdp_{k[5:].lower()}" for k in on)
        raise ConfigError(
            f"FSDP1 on CPU cannot use {settings} (it broadcasts weights from a GPU): set "
            "fsdp_sync_module_states: false and fsdp_cpu_ram_efficient_loading: false in the accelerate "
            "config, or use fsdp_version: 2"
        )


def fsdp_on_cpu(acc) -> None:
    """Let a launcher's FSDP request (``accelerate launch`` with an FSDP config, or ACCELERATE_USE_FSDP=true) shard
    on CPUs.

    torch's FSDP (1 and 2) runs on CPU processes over gloo, but accelerate only honours the request for GPU-like
    devices (``AcceleratorState.__init__`` switches to FSDP in its MULTI_GPU/NPU/XPU... branch), so a gloo group
    of CPU processes silently stays DDP. Switching the shared state to FSDP with the launcher's plugin runs
    accelerate's own FSDP path (wrapping, gradient clipping, state-dict gathering): the code GPUs run."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if acc.distributed_type != DistributedType.MULTI_CPU or not env_true("ACCELERATE_USE_FSDP"):
        return
    plugin = FullyShardedDataParallelPlugin()
    PartialState._shared_state["distributed_type"] = acc.state.distributed_type = DistributedType.FSDP
    # FSDP1 takes device_id=acc.device and insists it equals its compute device "cpu" (MULTI_CPU's device is "cpu:0")
    PartialState._shared_state["device"] = acc.state.device = torch.device("cpu")
    acc.state.fsdp_plugin = plugin


def deepspeed_batch_size(acc, batch_size: int, grad_accum: int) -> None:
    """DeepSpeed wants its micro-batch size in its config; accelerate fills ``auto`` from a dataloader, and the loop
    passes none (it orders batches itself for exact resume), so the trainer's settings fill it."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = batch_size
    if ds.get("gradient_accumulation_steps", "auto") == "auto":
        ds["gradient_accumulation_steps"] = grad_accum
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = batch_size * grad_accum * acc.num_processes


def full_state_dict(acc, model, sharded: bool) -> dict | None:
    """The whole model's weights, gathered on the main process from FSDP or DeepSpeed ZeRO-3 shards (every process
    must call this); None when the model holds them whole."""
    if not sharded:
        return None
    fsdp1_on_cpu = acc.state.fsdp_plugin is not None and not acc.is_fsdp2 and acc.device.type == "cpu"
    if not fsdp1_on_cpu:
        sd = acc.get_state_dict(model)
    else:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # accelerate gathers with offload_to_cpu=True, which on a CPU device frees the unsharded storage it then
        # reads (torch: "setStorage: ... out of bounds for storage of size 0"); the weights are on the CPU already
        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
            sd = model.state_dict()
    # gathered tied weights (a tied LM head) are separate copies: alias them so save_pretrained writes one
    for name, source in (getattr(acc.unwrap_model(model), "all_tied_weights_keys", None) or {}).items():
        if sd and name in sd and source in sd and torch.equal(sd[name], sd[source]):
            sd[name] = sd[source]
    return sd
