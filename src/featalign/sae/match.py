"""SAE Match: one-to-one matching of the latents of two SAEs (adjacent layers, or two seeds of one layer).

Parameters are first *folded* so that scales are comparable: a JumpReLU threshold theta_i is moved into the
weights (W_enc[:, i] /= theta_i, b_enc[i] /= theta_i, W_dec[i] *= theta_i), which leaves the reconstruction
unchanged and gives every latent threshold 1. TopK and ReLU SAEs have no threshold and fold to themselves.
The cost of pairing latent i of A with latent j of B is the mean squared difference of their folded decoder
rows (plus, optionally, of their encoder columns), and the matching is the optimal assignment.

Scale: a dense cost matrix is d_sae_A x d_sae_B float64 (2 GiB at 16k x 16k) and the dense Hungarian solve is
cubic, so above ``dense_limit`` latents the cost is sparsified: each latent keeps its ``candidates`` cheapest
partners (in both directions, computed in blocks on torch), and the sparse graph is solved exactly with
``scipy.sparse.csgraph.min_weight_full_bipartite_matching`` (LAPJVsp). If that graph has no full matching the
candidate lists are doubled and it is solved again, so the answer is always a complete one-to-one matching.
It is the optimum over the candidate pairs: it equals the dense optimum unless that needs a pair outside both
latents' candidate lists, which happens only among poorly matched latents (costs near the random-pair scale).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..atomic import write_json
from ..config import Config, check_model_path, setting
from ..errors import ConfigError
from .metrics import OUTLIER_NORM, typical_tokens
from .model import SAE


@dataclass
class Folded:
    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]


def fold(sae: SAE) -> Folded:
    """Fold the JumpReLU threshold into the weights (identity for TopK/ReLU)."""
    W_enc, b_enc, W_dec = sae.W_enc.detach().float(), sae.b_enc.detach().float(), sae.W_dec.detach().float()
    if sae.cfg.architecture == "jumprelu":
        theta = sae.threshold.detach().float()
        if (theta <= 0).any():
            raise ConfigError(f"cannot fold a JumpReLU SAE with {(theta <= 0).sum().item()} non-positive thresholds")
        W_enc, b_enc, W_dec = W_enc / theta, b_enc / theta, W_dec * theta[:, None]
    return Folded(W_enc, b_enc, W_dec, sae.b_dec.detach().float())


def folded_features(sae: SAE, f: torch.Tensor) -> torch.Tensor:
    """Activations in folded units (``f / theta`` for JumpReLU), so that ``features @ fold(sae).W_dec`` decodes."""
    return f / sae.threshold.detach() if sae.cfg.architecture == "jumprelu" else f


def _vectors(fa: Folded, fb: Folded, encoder: bool) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = fa.W_dec, fb.W_dec
    if encoder:
        a, b = torch.cat([a, fa.W_enc.T], 1), torch.cat([b, fb.W_enc.T], 1)
    return a, b


def _mse_block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of every row of ``a`` with every row of ``b``."""
    d2 = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None] - 2 * a @ b.T
    return d2.clamp(min=0) / a.shape[1]


def cost_matrix(a: torch.Tensor, b: torch.Tensor, block: int = 2048) -> np.ndarray:
    return np.concatenate([_mse_block(a[i : i + block], b).double().cpu().numpy() for i in range(0, len(a), block)])


def _candidates(a: torch.Tensor, b: torch.Tensor, m: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, col, cost) of each row's m cheapest columns and each column's m cheapest rows, deduplicated."""
    rows, cols, costs = [], [], []
    col_best = torch.full((len(b), m), math.inf, device=a.device)
    col_arg = torch.zeros((len(b), m), dtype=torch.long, device=a.device)
    for i in range(0, len(a), block):
        c = _mse_block(a[i : i + block], b)
        v, j = c.topk(min(m, c.shape[1]), dim=1, largest=False)
        rows.append((torch.arange(len(c), device=a.device)[:, None] + i).expand_as(j).reshape(-1))
        cols.append(j.reshape(-1))
        costs.append(v.reshape(-1))
        # merge this block's best rows per column into the running per-column top m
        vb, ib = c.topk(min(m, c.shape[0]), dim=0, largest=False)
        allv = torch.cat([col_best, vb.T], 1)
        alli = torch.cat([col_arg, ib.T + i], 1)
        keep = allv.topk(m, dim=1, largest=False).indices
        col_best, col_arg = allv.gather(1, keep), alli.gather(1, keep)
    ok = torch.isfinite(col_best)
    rows.append(col_arg[ok])
    cols.append(torch.arange(len(b), device=a.device)[:, None].expand_as(col_arg)[ok])
    costs.append(col_best[ok])
    r, c, v = (torch.cat(x).cpu().numpy() for x in (rows, cols, costs))
    key = r.astype(np.int64) * len(b) + c
    _, first = np.unique(key, return_index=True)
    return r[first], c[first], v[first].astype(np.float64)


def assign(
    a: torch.Tensor, b: torch.Tensor, dense_limit: int = 4096, candidates: int = 32, block: int = 2048
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Optimal one-to-one assignment of rows of ``a`` to rows of ``b`` minimising the summed MSE.

    Returns (rows, cols, info); every row of the smaller side is matched."""
    from scipy.optimize import linear_sum_assignment

    if max(len(a), len(b)) <= dense_limit:
        cost = cost_matrix(a, b, block)
        r, c = linear_sum_assignment(cost)
        return r, c, {"solver": "dense", "cost_entries": int(cost.size)}
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    m = candidates
    while True:
        r, c, v = _candidates(a, b, min(m, len(a), len(b)), block)
        # csgraph drops explicit zeros: shift every cost by a constant (the assignment is unchanged,
        # since every matching of the smaller side has the same number of edges)
        graph = csr_matrix((v + 1.0, (r, c)), shape=(len(a), len(b)))
        try:
            rr, cc = min_weight_full_bipartite_matching(graph)
        except ValueError:
            if m >= min(len(a), len(b)):
                raise
            m *= 2
            continue
        info = {"solver": "sparse", "candidates": m, "cost_entries": int(graph.nnz)}
        if len(a) <= len(b):
            return np.arange(len(a)), cc, info
        return rr, np.arange(len(b)), info


@dataclass
class Matching:
    """``perm[i]`` is the latent of B matched to latent i of A (-1 where A is the larger side and i is left over)."""

    perm: np.ndarray
    cost: np.ndarray  # per matched latent of A, -1 entries excluded
    cosine: np.ndarray
    null_cost: float  # median cost of random pairs, the scale a cost is judged against
    info: dict

    def confident(self, min_cosine: float) -> np.ndarray:
        return self.cosine >= min_cosine


def match_saes(
    a: SAE,
    b: SAE,
    encoder: bool = False,
    dense_limit: int = 4096,
    candidates: int = 32,
    device: str | None = None,
    seed: int = 0,
) -> Matching:
    if a.d_in != b.d_in:
        raise ConfigError(f"cannot match SAEs of different input sizes (d_in {a.d_in} vs {b.d_in})")
    dev = torch.device(device) if device else a.W_dec.device
    t0 = time.perf_counter()
    va, vb = (v.to(dev) for v in _vectors(fold(a), fold(b), encoder))
    rows, cols, info = assign(va, vb, dense_limit, candidates)
    perm = np.full(a.d_sae, -1, dtype=np.int64)
    perm[rows] = cols
    ra, rb = torch.as_tensor(rows, device=dev), torch.as_tensor(cols, device=dev)
    pa, pb = va[ra], vb[rb]
    cost = ((pa - pb).pow(2).mean(1)).cpu().numpy()
    cosine = torch.nn.functional.cosine_similarity(pa[:, : a.d_in], pb[:, : a.d_in], dim=1).cpu().numpy()
    g = torch.Generator().manual_seed(seed)
    ia, ib = torch.randint(len(va), (4096,), generator=g), torch.randint(len(vb), (4096,), generator=g)
    null = float((va[ia.to(dev)] - vb[ib.to(dev)]).pow(2).mean(1).median())
    info["seconds"] = time.perf_counter() - t0
    return Matching(perm, cost, cosine, null, info)


def summarize(m: Matching, min_cosine: float = 0.7) -> dict:
    q = np.quantile(m.cost, [0.1, 0.25, 0.5, 0.75, 0.9]) if len(m.cost) else [float("nan")] * 5
    return {
        "matched": int(len(m.cost)),
        "cost_quantiles": dict(zip(["p10", "p25", "p50", "p75", "p90"], map(float, q))),
        "null_cost_median": m.null_cost,
        "median_cost_over_null": float(np.median(m.cost) / m.null_cost) if m.null_cost > 0 else float("nan"),
        "cosine_quantiles": dict(zip(["p10", "p50", "p90"], map(float, np.quantile(m.cosine, [0.1, 0.5, 0.9])))),
        "min_cosine": min_cosine,
        "confident_fraction": float(m.confident(min_cosine).mean()),
        **{f"solver_{k}": v for k, v in m.info.items()},
    }


@torch.no_grad()
def transfer_eval(
    a: SAE,
    b: SAE,
    m: Matching,
    model,
    tokenizer,
    docs: list[list[int]],
    layer_a: int,
    layer_b: int,
    max_tokens: int = 20_000,
    batch_size: int = 32,
    max_length: int = 128,
    outlier_norm: float = OUTLIER_NORM,
) -> dict:
    """How well A's features at ``layer_a``, carried through the matching into B's folded decoder, explain the
    hidden state at ``layer_b``; with B's own reconstruction and the co-activation of matched latents. Tokens with
    a massive norm at either layer are left out, as in SAE training and evaluation (``metrics.typical_tokens``)."""
    from ..data import doc_batches
    from ..models import capture_layer

    device = next(model.parameters()).device
    a, b = a.to(device), b.to(device)
    fb = fold(b)
    valid = torch.as_tensor(m.perm >= 0, device=device)
    perm = torch.as_tensor(np.where(m.perm >= 0, m.perm, 0), device=device)
    W = torch.zeros(a.d_sae, b.d_in, device=device)
    W[valid] = fb.W_dec[perm[valid]]
    err_t = err_own = 0.0
    xs, n, n_out, co, fired_a, fired_b = [], 0, 0, 0.0, 0.0, 0.0
    for ids, mask in doc_batches(docs, batch_size, max_length, tokenizer.pad_token_id, device):
        att = mask.bool()
        with capture_layer(model, layer_a) as ha, capture_layer(model, layer_b) as hb:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        xa, xb = ha["h"][att].float(), hb["h"][att].float()
        keep = typical_tokens(torch.stack([xa, xb], 1), outlier_norm)  # two layers of one model: same width
        n_out += int((~keep).sum())
        xa, xb = xa[keep], xb[keep]
        f_a = a.encode(xa)
        x_t = folded_features(a, f_a) @ W + b.b_dec
        f_b = b.encode(xb)
        err_t += (xb - x_t).pow(2).sum().item()
        err_own += (xb - b.decode(f_b)).pow(2).sum().item()
        act_a = f_a > 0
        act_b_matched = torch.zeros_like(act_a)
        act_b_matched[:, valid] = (f_b > 0)[:, perm[valid]]
        co += (act_a & act_b_matched).sum().item()
        fired_b += (f_b > 0).sum().item()
        fired_a += act_a.sum().item()
        xs.append(xb)
        n += len(xb)
        if n >= max_tokens:
            break
    allx = torch.cat(xs)
    sq_dev_sum = (allx - allx.mean(0)).pow(2).sum().item()
    return {
        "tokens": n,
        "outlier_tokens": n_out,
        "transfer_explained_variance": 1 - err_t / sq_dev_sum,
        "b_own_explained_variance": 1 - err_own / sq_dev_sum,
        "coactivation_rate": co / max(fired_a, 1),
        "coactivation_chance": fired_b / max(n * b.d_sae, 1),
    }


def plot_costs(m: Matching, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.hist(np.clip(m.cosine, -1, 1), bins=np.linspace(-1, 1, 81), color="tab:blue")
    ax.set_xlabel("cosine of matched folded decoder rows")
    ax.set_ylabel("latents")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class SAEMatchConfig(Config):
    """`featalign sae match A B`: the one-to-one matching, its costs, and optionally how well A's features carried
    through the matching explain B's layer."""

    sae_a: str = setting("", "first SAE (its latents are matched to the second's)", positional=True)
    sae_b: str = setting("", "second SAE", positional=True)
    out: str | None = setting(None, "folder for match.json and match.png (default: <sae_a>-vs-<sae_b>)")
    encoder: bool = setting(False, "include encoder columns in the cost (decoder rows only by default)")
    min_cosine: float = setting(0.7, "a match is confident at or above this cosine", ge=-1, le=1)
    dense_limit: int = setting(4096, "above this many latents, solve a sparsified cost", ge=1)
    candidates: int = setting(32, "cheapest partners kept per latent when sparsified", ge=1)
    device: str | None = setting(None, "device for the cost computation (default: where the SAEs are loaded, the CPU)")
    model: str | None = setting(None, "with data: check the matched decode on this model's hidden states")
    data: str | None = setting(None, "documents for the transfer check (with model)")
    layer_a: int | None = setting(None, "layer of the first SAE (default: the layer it records)")
    layer_b: int | None = setting(None, "layer of the second SAE (default: the layer it records)")
    max_tokens: int = setting(20_000, "tokens for the transfer check", ge=1)

    def validate(self) -> None:
        super().validate()
        if not (self.sae_a and self.sae_b):
            raise ConfigError("sae match needs two SAEs (SAE_A SAE_B)")
        if bool(self.model) != bool(self.data):
            raise ConfigError("the transfer check needs both --model and --data")
        check_model_path(self.model or "")


def run_sae_match(cfg: SAEMatchConfig) -> dict:
    """Match ``cfg.sae_a`` to ``cfg.sae_b``: the report (also in ``<out>/match.json``, with the permutation) and a
    cosine histogram (``match.png``); with a model and data, the transfer check."""
    import os

    from .formats import load_sae

    cfg.validate()
    a, b = load_sae(cfg.sae_a, cfg.layer_a), load_sae(cfg.sae_b, cfg.layer_b)
    m = match_saes(a, b, encoder=cfg.encoder, dense_limit=cfg.dense_limit, candidates=cfg.candidates, device=cfg.device)
    report = {
        "sae_a": cfg.sae_a,
        "sae_b": cfg.sae_b,
        "d_sae": [a.d_sae, b.d_sae],
        "encoder_in_cost": cfg.encoder,
        **summarize(m, cfg.min_cosine),
    }
    if cfg.model:
        from ..data import read_documents
        from ..models import load_model, load_tokenizer
        from .model import resolve_layer

        model = load_model(cfg.model).eval()
        if cfg.device:
            model = model.to(cfg.device)
        la = resolve_layer(a, cfg.layer_a, model, cfg.sae_a, "--layer-a")
        lb = resolve_layer(b, cfg.layer_b, model, cfg.sae_b, "--layer-b")
        tok = load_tokenizer(cfg.model)
        report["layers"] = [la, lb]
        report["transfer"] = transfer_eval(a, b, m, model, tok, read_documents(cfg.data, tok), la, lb, cfg.max_tokens)
    out = cfg.out or f"{cfg.sae_a.rstrip('/')}-vs-{os.path.basename(cfg.sae_b.rstrip('/'))}"
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "match.json"), {**report, "perm": m.perm.tolist()}, indent=None)
    plot_costs(m, os.path.join(out, "match.png"), f"SAE Match: {m.confident(cfg.min_cosine).mean():.0%} confident")
    return {**report, "out": out}


def match_lines(report: dict) -> list[str]:
    import json

    lines = [f"{k}: {json.dumps(v)}" for k, v in report.items() if k not in ("sae_a", "sae_b", "out")]
    return lines + [
        f"written to {report['out']}/match.json (perm[i] = latent of B matched to latent i of A) and match.png"
    ]
