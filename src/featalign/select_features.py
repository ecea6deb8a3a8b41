"""`featalign select-features`: the SAE features whose activation differs most between the chosen and the rejected
answers of a preference set, with the tokens that carry them and how often they fire on each side.

Its ``features.json`` is the file the feature controls read (``--ablate-features``, ``--preserve-features``,
``--suppress-features``): a researcher looks at ``features.md``, deletes from the ``features`` list the features
that are the task itself, and trains with the rest. A feature that fires on nearly every chosen answer and few
rejected ones, on one token, is the signature of a cue the annotators rewarded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import data as D
from .atomic import write_json
from .config import check_model_path, setting
from .errors import ConfigError
from .features import describe_features, load_sae_at, pooled_features, table_cells
from .models import load_model, load_tokenizer


@dataclass
class SelectFeaturesConfig(D.DataOptions):
    """`featalign select-features`: the features that tell chosen from rejected answers, for the feature controls."""

    model: str = setting("", "the model whose layer the SAE reads (usually the SFT model): HF folder, hub id or .gguf")
    sae: str = setting("", "SAE: SAELens, sparsify or Gemma Scope folder, or params.npz")
    layer: int | None = setting(None, "decoder layer the SAE reads (default: the layer the SAE records)")
    out: str = setting("runs/select", "output folder (features.json, features.md)")
    limit: int | None = setting(500, "use only the first N clean pairs", ge=1)
    top: int = setting(20, "features listed, largest |t| first", ge=1)
    batch_size: int = setting(32, "sequences per forward pass", ge=1)

    def validate(self) -> None:
        super().validate()
        if not (self.model and self.sae and self.data):
            raise ConfigError("select-features needs model, sae and data (--model, --sae, --data)")
        check_model_path(self.model)


@torch.no_grad()
def run_select_features(cfg: SelectFeaturesConfig, model=None, tokenizer=None) -> dict:
    """Rank features by the paired t statistic of (chosen - rejected) pooled activation over the pairs; describe the
    top ones. The result is also written to ``<out>/features.json`` and ``<out>/features.md``."""
    cfg.validate()
    tok = tokenizer or load_tokenizer(cfg.model)
    model = (model if model is not None else load_model(cfg.model)).eval()
    sae, layer = load_sae_at(cfg.sae, cfg.layer, model)
    _, pairs, _ = D.prepare_pairs(cfg, tok)
    if len(pairs) < 2:
        raise ConfigError(f"{cfg.data}: select-features needs at least 2 pairs, has {len(pairs)}")
    seqs = D.pair_sequences(pairs)  # every chosen answer, then every rejected one
    pooled = pooled_features(model, sae, layer, seqs, tok.pad_token_id, cfg.batch_size)
    n = len(pairs)
    chosen, rejected = pooled[:n], pooled[n:]
    diff = chosen - rejected
    se = diff.std(0) / n**0.5
    t = torch.where(se > 0, diff.mean(0) / se.clamp(min=1e-12), torch.zeros_like(se))
    order = t.abs().argsort(descending=True)[: cfg.top].tolist()
    desc = describe_features(model, sae, layer, seqs, order, tok, batch_size=cfg.batch_size)
    rows = [
        {
            "feature": f,
            "mean_diff": float(diff[:, f].mean()),
            "t": float(t[f]),
            "fires_on_chosen": float((chosen[:, f] > 0).float().mean()),
            "fires_on_rejected": float((rejected[:, f] > 0).float().mean()),
            **desc[f],
        }
        for f in order
    ]
    result = {
        "model": cfg.model,
        "sae": cfg.sae,
        "layer": layer,
        "data": cfg.data,
        "pairs": n,
        "features": order,
        "rows": rows,
    }
    os.makedirs(cfg.out, exist_ok=True)
    write_json(os.path.join(cfg.out, "features.json"), result)
    with open(os.path.join(cfg.out, "features.md"), "w") as f:
        f.write(select_table(result) + "\n")
    return result


def select_table(result: dict) -> str:
    lines = [
        f"Features at layer {result['layer']} that tell chosen from rejected answers ({result['pairs']} pairs; paired "
        "t of chosen - rejected pooled activation). Delete the task's own features from `features` in features.json, "
        "then train with `--ablate-features`, `--preserve-features` or `--suppress-features` on that file.",
        "",
        "| feature | mean diff | t | on chosen | on rejected | top tokens (share of activation) | context |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        toks, ctx = table_cells(r)
        share = f"{r['fires_on_chosen']:.0%} | {r['fires_on_rejected']:.0%}"
        lines.append(f"| {r['feature']} | {r['mean_diff']:+.4f} | {r['t']:+.1f} | {share} | {toks} | {ctx} |")
    return "\n".join(lines)
