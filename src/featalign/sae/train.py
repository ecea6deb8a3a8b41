"""Train SAEs on a causal LM's residual stream: TopK + AuxK, BatchTopK + AuxK, Feature Choice, JumpReLU
(straight-through estimator), ReLU + decoder-norm-weighted L1. Activations are streamed through a shuffle buffer and
scaled to mean norm sqrt(d_in) while training (the scale is folded back into the saved SAE)."""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..atomic import write_json
from ..config import Config, check_model_path, setting
from ..data import doc_batches, read_documents
from ..errors import ConfigError
from ..models import capture_layer, check_layer, hidden_size, run_to_layer
from .architectures import ARCHITECTURES
from .metrics import OUTLIER_NORM, typical_tokens
from .model import SAE, SAEConfig

# bumped when training changes in a way the settings do not show (init, update rule), so cached SAEs
# keyed on the settings (the comparison's) are retrained
SAE_TRAIN_VERSION = 4


@dataclass
class SAETrainConfig(Config):
    """`featalign sae train`: one SAE on one layer (or one per layer of ``layers``), saved in SAELens' layout."""

    model: str = setting("", "model whose residual stream the SAE reads: HF folder, hub id or .gguf file")
    data: str = setting(
        "", "documents: text, conversations, prompt/response or preference records (prompt + each answer)"
    )
    layer: int = setting(2, "decoder layer whose output (the residual stream) is encoded")
    layers: str = setting(
        "", "several layers, e.g. 4,8,12: one SAE each from the same forward passes, saved to <out>/layers.N"
    )
    out: str = setting("runs/sae", "SAE folder to write (SAELens layout, plus eval.json)")
    architecture: Literal["topk", "batchtopk", "featurechoice", "jumprelu", "relu"] = setting(
        "topk",
        "activation: TopK, BatchTopK, Feature Choice, JumpReLU or ReLU (the docs' SAE page says how each trains)",
    )
    d_sae: int = setting(512, "number of latents", ge=1)
    k: int = setting(32, "TopK: active latents per token (BatchTopK and Feature Choice: on average)", ge=1)
    normalize: bool = setting(
        True, "train on activations scaled to mean norm sqrt(d_in); the saved SAE reads raw activations"
    )
    fc_zipf: float = setting(
        0.0, "Feature Choice: latent i takes a share of the tokens proportional to 1/(i+1)^fc_zipf (0: equal)", ge=0
    )
    fc_max_share: float = setting(
        0.08, "Feature Choice: the largest share of a batch's tokens one latent may take", gt=0, le=1
    )
    l1_coeff: float = setting(5.0, "ReLU: coefficient of the decoder-norm-weighted L1 penalty", ge=0)
    l0_coeff: float = setting(1e-3, "JumpReLU: coefficient of the L0 penalty", ge=0)
    jumprelu_bandwidth: float = setting(0.001, "JumpReLU: width of the straight-through rectangle kernel", gt=0)
    jumprelu_init_threshold: float = setting(0.001, "JumpReLU: initial threshold", gt=0)
    aux_k: int | None = setting(
        None, "TopK, BatchTopK, Feature Choice: dead latents the AuxK loss uses (default: d_in / 2)", ge=1
    )
    aux_coeff: float = setting(1 / 32, "TopK, BatchTopK, Feature Choice: coefficient of the AuxK loss", ge=0)
    dead_tokens: int = setting(
        10_000_000, "a latent silent for this many tokens is dead, and AuxK trains it on the residual", ge=1
    )
    resample_every: int = setting(
        0, "TopK, BatchTopK, Feature Choice: every this many tokens, re-initialise long-dead latents (0: off)", ge=0
    )
    resample_until: float = setting(0.5, "share of the training tokens after which no latent is resampled", ge=0, le=1)
    tokens: int = setting(600_000, "training tokens", ge=1)
    batch_tokens: int = setting(1024, "tokens per optimiser step", ge=1)
    lr: float = setting(3e-3, "Adam learning rate (constant, then a linear decay over the last 20%)", gt=0)
    format: Literal["saelens", "sparsify"] = setting(
        "saelens", "folder layout to save: SAELens, or sparsify (TopK only)"
    )
    buffer_tokens: int = setting(32_768, "shuffle buffer of activations (mixes tokens of many documents)", ge=1)
    model_batch_size: int = setting(32, "documents per forward pass of the model", ge=1)
    max_length: int = setting(128, "tokens kept per document", ge=2)
    eval_tokens: int = setting(40_000, "held-out tokens for the final evaluation (eval.json)", ge=1)
    outlier_norm: float = setting(
        OUTLIER_NORM,
        "leave out tokens whose residual norm exceeds this multiple of the batch median (0: keep all)",
        ge=0,
    )
    seed: int = setting(0, "seed of the init, the document order and the shuffle buffer")
    device: str | None = setting(None, "device to train on (default: the GPU when there is one)")
    progress: bool = setting(True, "show a progress bar")

    def validate(self) -> None:
        super().validate()
        if not self.model or not self.data:
            raise ConfigError("sae train needs model and data (--model, --data)")
        check_model_path(self.model)
        if self.format == "sparsify" and self.architecture != "topk":
            raise ConfigError(
                f"format=sparsify holds TopK SAEs only, not architecture={self.architecture}; use format=saelens"
            )
        ARCHITECTURES[self.architecture].check(self)  # e.g. Feature Choice shares that cannot add up


# ---------------------------------------------------------------- activations
def run_to_layers(model, layers: list[int], **inputs) -> torch.Tensor:
    """Residual streams after each of ``layers`` from one forward pass cut after the deepest: [..., layers, d]."""
    with contextlib.ExitStack() as stack:
        boxes = [stack.enter_context(capture_layer(model, layer, stop=layer == max(layers))) for layer in layers]
        model(**inputs, use_cache=False)
    return torch.stack([b["h"] for b in boxes], -2)


@torch.no_grad()
def iter_activations(
    model,
    tokenizer,
    docs: list[list[int]],
    layer: int | list[int],
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
    loop: bool = True,
    outlier_norm: float = 0.0,
) -> Iterator[torch.Tensor]:
    """Yield [n_tokens, d] residual-stream activations at ``layer`` (padding removed), cycling over docs; for a list
    of layers, [n_tokens, layers, d] from one forward pass. ``outlier_norm > 0`` drops tokens with a massive norm
    (``metrics.typical_tokens``)."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id
    while True:
        order = list(range(len(docs)))
        rng.shuffle(order)
        for ids, att in doc_batches([docs[j] for j in order], batch_size, max_length, pad, device):
            if isinstance(layer, int):
                h = run_to_layer(model, layer, input_ids=ids, attention_mask=att)
            else:
                h = run_to_layers(model, layer, input_ids=ids, attention_mask=att)
            x = h[att.bool()].float()
            yield x[typical_tokens(x, outlier_norm)] if outlier_norm > 0 else x
        if not loop:
            return


def shuffle_buffer(
    source: Iterator[torch.Tensor], buffer_tokens: int, batch_tokens: int, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Mix tokens from many documents: fill a buffer, hand out a random half in batches, refill."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.empty(0)
    for chunk in source:
        buf = chunk if buf.numel() == 0 else torch.cat([buf, chunk.to(buf.device)])
        if len(buf) < buffer_tokens:
            continue
        perm = torch.randperm(len(buf), generator=g).to(buf.device)
        buf = buf[perm]
        half = len(buf) // 2
        for i in range(0, half - batch_tokens + 1, batch_tokens):
            yield buf[i : i + batch_tokens]
        buf = buf[half:]


# ---------------------------------------------------------------- training
def init_sae(cfg: SAETrainConfig, d_in: int, first: torch.Tensor, layer: int, model_name: str) -> SAE:
    """Decoder rows random unit vectors (scaled by 0.1 for L1/L0-penalised SAEs), encoder their transpose, b_dec the
    mean of the first batch; then what the architecture sets itself (thresholds). BatchTopK and Feature Choice SAEs
    are JumpReLU SAEs whose threshold training estimates."""
    arch = ARCHITECTURES[cfg.architecture]
    # the layer enters the seed: SAEs of two layers must not share a random init, or matching their
    # latents (SAE Match) would find the shared init rather than shared features
    g = torch.Generator().manual_seed(cfg.seed * 1009 + layer)
    extra = {"trained_as": cfg.architecture, "k": cfg.k} if arch.learns_threshold else {}
    k = cfg.k if arch.saved_as == "topk" else None
    sae = SAE(SAEConfig(d_in, cfg.d_sae, arch.saved_as, k=k, layer=layer, model=model_name, extra=extra))
    with torch.no_grad():
        w = torch.randn(cfg.d_sae, d_in, generator=g)
        w /= w.norm(dim=-1, keepdim=True)
        if not arch.sparse:
            w *= 0.1
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_dec.copy_(first.mean(0))
        if arch.sparse:
            sae.W_enc.mul_(init_encoder_scale(sae, first, cfg))
        arch.init(sae, cfg)
    return sae


def init_encoder_scale(sae: SAE, first: torch.Tensor, cfg: SAETrainConfig) -> float:
    """The least-squares scale of the first batch's reconstruction: with the encoder the decoder's transpose the k
    selected latents add up to far more than the input (about 2x its norm at k = d_in / 2), an overshoot the first
    steps spend undoing, worst at large k. Scaling the encoder changes no latent's selection (TopK and BatchTopK
    are invariant to a positive scale), only the values, so the scale is read off one forward pass."""
    c = (
        first.to(sae.W_enc.device, sae.W_enc.dtype) - sae.b_dec
    )  # the SAE is built on the CPU, the batch may be on a GPU
    r = ARCHITECTURES[cfg.architecture].codes(sae, c @ sae.W_enc, cfg)[0] - sae.b_dec
    return float(((c * r).sum() / r.pow(2).sum().clamp(min=1e-12)).clamp(min=1e-3, max=1.0))


def input_scale(x: torch.Tensor) -> float:
    """The factor that brings activations to mean norm sqrt(d_in) (SAELens' and dictionary_learning's
    normalisation): learning rates and loss coefficients then mean the same at every layer and model."""
    return float(x.shape[-1] ** 0.5 / x.norm(dim=-1).mean().clamp(min=1e-8))


def sae_loss(sae: SAE, x: torch.Tensor, cfg: SAETrainConfig, dead: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """Loss and metrics for one batch: the MSE and the architecture's penalty (``architectures``)."""
    arch = ARCHITECTURES[cfg.architecture]
    codes = arch.forward(sae, x, cfg)
    err = x - codes.x_hat
    mse = err.pow(2).sum(-1).mean()
    var = (x - x.mean(0)).pow(2).sum(-1).mean()
    penalty, aux = arch.penalty(sae, x, err, codes, cfg, dead)
    metrics = {
        "mse": mse.detach(),
        "ev": 1 - mse.detach() / var.clamp(min=1e-8),
        "l0": codes.l0.detach(),
        "aux": aux.detach(),
        "fired": codes.fired,
        "low": codes.low,
    }
    return mse + penalty, metrics


class Fit:
    """One SAE's optimiser state and step. Adam, constant learning rate then linear decay over the last 20%;
    TopK/BatchTopK decoder rows kept unit-norm; a latent is dead once it has not fired for ``cfg.dead_tokens``
    tokens. With ``cfg.normalize`` every batch is scaled by ``input_scale(first)`` and the SAE is rescaled back at
    the end. BatchTopK's inference threshold is the mean over the decay phase (where the weights settle) of each
    batch's smallest kept value (Feature Choice: each latent's): an estimate taken earlier lags the growing encoder."""

    def __init__(self, sae: SAE, first: torch.Tensor, cfg: SAETrainConfig):
        self.sae, self.cfg = sae, cfg
        self.scale = input_scale(first) if cfg.normalize else 1.0
        sae.rescale_inputs(self.scale)
        self.opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.999))
        steps = max(1, cfg.tokens // cfg.batch_tokens)
        self.decay_from = decay_from = int(0.8 * steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 1.0 if s < decay_from else max(0.0, (steps - s) / (steps - decay_from))
        )
        self.since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=first.device)
        self.arch = ARCHITECTURES[cfg.architecture]
        self.sparse = self.arch.sparse
        self.n = 0

    def step(self, x: torch.Tensor) -> dict:
        sae, cfg = self.sae, self.cfg
        dead = self.since_fired > cfg.dead_tokens if self.sparse else None
        loss, m = sae_loss(sae, x * self.scale, cfg, dead)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.sparse:
            with torch.no_grad():  # rows stay unit-norm: drop the radial part of their gradient (OpenAI)
                w, g = sae.W_dec, sae.W_dec.grad
                g -= (g * w).sum(-1, keepdim=True) * w
        self.opt.step()
        self.sched.step()
        self.arch.after_step(sae, m["low"], self.n, self.decay_from)
        self.since_fired += len(x)
        self.since_fired[m["fired"]] = 0
        self.n += 1
        every = cfg.resample_every
        seen = self.n * cfg.batch_tokens
        if every and self.sparse and seen % every < cfg.batch_tokens and seen <= cfg.resample_until * cfg.tokens:
            m["resampled"] = self.resample(x * self.scale)
        return m

    @torch.no_grad()
    def resample(self, x: torch.Tensor) -> int:
        """Re-initialise the latents silent for ``resample_every`` tokens: each gets the direction of the residual
        of an input drawn with probability proportional to its squared reconstruction error (decoder row, and
        encoder column at the live latents' mean norm, bias 0), and fresh Adam moments. Returns how many."""
        sae, cfg = self.sae, self.cfg
        dead = (self.since_fired >= cfg.resample_every).nonzero().squeeze(1)
        if not len(dead):
            return 0
        b_eff = sae.b_enc - sae.b_dec @ sae.W_enc if sae.cfg.apply_b_dec_to_input else sae.b_enc
        err = x - self.arch.codes(sae, torch.addmm(b_eff, x, sae.W_enc), cfg)[0]
        w = err.pow(2).sum(-1)
        g = torch.Generator(device=x.device).manual_seed(cfg.seed * 7919 + self.n)
        pick = torch.multinomial(w / w.sum(), len(dead), replacement=len(dead) > len(x), generator=g)
        d = err[pick] / err[pick].norm(dim=-1, keepdim=True).clamp(min=1e-8)
        alive = torch.ones_like(self.since_fired, dtype=torch.bool).index_fill_(0, dead, False)
        scale = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else sae.W_enc.norm(dim=0).mean()
        sae.W_dec[dead] = d.to(sae.W_dec.dtype)
        sae.W_enc[:, dead] = (d.T * scale).to(sae.W_enc.dtype)
        sae.b_enc[dead] = 0
        for p, where in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,))):
            for v in self.opt.state.get(p, {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v[where] = 0
        self.since_fired[dead] = 0
        return len(dead)

    def finish(self) -> torch.Tensor:
        self.sae.rescale_inputs(1 / self.scale)
        return self.since_fired


def fit_many(
    saes: list[SAE], first: torch.Tensor, stream: Iterator[torch.Tensor], cfg: SAETrainConfig, progress: bool = False
) -> list[torch.Tensor]:
    """Train one SAE per layer on batches [tokens, layers, d_in] (``first``, then ``stream``) for ``cfg.tokens``
    tokens: each batch feeds every SAE, so the model runs once for all layers. Returns, per SAE, the tokens since
    each latent last fired."""
    fits = [Fit(sae, first[:, i], cfg) for i, sae in enumerate(saes)]
    steps = max(1, cfg.tokens // cfg.batch_tokens)
    bar = tqdm(range(steps), desc=f"sae {cfg.architecture}", disable=not progress)
    x = first
    for step in bar:
        if step:
            x = next(stream)
        ms = [f.step(x[:, i]) for i, f in enumerate(fits)]
        if progress and (step % 10 == 0 or step == steps - 1):
            m, f = ms[0], fits[0]
            bar.set_postfix(
                mse=f"{m['mse'].item():.4f}",
                ev=f"{m['ev'].item():.3f}",
                l0=f"{m['l0'].item():.1f}",
                dead=int((f.since_fired > cfg.dead_tokens).sum()),
            )
    return [f.finish() for f in fits]


def fit(
    sae: SAE, first: torch.Tensor, stream: Iterator[torch.Tensor], cfg: SAETrainConfig, progress: bool = False
) -> torch.Tensor:
    """``fit_many`` for one SAE on batches [tokens, d_in]."""
    return fit_many([sae], first[:, None], (x[:, None] for x in stream), cfg, progress)[0]


def parse_layers(layers: str | list | None, model) -> list[int]:
    """``--layers 4,8,12`` (or a YAML list) as checked, distinct layer indices."""
    if not layers:
        return []
    try:
        out = [int(v) for v in (layers.split(",") if isinstance(layers, str) else layers)]
    except ValueError:
        raise ConfigError(f"layers={layers!r}: expected comma-separated layer indices such as 4,8,12") from None
    out = [check_layer(model, v) for v in out]
    if len(set(out)) != len(out):
        raise ConfigError(f"layers={layers!r}: a layer is named twice")
    return out


def _buffer_tokens(cfg: SAETrainConfig) -> int:
    """The shuffle buffer, never over twice the training tokens: its first fill hands out half of it, so a larger one
    would run the model over activations that are never trained on."""
    return min(cfg.buffer_tokens, max(2 * cfg.tokens, 2 * cfg.batch_tokens))


def train_sae(cfg: SAETrainConfig, model=None, tokenizer=None) -> tuple[SAE, dict]:
    """Train an SAE on ``cfg.model`` at ``cfg.layer`` over ``cfg.tokens`` tokens; save it to ``cfg.out``. With
    ``cfg.layers``, one SAE per layer from the same forward passes, saved to ``cfg.out/layers.N`` (sparsify's
    multi-layer layout, which ``load_sae(out, layer)`` reads); returns the first and a report per layer."""
    from ..models import load_model, load_tokenizer
    from .metrics import evaluate_sae

    cfg.validate()
    torch.manual_seed(cfg.seed)
    model = model if model is not None else load_model(cfg.model, device=cfg.device or "auto")
    if cfg.device:
        model = model.to(cfg.device)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    model.eval()
    layers = parse_layers(cfg.layers, model) or [check_layer(model, cfg.layer)]
    d_in = hidden_size(model)
    docs = read_documents(cfg.data, tokenizer)
    rng = random.Random(cfg.seed)
    rng.shuffle(docs)
    n_eval_docs = max(1, len(docs) // 10)
    eval_docs, train_docs = docs[:n_eval_docs], docs[n_eval_docs:]
    stream = shuffle_buffer(
        iter_activations(
            model,
            tokenizer,
            train_docs,
            layers,
            cfg.model_batch_size,
            cfg.max_length,
            cfg.seed,
            outlier_norm=cfg.outlier_norm,
        ),
        _buffer_tokens(cfg),
        cfg.batch_tokens,
        cfg.seed,
    )
    t0 = time.perf_counter()
    first = next(stream)
    saes = [init_sae(cfg, d_in, first[:, i], layer, cfg.model).to(first.device) for i, layer in enumerate(layers)]
    since_fired = fit_many(saes, first, stream, cfg, progress=cfg.progress)
    train_s = time.perf_counter() - t0
    reports = {}
    for sae, layer, fired in zip(saes, layers, since_fired):
        sae.eval().requires_grad_(False)
        report = evaluate_sae(
            sae,
            model,
            tokenizer,
            eval_docs,
            layer,
            max_tokens=cfg.eval_tokens,
            batch_size=cfg.model_batch_size,
            max_length=cfg.max_length,
            outlier_norm=cfg.outlier_norm,
        )
        report["train_dead_fraction"] = float((fired > cfg.dead_tokens).float().mean())
        report["train_seconds"] = train_s  # model forward passes and all layers' SAE steps together
        report["train_tokens_per_s"] = cfg.tokens / train_s
        out = os.path.join(cfg.out, f"layers.{layer}") if cfg.layers else cfg.out
        sae.save(out, extra={"train_config": asdict(cfg), "eval": report}, format=cfg.format)
        write_json(os.path.join(out, "eval.json"), report, indent=2)
        reports[layer] = report
    return saes[0], (reports if cfg.layers else reports[layers[0]])
