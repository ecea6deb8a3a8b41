"""featalign: preference optimisation with SAE feature-level constraints (FPO and the DPO family).

Every command is a function that takes its config dataclass (``featalign sae eval`` is ``run_sae_eval(SAEEvalConfig)``),
so a script does what the command line does::

    from featalign import TrainConfig, run_train
    summary = run_train(TrainConfig(method="fpo", model="my-sft", data="pairs.jsonl", sae="my-sae", out="runs/fpo"))

Names are imported when first used, so ``import featalign`` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "WorldConfig": "world.build",
    "WorldBuildConfig": "world.build",
    "run_world_build": "world.build",
    "build_world": "world.build",
    "world_paths": "world.build",
    "TrainConfig": "train",
    "run_train": "train",
    "Trainer": "train",
    "CacheConfig": "reference",
    "run_cache": "reference",
    "ReferenceCache": "reference",
    "SAETrainConfig": "sae.train",
    "train_sae": "sae.train",
    "SAEEvalConfig": "sae.evaluate",
    "run_sae_eval": "sae.evaluate",
    "SAEMatchConfig": "sae.match",
    "run_sae_match": "sae.match",
    "match_saes": "sae.match",
    "SAE": "sae.model",
    "load_sae": "sae.formats",
    "evaluate_sae": "sae.metrics",
    "ExplainConfig": "explain",
    "run_explain": "explain",
    "AttributeConfig": "attribute",
    "run_attribute": "attribute",
    "SelectFeaturesConfig": "select_features",
    "run_select_features": "select_features",
    "EvalConfig": "evaluate",
    "evaluate_policy": "evaluate",
    "GenerateConfig": "generate",
    "run_generate": "generate",
    "CompareConfig": "compare",
    "run_compare": "compare",
    "load_model": "models",
    "load_tokenizer": "models",
    "METHODS": "losses",
    "compute_loss": "losses",
    "ConfigError": "errors",
    "DataError": "errors",
    "FeatalignError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'featalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
