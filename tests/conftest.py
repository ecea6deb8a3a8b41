"""Shared fixtures: one quick world and one small SAE per test session (built in a temp folder)."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    from featalign.world import WorldConfig, build_world, world_paths

    out = str(tmp_path_factory.mktemp("world") / "w")
    manifest = build_world(out, WorldConfig.quick(), progress=False)
    return {**world_paths(out), "manifest": manifest}


@pytest.fixture(scope="session")
def world_sae(world, tmp_path_factory):
    from featalign.sae.train import SAETrainConfig, train_sae

    out = str(tmp_path_factory.mktemp("sae") / "topk")
    _, report = train_sae(SAETrainConfig(model=world["sft"], data=world["sft_text"], layer=2, out=out, d_sae=256, k=32,
                                         tokens=150_000, eval_tokens=20_000, progress=False))
    return {"path": out, "report": report, "layer": 2}
