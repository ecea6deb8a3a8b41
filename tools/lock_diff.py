"""Print which packages an environment holds at versions other than the lock's: `make test-latest` uses it to say
what a move of the lock would change."""

import re
import sys


def versions(path: str) -> dict[str, str]:
    """name -> version for each ``name==version`` line (names normalised as pip does)."""
    out = {}
    for line in open(path):
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


if __name__ == "__main__":
    lock, now = versions(sys.argv[1]), versions(sys.argv[2])
    moved = [f"{n} {v} -> {now[n]}" for n, v in sorted(lock.items()) if n in now and now[n] != v]
    print("moved from the lock:", *(moved or ["nothing"]), sep="\n  ")
