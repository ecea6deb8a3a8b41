"""The quick world and its TopK SAE that most tests train from, committed under ``tests/data/quick-world``.

Building them takes about a minute and a half on 2 cores, and a trained model's floats differ from CPU to CPU, so
the suite loads one committed copy (about 5 MB), the same on every machine. ``test_world.py`` checks that the copy is
what the current code builds: its settings are today's, and a fresh build writes the same corpus and pairs. After a
change to the world or to SAE training, rebuild it with ``make test-assets``.
"""

import json
import os
import shutil
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "quick-world")
SAE = "sae-topk"  # beside the world's own files
SAE_LAYER = 2


def world_settings(seed: int = 0) -> dict:
    """What a quick world's manifest records as its settings (the build's cache key)."""
    import dataclasses

    from featalign.world import WorldConfig
    from featalign.world.build import WORLD_VERSION

    return {"version": WORLD_VERSION, **dataclasses.asdict(WorldConfig.quick(seed))}


def train_config(world: dict, tmp_path, method: str, **kw):
    """A short training run on the quick world (out: ``tmp_path/method``); keyword arguments override."""
    from featalign.train import TrainConfig

    base = dict(
        method=method,
        model=world["sft"],
        data=world["train"],
        out=str(tmp_path / method),
        lr=1e-4,
        batch_size=8,
        max_steps=4,
        limit=96,
        max_length=96,
        max_prompt_length=24,
        progress=False,
        log_every=2,
        tensorboard=False,
    )
    return TrainConfig(**{**base, **kw})


def sae_config(world_dir: str, out: str, seed: int = 0):
    from featalign.sae.train import SAETrainConfig

    return SAETrainConfig(
        model=os.path.join(world_dir, "sft"),
        data=os.path.join(world_dir, "sft_text.jsonl"),
        layer=SAE_LAYER,
        out=out,
        d_sae=256,
        k=32,
        tokens=150_000,
        eval_tokens=20_000,
        seed=seed,
        progress=False,
    )


def sae_settings(seed: int = 0) -> dict:
    """The SAE's training settings that do not depend on where the world lies, and the trainer's version."""
    import dataclasses

    from featalign.sae.train import SAE_TRAIN_VERSION

    cfg = dataclasses.asdict(sae_config("", "", seed))
    return {
        "version": SAE_TRAIN_VERSION,
        **{k: v for k, v in cfg.items() if k not in ("model", "data", "out", "progress")},
    }


def committed_is_current() -> bool:
    """Whether the committed copy was built with today's world and SAE settings (seed 0)."""
    world = _read_json(os.path.join(ROOT, "world.json"))
    return (
        bool(world)
        and world["config"] == world_settings(0)
        and _read_json(os.path.join(ROOT, SAE, "settings.json")) == sae_settings(0)
    )


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return None


def build(out: str, seed: int = 0) -> None:
    """Build the quick world and its SAE in ``out`` (reused where already built with these settings)."""
    from featalign.sae.train import train_sae
    from featalign.world import WorldConfig, build_world

    build_world(out, WorldConfig.quick(seed), progress=False)
    sae_dir = os.path.join(out, SAE)
    if _read_json(os.path.join(sae_dir, "settings.json")) != sae_settings(seed):
        train_sae(sae_config(out, sae_dir, seed))
        with open(os.path.join(sae_dir, "settings.json"), "w") as f:
            json.dump(sae_settings(seed), f, indent=1)


def rebuild_committed() -> None:
    """Rebuild ``tests/data/quick-world`` from scratch (``make test-assets``)."""
    shutil.rmtree(ROOT, ignore_errors=True)
    build(ROOT)
    print(f"rebuilt {ROOT}: commit it")


if __name__ == "__main__":
    sys.exit(rebuild_committed())
