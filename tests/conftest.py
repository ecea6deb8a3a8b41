"""Shared fixtures: the quick world and a small SAE on it, once per test session, in a temp folder.

``FEATALIGN_TEST_SEED`` (default 0) seeds the quick world and the SAE. Seed 0 copies the committed build
(``tests/data/quick-world``, see ``quick_world.py``); another seed builds and trains its own, on this CPU, so
``FEATALIGN_TEST_SEED=1 make test`` checks that no assertion hinges on the exact weights of the committed copy.
``FEATALIGN_TEST_WORLD=DIR`` keeps a seed's build between runs. Tests that hold a trained model to a threshold print
the figure (see ``margin``), so ``pytest -rP`` shows how far each one is from its bound.
"""

import json
import os
import shutil

import pytest
import quick_world

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
    assert (value > bound) if above else (value < bound), (
        f"{name} = {value} is not {'above' if above else 'below'} {bound}"
    )


@pytest.fixture(scope="session", autouse=True)
def _cache_root(tmp_path_factory):
    """featalign's per-machine cache (GGUF conversions) in the session's temp folder: the suite leaves no trace in
    the user's ~/.cache, and converts each GGUF file once per session."""
    old = os.environ.get("FEATALIGN_CACHE")
    os.environ["FEATALIGN_CACHE"] = str(tmp_path_factory.mktemp("featalign-cache"))
    yield
    if old is None:
        os.environ.pop("FEATALIGN_CACHE", None)
    else:
        os.environ["FEATALIGN_CACHE"] = old


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    from featalign.world import world_paths

    # a copy, never the committed folder itself: compare writes its SAEs into the world's folder
    out = os.environ.get("FEATALIGN_TEST_WORLD") or str(tmp_path_factory.mktemp("world") / "w")
    if SEED == 0 and quick_world.committed_is_current() and not os.path.exists(os.path.join(out, "world.json")):
        shutil.copytree(quick_world.ROOT, out, dirs_exist_ok=True)
    quick_world.build(out, SEED)  # a copy of today's settings is reused as is; otherwise built here
    with open(os.path.join(out, "world.json")) as f:
        manifest = json.load(f)
    return {**world_paths(out), "manifest": manifest}


@pytest.fixture(scope="session")
def world_sae(world):
    path = os.path.join(world["root"], quick_world.SAE)
    with open(os.path.join(path, "eval.json")) as f:
        report = json.load(f)
    return {"path": path, "report": report, "layer": quick_world.SAE_LAYER}
