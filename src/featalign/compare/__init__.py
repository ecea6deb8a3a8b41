"""The main job: reward-vs-KL frontiers of every method, trained from one SFT model on one budget.

Each method is trained at several values of its KL knob and several seeds. One point per method cannot compare
methods that sit at different KLs; a frontier can: the judged reward is interpolated at common KL levels, per seed,
and compared there with its spread across seeds. The parts: ``budget`` (settings, tiers), ``sources`` (what is
trained from and judged on), ``sweep`` (the runs), ``stats`` (frontiers and their noise), ``report`` and ``plots``.
Output folder: ``report.md``, ``results.json`` (every figure), ``frontier.png``, ``curves.png``, ``runs/``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict

from .budget import ALL_METHODS, KNOB, Budget, CompareConfig
from .report import report_lines, summary_lines, verdict, write_report
from .sources import Source, make_source, task_source, user_source, world_source
from .stats import default_levels, frontier, summarise_points
from .sweep import sweep


def run_compare(cfg: CompareConfig, src: Source | None = None) -> dict:
    """Sweep, summarise and report; returns every figure (also written to ``<out>/results.json``)."""
    cfg.validate()
    t0 = time.time()
    b = cfg.budget()
    os.makedirs(cfg.out, exist_ok=True)
    src = src or make_source(cfg)
    runs = sweep(cfg, src)
    results = {
        "config": asdict(cfg),
        "budget": asdict(b),
        "source": asdict(src),
        "runs": runs,
        "points": summarise_points(runs),
    }
    results["frontier"] = frontier(runs, cfg.kl_levels or None)
    results["total_seconds"] = round(time.time() - t0, 1)
    write_report(cfg, results)
    return results


__all__ = [
    "ALL_METHODS",
    "KNOB",
    "Budget",
    "CompareConfig",
    "Source",
    "default_levels",
    "frontier",
    "make_source",
    "report_lines",
    "run_compare",
    "task_source",
    "summarise_points",
    "summary_lines",
    "sweep",
    "user_source",
    "verdict",
    "world_source",
    "write_report",
]
