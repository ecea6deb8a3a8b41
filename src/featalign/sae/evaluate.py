"""`featalign sae eval`: metrics as JSON and a table; ``--frontier`` sweeps the sparsity knob of the SAE at
inference (k for TopK, a threshold multiplier for JumpReLU) and plots MSE against L0."""

from __future__ import annotations

import copy
import json
import os

import torch

from ..errors import ConfigError
from .metrics import OUTLIER_NORM, decoder_cosine_to_init, evaluate_sae, format_table
from .model import SAE, load_sae, resolve_layer


def with_sparsity(sae: SAE, value: float) -> SAE:
    """A copy of ``sae`` at another point of its sparsity knob: k for TopK, threshold x value for JumpReLU."""
    s = copy.deepcopy(sae)
    if sae.cfg.architecture == "topk":
        s.cfg.k = int(value)
    elif sae.cfg.architecture == "jumprelu":
        with torch.no_grad():
            s.threshold.mul_(value)
    else:
        raise ConfigError("--frontier needs a TopK or JumpReLU SAE (a ReLU SAE has no inference-time sparsity knob)")
    return s


def frontier(sae, model, tokenizer, docs, layer, values, max_tokens, outlier_norm: float = OUTLIER_NORM) -> list[dict]:
    rows = []
    for v in values:
        r = evaluate_sae(with_sparsity(sae, v), model, tokenizer, docs, layer, max_tokens=max_tokens, outlier_norm=outlier_norm)
        rows.append({"value": v, **r})
    return rows


def plot_frontier(rows: list[dict], path: str, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([r["l0"] for r in rows], [r["normalized_mse"] for r in rows], "o-", label=label)
    for r in rows:
        ax.annotate(f"{r['value']:g}", (r["l0"], r["normalized_mse"]), textcoords="offset points", xytext=(3, 3), fontsize=8)
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("normalised MSE")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("SAE MSE vs L0 frontier")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_eval(ns) -> dict:
    from ..models import load_model, load_tokenizer
    from .train import read_texts

    sae = load_sae(ns.sae, ns.layer)
    model = load_model(ns.model).eval()
    tok = load_tokenizer(ns.model)
    layer = resolve_layer(sae, ns.layer, model, ns.sae)
    docs = read_texts(ns.data, tok)
    report = evaluate_sae(sae, model, tok, docs, layer, max_tokens=ns.max_tokens, outlier_norm=ns.outlier_norm)
    cos = decoder_cosine_to_init(sae)
    if cos is not None:  # only an SAE that records its training seed
        report["decoder_cosine_to_init"] = cos
    out = ns.out or os.path.join(ns.sae if os.path.isdir(ns.sae) else os.path.dirname(ns.sae), "eval")
    os.makedirs(out, exist_ok=True)
    result = {"sae": ns.sae, "layer": layer, **report}
    if ns.frontier:
        values = [float(v) for v in ns.frontier_values.split(",")]
        rows = frontier(sae, model, tok, docs, layer, values, ns.max_tokens, ns.outlier_norm)
        result["frontier"] = rows
        plot_frontier(rows, os.path.join(out, "frontier.png"), os.path.basename(ns.sae.rstrip("/")))
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(format_table(report))
    if ns.frontier:
        print("\nfrontier (knob, L0, normalised MSE):")
        for r in result["frontier"]:
            print(f"  {r['value']:g}  {r['l0']:.2f}  {r['normalized_mse']:.5f}")
    print(f"\nwritten to {out}/eval.json")
    return result
