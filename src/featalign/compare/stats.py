"""The statistics of a sweep: each knob value's mean and spread over seeds, and each method's reward interpolated at
common KL levels, with a standard error that counts both the seeds' spread and the prompts' sampling noise."""

from __future__ import annotations

import math

METRICS = [
    "pref_accuracy",
    "reward_accuracy",
    "gt_reward",
    "win_rate_vs_sft",
    "lc_win_rate_vs_sft",
    "entropy",
    "distinct1",
    "distinct2",
    "kl_to_ref",
    "feature_mse",
    "wall_seconds",
    "peak_memory_mb",
    "gt_topic",
    "gt_sentiment",
    "gt_length",
    "gt_pos",
    "gt_neg",
    "mean_length",
    "reward_se",
    "win_rate_se",
    "lc_win_rate_se",
]


def _mean_sd(vals: list[float]) -> dict:
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "sd": sd, "n": len(vals)}


def summarise_points(runs: list[dict]) -> list[dict]:
    """One row per (method, knob value): every metric's mean and spread across seeds."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["method"], r["value"]), []).append(r)
    out = []
    for (m, v), rs in groups.items():
        row = {"method": m, "knob": rs[0]["knob"], "value": v}
        parts = sorted({k for r in rs for k in r if k.startswith("gt_")} - set(METRICS))  # the judge's own parts
        for key in METRICS + parts:
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                row[key] = _mean_sd(vals)
        out.append(row)
    return out


def _prompt_se(rewards: list[float]) -> float:
    return _mean_sd(rewards)["sd"] / math.sqrt(len(rewards))


def _interp(points: list[tuple[float, float, float]], x: float) -> tuple[float, float] | None:
    """Linear interpolation of (reward, its prompt SE) at KL ``x`` over (kl, reward, se) points; None outside them."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0, s0), (x1, y1, s1) in zip(pts, pts[1:] + pts[-1:]):
        if x0 <= x <= x1:
            w = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return y0 + w * (y1 - y0), s0 + w * (s1 - s0)
    return None


def default_levels(per: dict, n_levels: int = 6) -> list[float]:
    """KL levels evenly over the span where at least two methods have a seed (the only KLs where methods can be
    compared; a method alone elsewhere is still drawn in frontier.png); with one method, or no overlap, over the
    span of every KL reached. ``per``: method -> seed -> [(kl, ...)]."""
    spans = {
        m: (min(p[0] for pts in seeds.values() for p in pts), max(p[0] for pts in seeds.values() for p in pts))
        for m, seeds in per.items()
        if seeds
    }
    edges = sorted({x for span in spans.values() for x in span})
    shared = [(a, b) for a, b in zip(edges, edges[1:]) if sum(lo <= a and b <= hi for lo, hi in spans.values()) >= 2]
    if shared:
        lo, hi = shared[0][0], shared[-1][1]
    else:
        lo, hi = (edges[0], edges[-1]) if edges else (0.0, 0.0)
    return [float(f"{lo + (hi - lo) * (i + 0.5) / n_levels:.3g}") for i in range(n_levels)] if hi > lo else []


def frontier(runs: list[dict], levels: list[float] | None = None, n_levels: int = 6) -> dict:
    """Ground-truth reward of each method at common KL levels, interpolated along each seed's own frontier
    (its knob values), then averaged over the seeds that reach the level. The noise of a method at a level is
    SE = sqrt((sd over seeds^2 + prompt SE^2) / n): the seeds' spread, plus the sampling noise of the prompts
    so that one seed is not taken as noise-free. The best method at a level is named only when it beats every
    other by more than 2 combined SEs; otherwise the level is 'inside the noise'."""
    per: dict = {}
    for r in runs:
        if r["method"] != "sft" and r.get("kl_to_ref") is not None:
            per.setdefault(r["method"], {}).setdefault(r["seed"], []).append(
                (r["kl_to_ref"], r["gt_reward"], _prompt_se(r["rewards_per_prompt"]))
            )
    if levels is None:
        levels = default_levels(per, n_levels)
    rows = []
    for x in levels:
        cells = {}
        for m, seeds in per.items():
            got = [v for v in (_interp(pts, x) for pts in seeds.values()) if v is not None]
            if got:
                ms = _mean_sd([g[0] for g in got])
                pse2 = sum(g[1] ** 2 for g in got) / len(got)
                cells[m] = {**ms, "se": math.sqrt((ms["sd"] ** 2 + pse2) / ms["n"])}
        row = {"kl": x, "methods": cells, "best": None, "inside_noise": []}
        if len(cells) >= 2:
            best = max(cells, key=lambda m: cells[m]["mean"])
            close = [
                m
                for m in cells
                if m != best
                and cells[best]["mean"] - cells[m]["mean"]
                <= 2 * math.sqrt(cells[best]["se"] ** 2 + cells[m]["se"] ** 2)
            ]
            row["best"] = None if close else best
            row["inside_noise"] = [best] + close if close else []
            row["leader"] = best
        if "dpo" in cells:
            d = cells["dpo"]
            row["minus_dpo"] = {
                m: {
                    "diff": c["mean"] - d["mean"],
                    "se": math.sqrt(c["se"] ** 2 + d["se"] ** 2),
                    "within_noise": abs(c["mean"] - d["mean"]) <= 2 * math.sqrt(c["se"] ** 2 + d["se"] ** 2),
                }
                for m, c in cells.items()
                if m != "dpo"
            }
        rows.append(row)
    return {"levels": rows, "methods": sorted(per)}
