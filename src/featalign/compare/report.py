"""The comparison's report: ``report.md`` (verdict at matched KL, every knob value, the budget, the SAE) and
``results.json`` (every figure), and the verdict section the command prints."""

from __future__ import annotations

import os

from ..atomic import write_json
from .budget import KNOB, CompareConfig
from .plots import plot

SE_OF = {"gt_reward": "reward_se", "win_rate_vs_sft": "win_rate_se", "lc_win_rate_vs_sft": "lc_win_rate_se"}


def format_cell(d: dict | None, digits: int = 3, se: dict | None = None) -> str:
    """mean ± sd over seeds; with one seed, mean ± its standard error over prompts where one is known."""
    if not d:
        return "-"
    s = f"{d['mean']:.{digits}f}"
    if d.get("n", 1) > 1:
        return s + f" ± {d['sd']:.{digits}f}"
    return s + (f" ± {se['mean']:.{digits}f} SE" if se and se["mean"] > 0 else "")


def verdict(row: dict) -> str:
    if row.get("best"):
        return f"**{row['best']}**"
    if row.get("inside_noise"):
        return "inside the noise (" + ", ".join(row["inside_noise"]) + ")"
    return "-"


NO_FRONTIER = (
    "No frontier: a method's reward at a common KL is interpolated between two or more of its knob values, and this "
    "sweep ran one per method (`--full`, or `--grid 'dpo=0.05,0.1,0.3;...'`, sweeps more). Read the points below, "
    "each with its own KL."
)
HOW = (
    "Reward of each method's frontier interpolated at common KL levels (per seed, between that seed's knob values; "
    "never extrapolated), mean ± sd over the seeds that reach the level. 'best' needs a lead over every other method "
    "of more than 2 SE, SE = sqrt((sd² + prompt-sampling SE²) / n seeds); otherwise the methods within 2 SE of the "
    "leader are 'inside the noise'."
)
POINTS = "## Every knob value (mean ± sd over seeds)"


def _verdict_lines(results: dict) -> list[str]:
    """The reward of every method at each matched KL, the verdict, and each method minus DPO."""
    fr, n_seeds = results["frontier"], results["budget"]["seeds"]
    methods = fr["methods"]
    levels = fr["levels"] if any(row["methods"] for row in fr["levels"]) else []
    if not levels:
        return [NO_FRONTIER]
    lines = [HOW, "", "| KL to SFT | " + " | ".join(methods) + " | best |", "|---" * (len(methods) + 2) + "|"]
    for row in levels:
        cells = []
        for m in methods:
            cell = row["methods"].get(m)
            cells.append(format_cell(cell) + (f" (n={cell['n']})" if cell and cell["n"] < n_seeds else ""))
        lines.append(f"| {row['kl']:.3g} | " + " | ".join(cells) + f" | {verdict(row)} |")
    diffs = [(row["kl"], m, d) for row in fr["levels"] for m, d in row.get("minus_dpo", {}).items()]
    if diffs:
        lines += ["", "Each method minus DPO at the same KL (± combined SE):", ""]
        for kl, m, d in diffs:
            where = "inside" if d["within_noise"] else "outside"
            lines.append(f"- KL {kl:.3g}: {m} - dpo = {d['diff']:+.3f} ± {d['se']:.3f} ({where} the noise)")
    return lines


def _point_lines(cfg: CompareConfig, results: dict) -> list[str]:
    """One row per (method, knob value): every metric, mean ± sd over seeds."""
    world = cfg.preset == "world" and not cfg.model
    parts = [("sentiment", "gt_sentiment", 3), ("topic", "gt_topic", 3)] if world else []
    cols = [
        ("pref acc", "pref_accuracy", 3),
        ("reward acc", "reward_accuracy", 3),
        ("GT reward", "gt_reward", 3),
        *parts,
        ("win vs SFT", "win_rate_vs_sft", 3),
        ("LC win", "lc_win_rate_vs_sft", 3),
        ("entropy", "entropy", 3),
        ("distinct-2", "distinct2", 3),
        ("KL to SFT", "kl_to_ref", 2),
        ("feature MSE", "feature_mse", 3),
        ("wall s", "wall_seconds", 1),
    ]
    lines = [POINTS, "", "| method | knob | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for row in results["points"]:
        knob = "-" if row["knob"] is None else f"{row['knob']}={row['value']:g}"
        cells = [format_cell(row.get(k), d, row.get(SE_OF.get(k, ""))) for _, k, d in cols]
        lines.append(f"| {row['method']} | {knob} | " + " | ".join(cells) + " |")
    return lines


def _model_name(src: dict) -> str:
    """The starting model as the user named it; a GGUF conversion in featalign's cache by its folder name, not this
    machine's path to it."""
    from ..models import cache_root

    named = (src.get("info") or {}).get("model")
    if named:
        return named
    sft = src["sft"]
    return os.path.basename(sft.rstrip("/")) if os.path.abspath(sft).startswith(cache_root()) else sft


def _settings_lines(cfg: CompareConfig, results: dict) -> list[str]:
    """The judge, the budget, the generation settings and the SAE."""
    b, src = results["budget"], results["source"]
    grid = "; ".join(f"{m} {KNOB[m]} {', '.join(f'{v:g}' for v in vals)}" for m, vals in b["grid"].items())
    simpo = f" (SimPO {b['simpo_lr']:g})" if "simpo" in b["grid"] and b.get("simpo_lr", b["lr"]) != b["lr"] else ""
    lines = [
        f"Judge (the ground truth here): {src['reward_fn'] or src['reward_model']}. "
        f"Starting model: {_model_name(src)}.",
        "",
        f"Budget: {b['steps']} steps x batch {b['batch_size']} pairs per run, lr {b['lr']}{simpo}; grid {grid}; "
        f"TR-DPO tau {b['trdpo_tau']}, alpha {cfg.trdpo_alpha}; FPO k={cfg.k} at layer {src['layer']}. Generations: "
        f"{b['n_prompts']} held-out prompts per run, temperature 1.0, no top-k, max {b['max_new_tokens']} new tokens, "
        "sampling seed 1234 + training seed. KL: sequence KL(policy || SFT) on the policy's own samples. Feature MSE: "
        "FPO's D on held-out chosen responses.",
        "",
    ]
    sae, sc = src["info"].get("sae", {}), src["info"].get("sae_config", {})
    if sae:
        cos = sae.get("decoder_cosine_to_init")
        names = {"topk": "TopK", "batchtopk": "BatchTopK", "featurechoice": "Feature Choice"}
        arch = names.get(sc.get("architecture", "topk"), sc.get("architecture"))
        arch += f" with Zipf {sc['fc_zipf']:g} token shares" if sc.get("fc_zipf") else ""
        lines += [
            f"SAE ({arch}, layer {src['layer']}, {sc.get('d_sae')} latents, k={sc.get('k')}, "
            f"{sc.get('tokens', 0):,} tokens): explained variance {sae['explained_variance']:.3f}, L0 {sae['l0']:.1f}, "
            f"dead {sae['dead_fraction']:.1%}, dense (>10% of tokens) {sae.get('dense_fraction', float('nan')):.1%}, "
            f"CE loss recovered {sae['ce_loss_recovered']:.3f}"
            + (f", median decoder cosine to init {cos:.2f}." if cos is not None else "."),
            "",
        ]
    reused = sum(r["reused"] for r in results["runs"])
    total = f"Total time {results['total_seconds']:.0f} s."
    return lines + [f"Runs: {len(results['runs'])} ({reused} reused from an earlier sweep). {total}"]


def report_lines(cfg: CompareConfig, results: dict) -> list[str]:
    b = results["budget"]
    head = [
        f"# featalign compare ({b['tier']} tier, {b['seeds']} seed(s) per knob value)",
        "",
        "## Ground-truth reward at matched KL",
        "",
    ]
    figures = ["", "![reward vs KL frontier](frontier.png)", "", "![training curves](curves.png)"]
    return (
        head
        + _verdict_lines(results)
        + [""]
        + _point_lines(cfg, results)
        + [""]
        + _settings_lines(cfg, results)
        + figures
    )


def write_report(cfg: CompareConfig, results: dict) -> None:
    write_json(os.path.join(cfg.out, "results.json"), results, indent=1)
    lines = report_lines(cfg, results)
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(cfg, results)


def summary_lines(cfg: CompareConfig, results: dict) -> list[str]:
    """The report's verdict section and where the whole report is, for the command line."""
    lines = report_lines(cfg, results)
    return lines[: lines.index(POINTS)] + [f"report: {os.path.join(cfg.out, 'report.md')}"]
