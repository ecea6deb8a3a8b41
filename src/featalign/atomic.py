"""Write-then-rename for folders, so a crash never leaves a half-written checkpoint, SAE or world."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable


def replace_dir(tmp: str, final: str) -> None:
    """Put the finished folder ``tmp`` at ``final``; an existing ``final`` is moved aside first, so
    there is no moment with neither the old nor the new folder in place."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    old = f"{final.rstrip('/')}.old-{os.getpid()}"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def atomic_file(final: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temp path beside ``final``, then rename it into place."""
    tmp = f"{final}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, final)


def write_json(path: str, obj, indent: int | None = 2) -> None:
    """``obj`` as JSON at ``path``, written atomically."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)

    atomic_file(path, write)


def atomic_dir(final: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a fresh temp folder beside ``final``, then move it into place."""
    tmp = f"{final.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    replace_dir(tmp, final)
