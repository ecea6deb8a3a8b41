"""Shared fixtures: one quick world and one small SAE per test session (built in a temp folder).

``FEATALIGN_TEST_SEED`` (default 0) seeds the quick world and the SAE. Another seed trains other weights, much as
another CPU type or thread count does, so ``FEATALIGN_TEST_SEED=1 make test`` checks that no assertion hinges on
the exact weights this machine trained. ``FEATALIGN_TEST_WORLD=DIR`` keeps the quick world between runs. Tests that hold a trained model to a threshold print the figure (see
``margin``), so ``pytest -rP`` shows how far each one is from its bound.
"""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
except ImportError:  # pragma: no cover
    pass


SEED = int(os.environ.get("FEATALIGN_TEST_SEED", "0"))


def margin(name: str, value: float, bound: float, above: bool = True) -> None:
    """Print a trained figure beside its bound (``pytest -rP`` shows it), then assert it."""
    print(f"margin: {name} = {value:.4g} ({'>' if above else '<'} {bound:g})")
    assert (value > bound) if above else (value < bound), f"{name} = {value} is not {'above' if above else 'below'} {bound}"


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    from featalign.world import WorldConfig, build_world, world_paths

    # FEATALIGN_TEST_WORLD: a folder to build the quick world in once and reuse across runs (a developer's shortcut;
    # the build is keyed on its settings, so a stale folder is rebuilt, never reused)
    out = os.environ.get("FEATALIGN_TEST_WORLD") or str(tmp_path_factory.mktemp("world") / "w")
    manifest = build_world(out, WorldConfig.quick(SEED), progress=False)
    return {**world_paths(out), "manifest": manifest}


@pytest.fixture(scope="session")
def world_sae(world, tmp_path_factory):
    from featalign.sae.train import SAETrainConfig, train_sae

    out = str(tmp_path_factory.mktemp("sae") / "topk")
    _, report = train_sae(SAETrainConfig(model=world["sft"], data=world["sft_text"], layer=2, out=out, d_sae=256, k=32,
                                         tokens=150_000, eval_tokens=20_000, seed=SEED, progress=False))
    return {"path": out, "report": report, "layer": 2}
