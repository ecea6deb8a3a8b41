"""Peak memory of one training run per method, each in its own process, on the same model and data.

The world's 1.4M-parameter model is too small for the reference model to show in a process's peak RSS
(the torch runtime dominates), so this benchmark uses a wider Llama (random init, the world tokenizer)
and an SAE of matching width. FPO and DPO read the offline cache built beforehand by `featalign cache`
in a separate process, so their training processes never hold a reference model; TDPO-2 keeps one live.

Two measures: the training process's peak RSS (what `summary.json` reports on CPU; it includes the
allocator's behaviour and is noisy by tens of MB) and an allocator-independent tensor account of one
step (`tensor_memory`). On a GPU, `peak_memory_mb` is `torch.cuda.max_memory_allocated`, exact.

Usage: python bench/memory.py [--hidden 512 --layers 8 --steps 20]  -> bench/results/memory-<device>.json
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import ROOT, make_model, make_sae, parser, scratch  # noqa: E402


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return p.stdout


def tensor_memory(cfg_kwargs: dict) -> dict:
    """Allocator-independent memory of one training step: bytes of persistent tensors (policy weights,
    gradients, AdamW state, reference model, SAE, offline cache) plus activations saved for backward
    (counted once per storage with ``saved_tensors_hooks``)."""
    from featalign import data as D
    from featalign.train import TrainConfig
    from featalign.trainer import Trainer

    t = Trainer(TrainConfig(**cfg_kwargs))

    def nbytes(tensors):
        seen = {}
        for x in tensors:
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return sum(seen.values())

    batch = D.collate_pairs(t.pairs[: cfg_kwargs["batch_size"]], t.tokenizer.pad_token_id)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss, _ = t.loss(t.model, batch)
    activations = nbytes(saved)
    loss.backward()
    t.opt.step()
    policy = list(t.model.parameters())
    parts = {
        "policy_weights": nbytes(policy),
        "gradients": nbytes(p.grad for p in policy if p.grad is not None),
        "optimizer_state": nbytes(
            v for st in t.opt.state_dict()["state"].values() for v in st.values() if torch.is_tensor(v) and v.dim()
        ),
        "reference_model": nbytes(t.ref_model.parameters()) if t.ref_model is not None else 0,
        "sae": nbytes(t.sae.parameters()) if t.sae is not None else 0,
        "offline_cache": t.cache.nbytes() if t.cache is not None else 0,
        "saved_activations": activations,
    }
    parts["total"] = sum(parts.values())
    return {k: round(v / 2**20, 2) for k, v in parts.items()}


def main():
    ap = parser(__doc__)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--methods",
        default="fpo,dpo,simpo,tdpo2,tdpo2+lora",
        help="methods; NAME+lora trains a rank-16 LoRA adapter, a live reference being the adapter switched off",
    )
    ap.add_argument("--world", default=os.path.join(ROOT, "data", "world-quick"))
    args = ap.parse_args()
    from featalign.world import WorldConfig, build_world, world_paths

    build_world(args.world, WorldConfig.quick())
    wp = world_paths(args.world)
    tmp = scratch(prefix="featalign-mem-")
    model_dir, sae_dir, cache_dir = (os.path.join(tmp, x) for x in ("model", "sae", "cache"))
    n_params = make_model(model_dir, args.hidden, args.layers, chat_template=True)
    make_sae(sae_dir, args.hidden, 8 * args.hidden, args.layers // 2)
    layer = str(args.layers // 2)
    common = ["--max-length", "96", "--max-prompt-length", "32"]
    run(
        [
            sys.executable,
            "-m",
            "featalign",
            "cache",
            "--model",
            model_dir,
            "--data",
            wp["train"],
            "--sae",
            sae_dir,
            "--layer",
            layer,
            "--out",
            cache_dir,
            *common,
        ]
    )
    results = {
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()})",
        "model_params": n_params,
        "hidden": args.hidden,
        "layers": args.layers,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "runs": {},
    }
    for name in args.methods.split(","):
        m, lora = (name[: -len("+lora")], 16) if name.endswith("+lora") else (name, 0)
        out = os.path.join(tmp, name)
        cmd = [
            sys.executable,
            "-m",
            "featalign",
            "train",
            "--method",
            m,
            "--lora-r",
            str(lora),
            "--model",
            model_dir,
            "--data",
            wp["train"],
            "--out",
            out,
            "--max-steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--lr",
            "1e-5",
            "--no-progress",
            "--no-tensorboard",
            "--no-resume",
            *common,
        ]
        if m in ("dpo", "ipo", "dpo_ln", "fpo"):
            cmd += ["--cache", cache_dir]
        if m == "fpo":
            cmd += ["--sae", sae_dir, "--layer", layer]
        run(cmd)
        s = json.load(open(os.path.join(out, "summary.json")))
        results["runs"][name] = {
            k: s[k] for k in ("peak_memory_mb", "wall_seconds", "tokens_per_second", "reference_model_loaded")
        }
        kw = dict(
            method=m,
            model=model_dir,
            data=wp["train"],
            out=out + "-tensors",
            batch_size=args.batch_size,
            max_steps=1,
            max_length=96,
            max_prompt_length=32,
            progress=False,
            tensorboard=False,
            resume=False,
            lora_r=lora,
            cache=cache_dir if m in ("dpo", "ipo", "dpo_ln", "fpo") else None,
        )
        if m == "fpo":
            kw.update(sae=sae_dir, layer=int(layer))
        results["runs"][name]["tensor_memory_mb"] = tensor_memory(kw)
        print(name, results["runs"][name], flush=True)
    r = results["runs"]
    if "fpo" in r and "tdpo2" in r:
        results["fpo_vs_tdpo2_peak_rss_ratio"] = r["fpo"]["peak_memory_mb"] / r["tdpo2"]["peak_memory_mb"]
        results["fpo_vs_tdpo2_tensor_ratio"] = (
            r["fpo"]["tensor_memory_mb"]["total"] / r["tdpo2"]["tensor_memory_mb"]["total"]
        )
    if "tdpo2" in r and "tdpo2+lora" in r:
        results["tdpo2_lora_vs_tdpo2_peak_rss_ratio"] = r["tdpo2+lora"]["peak_memory_mb"] / r["tdpo2"]["peak_memory_mb"]
        results["tdpo2_lora_vs_tdpo2_tensor_ratio"] = (
            r["tdpo2+lora"]["tensor_memory_mb"]["total"] / r["tdpo2"]["tensor_memory_mb"]["total"]
        )
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    path = os.path.join(ROOT, "bench", "results", f"memory-{tag}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
