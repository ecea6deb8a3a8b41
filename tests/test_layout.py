"""The code's shape: one concern per module, so no module under src/ grows past 450 lines."""

import pathlib

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "featalign"


def test_no_module_is_over_450_lines():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert len(sizes) > 30  # the walk found the package
    assert {p: n for p, n in sizes.items() if n > 450} == {}
