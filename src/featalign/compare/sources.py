"""Where a comparison trains from and is judged on: a ``Source`` (SFT model, preference pairs, SAE, judge), built
for the built-in world, for a user's own model and data, or for a task preset (sentiment, arithmetic). The sweep sees
only this."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from ..config import settings_key
from ..errors import ConfigError
from .budget import PRESET_JUDGE, Budget, CompareConfig


@dataclass
class Source:
    """An SFT model (and its tokenizer), train and test preference pairs, an SAE at a layer, and the judge."""

    sft: str
    tokenizer: str
    train: str
    test: str
    sae: str
    layer: int
    reward_fn: str | None = None
    reward_model: str | None = None
    info: dict = field(default_factory=dict)


def trained_sae(
    cfg: CompareConfig,
    b: Budget,
    model_path: str,
    data: str,
    layer: int,
    root: str,
    model,
    tokenizer,
    progress: bool = True,
) -> tuple[str, dict]:
    """Train (or reuse) the comparison's SAE, keyed on every training setting and the trainer's version (a changed
    default never reuses a stale SAE); returns its folder and its evaluation."""
    from ..models import hidden_size
    from ..sae import load_sae
    from ..sae.metrics import decoder_cosine_to_init
    from ..sae.train import SAE_TRAIN_VERSION, SAETrainConfig, train_sae

    d = hidden_size(model)
    sae_k = b.sae_k or max(1, d // 20)
    d_sae = b.sae_d or 8 * d
    sae_cfg = SAETrainConfig(
        model=model_path,
        data=data,
        layer=layer,
        out="",
        architecture=b.sae_arch,
        d_sae=d_sae,
        k=sae_k,
        fc_zipf=b.sae_fc_zipf,
        tokens=b.sae_tokens,
        lr=b.sae_lr,
        dead_tokens=b.sae_dead_tokens,
        seed=cfg.world_seed,
        progress=progress,
    )
    settings = {k: v for k, v in asdict(sae_cfg).items() if k not in ("out", "progress", "device")}
    sae_cfg.out = os.path.join(
        root, f"sae-l{layer}-{b.sae_arch}{sae_k}-{d_sae}-{settings_key([SAE_TRAIN_VERSION, settings])}"
    )
    if not os.path.exists(os.path.join(sae_cfg.out, "eval.json")):
        train_sae(sae_cfg, model=model, tokenizer=tokenizer)
    with open(os.path.join(sae_cfg.out, "eval.json")) as f:
        sae_eval = json.load(f)
    sae_eval["decoder_cosine_to_init"] = decoder_cosine_to_init(load_sae(sae_cfg.out))
    sae_eval["config"] = {
        "architecture": b.sae_arch,
        **({"fc_zipf": b.sae_fc_zipf} if b.sae_arch == "featurechoice" else {}),
        "d_sae": d_sae,
        "k": sae_k,
        "tokens": b.sae_tokens,
        "lr": b.sae_lr,
        "dead_tokens": b.sae_dead_tokens,
    }
    return sae_cfg.out, sae_eval


def world_source(cfg: CompareConfig, progress: bool = True) -> Source:
    """Build (or reuse) the built-in world and its SAE at ``cfg.layer`` (default 2)."""
    from ..models import load_model, load_tokenizer
    from ..world import WorldConfig, build_world, world_paths

    layer = 2 if cfg.layer is None else cfg.layer
    world_dir = cfg.world + "-quick" if (cfg.quick and cfg.world == "data/world") else cfg.world
    world = WorldConfig.quick(cfg.world_seed) if cfg.quick else WorldConfig(seed=cfg.world_seed)
    manifest = build_world(world_dir, world, progress)
    wp = world_paths(world_dir)
    model = load_model(wp["sft"]).eval()
    sae, sae_eval = trained_sae(
        cfg, cfg.budget(), wp["sft"], wp["sft_text"], layer, world_dir, model, load_tokenizer(wp["sft"]), progress
    )
    return Source(
        sft=wp["sft"],
        tokenizer=wp["sft"],
        train=wp["train"],
        test=wp["test"],
        sae=sae,
        layer=layer,
        reward_fn=cfg.reward_fn or (None if cfg.reward_model else PRESET_JUDGE["world"]),
        reward_model=cfg.reward_model,
        info={"world": manifest, "sae": sae_eval, "sae_config": sae_eval["config"]},
    )


def user_source(
    cfg: CompareConfig,
    model: str | None = None,
    data: str | None = None,
    test_data: str | None = None,
    reward_fn: str | None = None,
    progress: bool = True,
) -> Source:
    """A real model and its preference data: a GGUF file's cached HF conversion, a held-out split by prompt when no
    test data is given, the user's SAE or one trained on the middle layer."""
    from ..data import split_by_prompt
    from ..models import decoder_layers, load_model, load_tokenizer, resolve_model
    from ..reference import path_hash

    model, data, test_data = model or cfg.model, data or cfg.data, test_data or cfg.test_data
    reward_fn = reward_fn or cfg.reward_fn
    if not model or not data:
        raise ConfigError("compare on your own model needs both --model and --data")
    if not (reward_fn or cfg.reward_model):
        raise ConfigError("compare on your own model needs a judge: --reward-fn module:function or --reward-model PATH")
    root = os.path.join(cfg.out, "source")
    os.makedirs(root, exist_ok=True)
    model = resolve_model(model)
    if not test_data:
        split_dir = os.path.join(root, f"split-{path_hash(data)[:10]}")
        data, test_data = split_by_prompt(data, split_dir, cfg.test_fraction, seed=0)
    m = load_model(model).eval()
    layer = cfg.layer if cfg.layer is not None else len(decoder_layers(m)) // 2
    if cfg.sae:
        sae, sae_eval = cfg.sae, {}
    else:
        sae, sae_eval = trained_sae(cfg, cfg.budget(), model, data, layer, root, m, load_tokenizer(model), progress)
    info = {"model": cfg.model, "data": cfg.data, "sae": sae_eval, "sae_config": sae_eval.get("config", {"path": sae})}
    return Source(
        sft=model,
        tokenizer=model,
        train=data,
        test=test_data,
        sae=sae,
        layer=layer,
        reward_fn=reward_fn,
        reward_model=cfg.reward_model,
        info=info,
    )


def task_source(cfg: CompareConfig, progress: bool = True) -> Source:
    """A task preset (sentiment, arithmetic): its pairs built (or reused) from the starting model in ``cfg.world``
    (default ``data/<preset>``), then a real-model source judged by the task's ground truth."""
    import importlib

    from ..tasks import TaskConfig, build_task

    task = importlib.import_module(f"featalign.{cfg.preset}").TASK
    folder = f"data/{cfg.preset}" if cfg.world == "data/world" else cfg.world
    m = build_task(folder, task, TaskConfig(**{**task.settings, "model": cfg.model or ""}), progress)
    judge = cfg.reward_fn or (None if cfg.reward_model else PRESET_JUDGE[cfg.preset])
    src = user_source(cfg, model=m["model"], data=m["train"], test_data=m["test"], reward_fn=judge, progress=progress)
    src.info["task"] = m
    return src


def make_source(cfg: CompareConfig, progress: bool = True) -> Source:
    if cfg.preset != "world":
        return task_source(cfg, progress)
    if cfg.model or cfg.data:
        return user_source(cfg, progress=progress)
    return world_source(cfg, progress)
