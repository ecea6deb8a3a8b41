"""A training run on disk: the checkpoint a killed run resumes from (weights, optimiser, scheduler, random states,
a live reference, the metrics so far), and the final model. Both are written atomically (temp folder + rename)."""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict

import torch

from .atomic import atomic_dir, write_json
from .distributed import full_state_dict
from .errors import ConfigError

# settings that do not change what a run computes: a checkpoint made under other values of these still resumes
NOT_THE_RUN = ("out", "resume", "progress", "tensorboard", "log_every", "save_every", "cache")


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoint")


def save_checkpoint(t) -> None:
    """Trainer ``t``'s state after ``t.step`` optimiser steps (written by the main process)."""
    if not t.acc.is_main_process:
        return

    def write(tmp):
        from safetensors.torch import save_model

        save_model(t.acc.unwrap_model(t.model), os.path.join(tmp, "model.safetensors"))
        state = {
            "opt": t.opt.state_dict(),
            "sched": t.sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "py_rng": random.getstate(),
        }
        if t.ref_model is not None:
            state["ref"] = t.ref_model.state_dict()
        torch.save(state, os.path.join(tmp, "state.pt"))
        write_json(
            os.path.join(tmp, "trainer_state.json"),
            {"step": t.step, "config": asdict(t.cfg), "history": t.history},
            indent=None,
        )

    atomic_dir(checkpoint_dir(t.cfg.out), write)


def load_checkpoint(t) -> bool:
    """Resume trainer ``t`` from ``<out>/checkpoint`` when there is one and ``t.cfg.resume``; a checkpoint made with
    other settings is refused, naming them (resuming it would silently keep, say, the old learning rate)."""
    d = checkpoint_dir(t.cfg.out)
    if not (t.cfg.resume and os.path.exists(os.path.join(d, "trainer_state.json"))):
        return False
    if t.sharded:
        raise ConfigError(
            f"{d}: resuming sharded training is not supported (the checkpoint holds whole weights); "
            "resume with DDP or pass --no-resume"
        )
    with open(os.path.join(d, "trainer_state.json")) as f:
        meta = json.load(f)
    now = asdict(t.cfg)
    changed = [
        f"{k} {meta['config'][k]!r} -> {now[k]!r}"
        for k in now
        if k not in NOT_THE_RUN and k in meta["config"] and meta["config"][k] != now[k]
    ]
    if changed:
        raise ConfigError(
            f"{d}: made with other settings ({'; '.join(changed)}); resume with the same settings, or "
            "pass --no-resume to start over"
        )
    from safetensors.torch import load_model as load_weights

    load_weights(t.acc.unwrap_model(t.model), os.path.join(d, "model.safetensors"))
    state = torch.load(os.path.join(d, "state.pt"), weights_only=False)
    t.opt.load_state_dict(state["opt"])
    t.sched.load_state_dict(state["sched"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["py_rng"])
    if t.ref_model is not None and "ref" in state:
        t.ref_model.load_state_dict(state["ref"])
    t.step, t.history = meta["step"], meta["history"]
    return True


def save_final(t) -> str:
    """``<out>/final``: a plain ``save_pretrained`` model (LoRA merged, shards gathered) and its tokenizer."""
    final = os.path.join(t.cfg.out, "final")
    t.acc.wait_for_everyone()
    state_dict = full_state_dict(t.acc, t.model, t.sharded)
    if t.acc.is_main_process:
        model = t.acc.unwrap_model(t.model)
        if t.cfg.lora_r:
            model = model.merge_and_unload()

        def write(tmp):
            model.save_pretrained(tmp, state_dict=state_dict)
            t.tokenizer.save_pretrained(tmp)

        atomic_dir(final, write)
    return final
