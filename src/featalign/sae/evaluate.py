"""`featalign sae eval`: metrics as JSON and a table; ``--frontier`` sweeps the sparsity knob of the SAE at
inference (k for TopK, a threshold multiplier for JumpReLU) and plots MSE against L0."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from ..atomic import write_json
from ..config import Config, check_model_path, setting
from ..errors import ConfigError
from .formats import load_sae
from .metrics import OUTLIER_NORM, decoder_cosine_to_init, evaluate_sae, format_table
from .model import SAE, resolve_layer

# the sparsity knob's sweep when none is given: k for TopK, a multiplier of the learnt thresholds for JumpReLU
DEFAULT_FRONTIER = {"topk": [4.0, 8.0, 16.0, 32.0, 64.0], "jumprelu": [0.5, 0.75, 1.0, 1.5, 2.0]}


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
        r = evaluate_sae(
            with_sparsity(sae, v), model, tokenizer, docs, layer, max_tokens=max_tokens, outlier_norm=outlier_norm
        )
        rows.append({"value": v, **r})
    return rows


def plot_frontier(rows: list[dict], path: str, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([r["l0"] for r in rows], [r["normalized_mse"] for r in rows], "o-", label=label)
    for r in rows:
        ax.annotate(
            f"{r['value']:g}", (r["l0"], r["normalized_mse"]), textcoords="offset points", xytext=(3, 3), fontsize=8
        )
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("normalised MSE")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("SAE MSE vs L0 frontier")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class SAEEvalConfig(Config):
    """`featalign sae eval`: the SAE's metrics on held-out documents, written to <out>/eval.json."""

    sae: str = setting("", "SAE: SAELens, sparsify or Gemma Scope folder, or Gemma Scope params.npz")
    model: str = setting("", "the model whose layer the SAE reads: HF folder, hub id or .gguf file")
    data: str = setting("", "documents: text, conversations, prompt/response or preference records")
    layer: int | None = setting(None, "decoder layer (default: the layer the SAE records)")
    out: str | None = setting(None, "output folder (default: <sae>/eval)")
    max_tokens: int = setting(40_000, "held-out tokens to evaluate on", ge=1)
    outlier_norm: float = setting(
        OUTLIER_NORM,
        "leave out tokens whose residual norm exceeds this multiple of the batch median (0: keep all)",
        ge=0,
    )
    frontier: bool = setting(False, "also sweep the SAE's sparsity knob and plot MSE against L0")
    frontier_values: list[float] = setting(
        factory=list, help="k values (TopK) or threshold multipliers (JumpReLU) to sweep (default: 4-64, or 0.5-2)"
    )

    def validate(self) -> None:
        super().validate()
        if not (self.sae and self.model and self.data):
            raise ConfigError("sae eval needs sae, model and data (--sae, --model, --data)")
        check_model_path(self.model)
        check_model_path(self.sae, "sae")


def run_sae_eval(cfg: SAEEvalConfig) -> dict:
    """Evaluate ``cfg.sae`` (and its frontier when asked); the result is also written to ``<out>/eval.json``."""
    from ..data import read_documents
    from ..models import load_model, load_tokenizer

    cfg.validate()
    sae = load_sae(cfg.sae, cfg.layer)
    model = load_model(cfg.model).eval()
    tok = load_tokenizer(cfg.model)
    layer = resolve_layer(sae, cfg.layer, model, cfg.sae)
    docs = read_documents(cfg.data, tok)
    report = evaluate_sae(sae, model, tok, docs, layer, max_tokens=cfg.max_tokens, outlier_norm=cfg.outlier_norm)
    cos = decoder_cosine_to_init(sae)
    if cos is not None:  # only an SAE that records its training seed
        report["decoder_cosine_to_init"] = cos
    out = cfg.out or os.path.join(cfg.sae if os.path.isdir(cfg.sae) else os.path.dirname(cfg.sae), "eval")
    os.makedirs(out, exist_ok=True)
    result = {"sae": cfg.sae, "layer": layer, "out": out, **report}
    if cfg.frontier:
        values = cfg.frontier_values or DEFAULT_FRONTIER.get(sae.cfg.architecture, [1.0])  # ReLU: refused below
        rows = frontier(sae, model, tok, docs, layer, values, cfg.max_tokens, cfg.outlier_norm)
        result["frontier"] = rows
        plot_frontier(rows, os.path.join(out, "frontier.png"), os.path.basename(cfg.sae.rstrip("/")))
    write_json(os.path.join(out, "eval.json"), result)
    return result


def eval_lines(result: dict) -> list[str]:
    """The evaluation as a table, then the frontier's points, for the command line."""
    lines = [format_table({k: v for k, v in result.items() if k not in ("sae", "out", "frontier")})]
    if "frontier" in result:
        lines += ["", "frontier (knob, L0, normalised MSE):"]
        lines += [f"  {r['value']:g}  {r['l0']:.2f}  {r['normalized_mse']:.5f}" for r in result["frontier"]]
    return lines + ["", f"written to {result['out']}/eval.json"]
