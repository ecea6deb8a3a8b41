"""The manual: generated pages are current, the site builds strictly, every command it shows parses, and the
Python API page's script runs."""

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)) + [os.path.join(ROOT, "README.md")]


def test_generated_pages_are_current():
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "gen_docs.py"), "--check"], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr


def test_site_builds_strictly(tmp_path):
    """No broken link or anchor, no page outside the nav (mkdocs.yml's validation settings, made errors by --strict)."""
    pytest.importorskip("mkdocs", reason="mkdocs (docs extra) is not installed")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-q",
            "-f",
            os.path.join(ROOT, "mkdocs.yml"),
            "-d",
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        cwd=ROOT,  # the snippets (the API page's script) are read relative to the repository
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists()


def commands(text: str) -> list[str]:
    """The `featalign ...` command lines of a page's shell code blocks, continuation lines joined, comments dropped."""
    out, lang, block = [], None, []
    for line in text.splitlines():
        fence = line.strip().startswith("```")
        if fence and lang is None:
            lang, block = line.strip()[3:].strip() or "text", []
        elif fence:
            if lang in ("bash", "sh", "console", "shell"):
                for cmd in "\n".join(block).replace("\\\n", " ").splitlines():
                    cmd = cmd.strip().removeprefix("$ ")
                    if cmd.startswith("featalign "):
                        out.append(cmd.split(" #")[0].strip())
            lang = None
        elif lang is not None:
            block.append(line)
    return out


def test_every_command_in_the_docs_parses():
    """Each command shown names a command that exists and only flags it has, with values of the right type."""
    from featalign.cli import build_parser

    parser = build_parser()
    bad = []
    seen = 0
    for page in PAGES:
        for line in commands(open(page).read()):
            args = shlex.split(line)[1:]
            if "--help" in args or "-h" in args:
                continue
            seen += 1
            try:
                parser.parse_args(args)
            except SystemExit:
                bad.append(f"{os.path.relpath(page, ROOT)}: {line}")
    assert seen > 10, "the docs should show the commands"
    assert not bad, "\n".join(bad)


def test_no_history_in_code_or_manual():
    """Issue numbers and session history belong in CHANGELOG.md, not in the code, the README or the manual."""
    files = PAGES + glob.glob(os.path.join(ROOT, "src", "**", "*.py"), recursive=True)
    found = [
        f"{os.path.relpath(f, ROOT)}: {m.group(0)}"
        for f in files
        for m in re.finditer(r"(?i)\bissues? #?\d+\b", open(f).read())
    ]
    assert not found, found


def test_readme_is_short():
    assert sum(1 for _ in open(os.path.join(ROOT, "README.md"))) <= 200


@pytest.mark.slow
def test_python_api_example_runs(world, tmp_path):
    """The script the Python API page shows, on the quick world, with a few training steps."""
    import runpy

    main = runpy.run_path(os.path.join(ROOT, "examples", "python_api.py"))["main"]
    res = main(world["root"], str(tmp_path / "api"), steps=4)
    assert res["train"]["steps"] == 4 and not res["train"]["reference_model_loaded"]
    assert res["eval"]["n_generations"] == 32 and "win_rate" in res["eval"]
    assert (tmp_path / "api" / "explain" / "explain.json").exists()
