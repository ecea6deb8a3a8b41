"""Copy a `featalign compare` report and its figures into the manual, so the docs show what the command wrote.

Usage: python tools/publish_report.py reports/sentiment-full sentiment-full
  -> docs/results/sentiment-full-report.md, sentiment-full-frontier.png, sentiment-full-curves.png
"""

from __future__ import annotations

import argparse
import os
import re
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")


def publish(report_dir: str, name: str) -> list[str]:
    src = os.path.join(report_dir, "report.md")
    if not os.path.exists(src):
        raise SystemExit(f"{src}: no report.md (has `featalign compare --out {report_dir}` finished?)")
    text = open(src).read()
    written = []
    for fig in re.findall(r"\]\(([\w.-]+\.png)\)", text):
        shutil.copyfile(os.path.join(report_dir, fig), os.path.join(RESULTS, f"{name}-{fig}"))
        text = text.replace(f"]({fig})", f"]({name}-{fig})")
        written.append(f"{name}-{fig}")
    with open(os.path.join(RESULTS, f"{name}-report.md"), "w") as f:
        f.write(text)
    return [f"{name}-report.md", *written]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report_dir", help="a compare --out folder holding report.md")
    ap.add_argument("name", help="the prefix of the files in docs/results/")
    a = ap.parse_args()
    print("wrote", ", ".join(os.path.join("docs/results", f) for f in publish(a.report_dir, a.name)))


if __name__ == "__main__":
    main()
