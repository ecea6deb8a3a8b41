"""Scaling of one FPO training step (policy forward with the layer hook, sparse pooled SAE encode, FPO loss
against cached-style sparse reference activations, backward) and of a DPO-with-cache step, against sequence
length, batch size and SAE width. Synthetic token ids, so any length can be measured.

Memory: on a GPU, torch's peak allocated bytes during the step (reset before each); on CPU, bytes of the
activations saved for backward (an allocator-independent account; process RSS cannot be reset per config).

Usage: python bench/scaling.py -> bench/results/scaling-<cpu|gpu>.json and scaling-<cpu|gpu>.png
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import RESULTS, bench_llama, device_tag, parser, timeit, write_result  # noqa: E402

from featalign.sae import random_sae  # noqa: E402


def step(model, sae, layer: int, batch: int, seq: int, vocab: int, method: str, dev: str, k: int = 50):
    from featalign.losses import dpo_loss, feature_mse, fpo_loss
    from featalign.models import capture_layer, response_logps

    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, vocab, (2 * batch, seq), device=dev, generator=g)
    att = torch.ones_like(ids)
    resp = torch.zeros_like(ids)
    resp[:, seq // 4 :] = 1
    n = batch
    ref_lp = torch.randn(2 * n, device=dev) - 50
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x),
        torch.autocast(dev, torch.bfloat16, enabled=dev == "cuda"),
    ):
        with capture_layer(model, layer) as box:
            logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
        lp, length = response_logps(logits, ids, resp)
        if method == "fpo":
            pooled = sae.encode_pooled(box["h"], resp)
            ref_idx = torch.randint(0, sae.d_sae, (2 * n, k), device=dev, generator=g)
            ref_val = torch.rand(2 * n, k, device=dev, generator=g).sort(-1, descending=True).values
            d = feature_mse(pooled, ref_idx, ref_val, k)
            loss, _ = fpo_loss(
                lp[:n], lp[n:], length[:n], length[n:], ref_lp[:n] / length[:n], ref_lp[n:] / length[n:], d[:n], d[n:]
            )
        else:
            loss, _ = dpo_loss(lp[:n], lp[n:], ref_lp[:n], ref_lp[n:])
    loss.mean().backward()
    seen = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in saved}
    return sum(seen.values())


def measure(model, sae, layer, batch, seq, vocab, method, dev, repeats):
    box = {}

    def one_step():
        model.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        box["saved"] = step(model, sae, layer, batch, seq, vocab, method, dev)

    secs = timeit(one_step, repeats)
    mem = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else box["saved"] / 2**20
    return {"step_s": secs, "memory_mb": mem}


def main():
    ap = parser(__doc__)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    hidden = a.hidden or (1024 if gpu else 256)
    layers = a.layers or (12 if gpu else 4)
    vocab = 32000 if gpu else 4096
    model = bench_llama(hidden, layers, vocab, max_positions=4096).to(dev)
    layer = layers // 2
    base = {"batch": 8 if gpu else 4, "seq": 512 if gpu else 128, "d_sae": 16 * hidden}
    sweeps = {
        "seq": [128, 256, 512, 1024, 2048] if gpu else [64, 128, 256, 512],
        "batch": [2, 4, 8, 16, 32] if gpu else [1, 2, 4, 8],
        "d_sae": [4 * hidden, 16 * hidden, 64 * hidden] if gpu else [4 * hidden, 16 * hidden, 64 * hidden],
    }
    out = {}
    for knob, values in sweeps.items():
        out[knob] = []
        for v in values:
            p = {**base, knob: v}
            sae = random_sae(hidden, p["d_sae"], "topk", k=32, noise=0.0).to(dev).requires_grad_(False)
            row = {knob: v}
            for method in ("fpo", "dpo"):
                r = measure(model, sae, layer, p["batch"], p["seq"], vocab, method, dev, a.repeats)
                row.update({f"{method}_step_s": r["step_s"], f"{method}_memory_mb": r["memory_mb"]})
            row["fpo_over_dpo_time"] = row["fpo_step_s"] / row["dpo_step_s"]
            out[knob].append(row)
            print(knob, row, flush=True)
            del sae
    params = sum(p.numel() for p in model.parameters())
    write_result(
        "scaling",
        {
            "model_params": params,
            "hidden": hidden,
            "layers": layers,
            "vocab": vocab,
            "base": base,
            "memory_measure": "peak allocated (GPU)" if gpu else "saved activations (CPU)",
            "sweeps": out,
        },
    )
    plot(out, os.path.join(RESULTS, f"scaling-{device_tag()}.png"), gpu)


def plot(out, path, gpu):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for j, (knob, rows) in enumerate(out.items()):
        xs = [r[knob] for r in rows]
        for method, style in (("fpo", "o-"), ("dpo", "s--")):
            axes[0, j].plot(xs, [r[f"{method}_step_s"] for r in rows], style, label=method)
            axes[1, j].plot(xs, [r[f"{method}_memory_mb"] for r in rows], style, label=method)
        for i in range(2):
            axes[i, j].set_xscale("log", base=2)
            axes[i, j].set_xlabel(knob)
            axes[i, j].legend(fontsize=8)
        axes[0, j].set_ylabel("step time (s)")
        axes[1, j].set_ylabel("peak allocated (MiB)" if gpu else "saved activations (MiB)")
    fig.suptitle("featalign step scaling: FPO (sparse pooled SAE) vs DPO with cache")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
