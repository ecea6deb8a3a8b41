"""SAE training: featalign TopK vs SAELens TopK on the same activations, same width, k, batch, steps and lr.

Activations are taken once from the world's SFT model (default world if built, else the quick world) at one
layer, shuffled, and saved; each trainer then runs in its own process over the same tensor (so only SAE
training is timed). featalign: `sae.train.fit` (TopK + AuxK, unit-norm decoder rows). SAELens:
`TopKTrainingSAE.training_forward_pass` with its defaults (AuxK coefficient 1, decoder-norm rescaling), Adam,
the same dead-latent rule. Reported: training tokens per second and held-out normalised MSE at L0 = k.

Usage: python bench/sae_train.py [--tokens 400000 --d-sae 1024 --k 32] -> bench/results/sae_train-<cpu|gpu>.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import ROOT, peak_mb, quick_world, run_worker, sync, write_result  # noqa: E402


def collect(path: str, tokens: int, layer: int) -> dict:
    from featalign.models import load_model, load_tokenizer
    from featalign.sae.train import iter_activations, read_texts
    from featalign.world import world_paths

    full = os.path.join(ROOT, "data", "world")
    wp = world_paths(full) if os.path.exists(os.path.join(full, "world.json")) else quick_world()
    model, tok = load_model(wp["sft"]).eval(), load_tokenizer(wp["sft"])
    xs, n = [], 0
    for x in iter_activations(model, tok, read_texts(wp["sft_text"], tok), layer):
        xs.append(x)
        n += len(x)
        if n >= tokens:
            break
    x = torch.cat(xs)[:tokens]
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    torch.save(x, path)
    return {"model": wp["sft"], "d_in": x.shape[1]}


def _split(a):
    x = torch.load(a.acts)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n_eval = a.eval_tokens
    return x[n_eval:].to(dev), x[:n_eval].to(dev)


def _batches(x, batch):
    for i in range(0, len(x) - batch + 1, batch):
        yield x[i : i + batch]


def featalign_worker(a) -> dict:
    from featalign.sae.train import SAETrainConfig, fit, init_sae

    train, held = _split(a)
    cfg = SAETrainConfig(d_sae=a.d_sae, k=a.k, tokens=len(train), batch_tokens=a.batch, lr=a.lr, dead_tokens=a.dead_tokens)
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
        err = (held - sae.decode(f)).pow(2).sum()
    return {"seconds": secs, "tokens": len(train) // a.batch * a.batch, "l0": float((f > 0).float().sum(-1).mean()),
            "normalized_mse": float(err / (held - held.mean(0)).pow(2).sum()), "peak_mb": peak_mb()}


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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < decay_from else max(0.0, (steps - s) / (steps - decay_from)))
    since_fired = torch.zeros(a.d_sae, dtype=torch.long, device=dev)
    sync()
    t0 = time.perf_counter()
    for step, x in enumerate(_batches(train, a.batch)):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=since_fired > a.dead_tokens,
                                                       n_training_steps=step, is_logging_step=False))
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
        err = (held - sae.decode(f)).pow(2).sum()
    return {"seconds": secs, "tokens": steps * a.batch, "l0": float((f > 0).float().sum(-1).mean()),
            "normalized_mse": float(err / (held - held.mean(0)).pow(2).sum()), "peak_mb": peak_mb()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["featalign", "saelens"])
    ap.add_argument("--acts")
    ap.add_argument("--tokens", type=int, default=400_000)
    ap.add_argument("--eval-tokens", type=int, default=20_000)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="learning rates tried for both (each library at its best is compared)")
    ap.add_argument("--dead-tokens", type=int, default=20_000)
    ap.add_argument("--libs", default="featalign,saelens")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(featalign_worker(a) if a.worker == "featalign" else saelens_worker(a)))
        return
    acts = os.path.join(tempfile.mkdtemp(prefix="featalign-sae-bench-"), "acts.pt")
    src = collect(acts, a.tokens + a.eval_tokens, a.layer)
    args = ["--acts", acts, "--eval-tokens", str(a.eval_tokens), "--d-sae", str(a.d_sae), "--k", str(a.k), "--batch", str(a.batch),
            "--dead-tokens", str(a.dead_tokens)]
    runs = {name: {} for name in a.libs.split(",")}
    for lr in a.lrs.split(","):
        for name in runs:  # alternate the libraries so that drift in machine speed hits both alike
            r = run_worker(__file__, ["--worker", name, *args, "--lr", lr])
            if "seconds" in r:
                r["tokens_per_s"] = r["tokens"] / r["seconds"]
            runs[name][lr] = r
            print(name, lr, json.dumps(r)[:300], flush=True)
    ok = len(runs) == 2 and all("seconds" in r for v in runs.values() for r in v.values())
    summary = {}
    if ok:
        best = {n: min(v.items(), key=lambda kv: kv[1]["normalized_mse"]) for n, v in runs.items()}
        speed = [runs["featalign"][lr]["tokens_per_s"] / runs["saelens"][lr]["tokens_per_s"] for lr in runs["featalign"]]
        summary = {"best_lr": {n: b[0] for n, b in best.items()},
                   "best_normalized_mse": {n: b[1]["normalized_mse"] for n, b in best.items()},
                   "nmse_featalign_over_saelens_at_best": best["featalign"][1]["normalized_mse"] / best["saelens"][1]["normalized_mse"],
                   "nmse_featalign_over_saelens_per_lr": {lr: runs["featalign"][lr]["normalized_mse"] / runs["saelens"][lr]["normalized_mse"]
                                                          for lr in runs["featalign"]},
                   "speed_featalign_over_saelens_per_lr": dict(zip(runs["featalign"], speed)),
                   "speed_featalign_over_saelens_median": sorted(speed)[len(speed) // 2]}
    write_result("sae_train", {"activations": src, "layer": a.layer, "d_sae": a.d_sae, "k": a.k, "batch_tokens": a.batch,
                               "train_tokens": a.tokens, "runs": runs, "summary": summary})
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
