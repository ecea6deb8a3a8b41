"""SAE training: featalign TopK vs SAELens TopK vs sparsify on the same activations, width, k, batches and tokens.

Activations are taken once from the world's SFT model (default world if built, else the quick world) at one
layer, shuffled, and saved; each trainer then runs in its own process over the same tensor (so only SAE
training is timed). featalign: `sae.train.fit` with its defaults (TopK + AuxK, unit-norm decoder rows, inputs
normalised). SAELens: `TopKTrainingSAE.training_forward_pass` with its defaults (AuxK coefficient 1,
decoder-norm rescaling), Adam with the same schedule, the same dead-latent rule. sparsify: `SparseCoder` driven
as its `Trainer.fit` drives it (b_dec = first batch mean, decoder renormalised and its radial gradient removed
each step, FVU loss) with its default optimiser (signum, schedule-free, lr 5e-3 / sqrt(latents / 2^14) times the
factor swept; weights averaged for evaluation as it does before saving; no AuxK: its default auxk_alpha is 0, and a
latent counts as dead only after 10M tokens). Each library is taken at its best lr
of those swept, at every k: the MSE-vs-L0 frontier. Reported: training tokens per second and held-out
normalised MSE (squared error / total variance) at L0.

Usage: python bench/sae_train.py [--tokens 400000 --d-sae 1024 --ks 16,32,64] -> bench/results/sae_train-<cpu|gpu>.json
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import ROOT, device, parser, peak_mb, quick_world, run_worker, scratch, sync, write_result  # noqa: E402


def collect(path: str, tokens: int, layer: int) -> dict:
    from featalign.data import read_documents
    from featalign.models import load_model, load_tokenizer
    from featalign.sae.train import iter_activations
    from featalign.world import world_paths

    full = os.path.join(ROOT, "data", "world")
    wp = world_paths(full) if os.path.exists(os.path.join(full, "world.json")) else quick_world()
    model, tok = load_model(wp["sft"]).eval(), load_tokenizer(wp["sft"])
    xs, n = [], 0
    for x in iter_activations(model, tok, read_documents(wp["sft_text"], tok), layer):
        xs.append(x)
        n += len(x)
        if n >= tokens:
            break
    x = torch.cat(xs)[:tokens]
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    torch.save(x, path)
    return {"model": wp["sft"], "d_in": x.shape[1]}


def _split(a):
    """Held-out and training activations; also pays torch.optim's one-time import (about 1.5 s, torch._dynamo) here,
    outside every library's timed loop (featalign builds its optimiser inside ``fit``, the others before timing)."""
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    x = torch.load(a.acts)
    dev = device()
    n_eval = a.eval_tokens
    return x[n_eval:].to(dev), x[:n_eval].to(dev)


def _batches(x, batch):
    for i in range(0, len(x) - batch + 1, batch):
        yield x[i : i + batch]


def _result(secs, tokens, f, x_hat, held) -> dict:
    return {
        "seconds": secs,
        "tokens": tokens,
        "l0": float((f > 0).float().sum(-1).mean()),
        "normalized_mse": float((held - x_hat).pow(2).sum() / (held - held.mean(0)).pow(2).sum()),
        "peak_mb": peak_mb(),
    }


def featalign_worker(a) -> dict:
    from featalign.sae.train import SAETrainConfig, fit, init_sae

    train, held = _split(a)
    cfg = SAETrainConfig(
        d_sae=a.d_sae,
        k=a.k,
        tokens=len(train),
        batch_tokens=a.batch,
        lr=a.lr,
        dead_tokens=a.dead_tokens,
        **json.loads(a.options),
    )
    torch.manual_seed(0)
    sae = init_sae(cfg, train.shape[1], train[: a.batch].cpu(), 0, "bench").to(train.device)
    stream = _batches(train, a.batch)
    first = next(stream)
    sync()
    t0 = time.perf_counter()
    fit(sae, first, stream, cfg)
    sync()
    secs = time.perf_counter() - t0
    with torch.no_grad():
        f = sae.encode(held)
        return _result(secs, len(train) // a.batch * a.batch, f, sae.decode(f), held)


def saelens_worker(a) -> dict:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    train, held = _split(a)
    dev = str(train.device)
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=train.shape[1], d_sae=a.d_sae, k=a.k, device=dev))
    with torch.no_grad():
        sae.b_dec.copy_(train[: a.batch].mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=a.lr, betas=(0.9, 0.999))
    steps = len(train) // a.batch
    decay_from = int(0.8 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < decay_from else max(0.0, (steps - s) / (steps - decay_from))
    )
    since_fired = torch.zeros(a.d_sae, dtype=torch.long, device=dev)
    sync()
    t0 = time.perf_counter()
    for step, x in enumerate(_batches(train, a.batch)):
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={},
                dead_neuron_mask=since_fired > a.dead_tokens,
                n_training_steps=step,
                is_logging_step=False,
            )
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        since_fired += len(x)
        since_fired[(out.feature_acts > 0).any(0)] = 0
    sync()
    secs = time.perf_counter() - t0
    sae.eval()
    with torch.no_grad():
        f = sae.encode(held)
        return _result(secs, steps * a.batch, f, sae.decode(f), held)


def sparsify_worker(a) -> dict:
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    train, held = _split(a)
    torch.manual_seed(0)
    sae = SparseCoder(
        train.shape[1], SparseCoderConfig(num_latents=a.d_sae, k=a.k), device=train.device, dtype=torch.float32
    )
    opt = ScheduleFreeWrapper(
        SignSGD([{"params": sae.parameters(), "lr": a.lr * 5e-3 / (a.d_sae / 2**14) ** 0.5}]), momentum=0.95
    )
    opt.train()
    sync()
    t0 = time.perf_counter()
    for step, x in enumerate(_batches(train, a.batch)):
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        sae(x).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
    sync()
    secs = time.perf_counter() - t0
    opt.eval()
    with torch.no_grad():
        acts, idx, _ = sae.encode(held)
        f = torch.zeros(len(held), a.d_sae, device=held.device).scatter(-1, idx, acts)
        return _result(secs, (step + 1) * a.batch, f, sae.decode(acts, idx), held)


WORKERS = {"featalign": featalign_worker, "saelens": saelens_worker, "sparsify": sparsify_worker}


def main():
    ap = parser(__doc__)
    ap.add_argument("--worker", choices=list(WORKERS))
    ap.add_argument("--acts")
    ap.add_argument("--tokens", type=int, default=400_000)
    ap.add_argument("--eval-tokens", type=int, default=20_000)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--ks", default="16,32,64", help="k values of the frontier")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="Adam learning rates tried for featalign and SAELens")
    ap.add_argument("--sparsify-lrs", default="0.5,1,2", help="factors on sparsify's own default learning rate")
    ap.add_argument(
        "--dead-tokens",
        type=int,
        default=10_000_000,
        help="AuxK's dead window, for featalign and SAELens (featalign's default)",
    )
    ap.add_argument("--libs", default="featalign,saelens,sparsify")
    ap.add_argument("--options", default="{}", help="featalign SAETrainConfig overrides (JSON), for trying variants")
    ap.add_argument("--name", default="sae_train")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(WORKERS[a.worker](a)))
        return
    acts = os.path.join(scratch(prefix="featalign-sae-bench-"), "acts.pt")
    src = collect(acts, a.tokens + a.eval_tokens, a.layer)
    libs = a.libs.split(",")
    runs: dict = {lib: {} for lib in libs}
    for k in a.ks.split(","):
        args = [
            "--acts",
            acts,
            "--eval-tokens",
            str(a.eval_tokens),
            "--d-sae",
            str(a.d_sae),
            "--k",
            k,
            "--batch",
            str(a.batch),
            "--dead-tokens",
            str(a.dead_tokens),
            "--options",
            a.options,
        ]
        for i, lr in enumerate(a.lrs.split(",")):
            for lib in libs:  # alternate the libraries so that drift in machine speed hits all alike
                lr_lib = a.sparsify_lrs.split(",")[i] if lib == "sparsify" else lr
                r = run_worker(__file__, ["--worker", lib, *args, "--lr", lr_lib])
                if "seconds" in r:
                    r["tokens_per_s"] = r["tokens"] / r["seconds"]
                runs[lib].setdefault(k, {})[lr_lib] = r
                print(k, lib, lr_lib, json.dumps(r)[:300], flush=True)
    summary = (
        summarise(runs, libs)
        if all("seconds" in r for v in runs.values() for rk in v.values() for r in rk.values())
        else {}
    )
    write_result(
        a.name,
        {
            "activations": src,
            "layer": a.layer,
            "d_sae": a.d_sae,
            "ks": a.ks,
            "batch_tokens": a.batch,
            "train_tokens": a.tokens,
            "featalign_options": json.loads(a.options),
            "runs": runs,
            "summary": summary,
        },
    )
    print(json.dumps(summary, indent=2))


def summarise(runs: dict, libs: list[str]) -> dict:
    """Per k: each library at its best lr (the frontier point), and featalign's ratios to the others (speed: median
    over the lrs of the per-run tokens/s)."""
    out: dict = {"frontier": {}, "ratios": {}}
    for k in runs[libs[0]]:
        best = {lib: min(runs[lib][k].values(), key=lambda r: r["normalized_mse"]) for lib in libs}
        out["frontier"][k] = {lib: {"l0": b["l0"], "normalized_mse": b["normalized_mse"]} for lib, b in best.items()}
        speed = {lib: sorted(r["tokens_per_s"] for r in runs[lib][k].values())[len(runs[lib][k]) // 2] for lib in libs}
        out["ratios"][k] = {
            f"featalign_over_{lib}": {
                "normalized_mse": best["featalign"]["normalized_mse"] / best[lib]["normalized_mse"],
                "tokens_per_s": speed["featalign"] / speed[lib],
            }
            for lib in libs
            if lib != "featalign"
        }
    return out


if __name__ == "__main__":
    main()
