"""The main job: train every method from the same SFT model on one budget, evaluate, and report.

Each training run is its own process (``python -m featalign train``) so that its wall time and peak memory
are its own. The SAE and the offline reference cache are built once and shared by the cached methods.
Output folder: ``report.md`` (one table), ``results.json`` (every figure), ``curves.png``, ``frontier.png``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

ALL_METHODS = "dpo,ipo,simpo,dpo_ln,tdpo1,tdpo2,trdpo,fpo"
WORLD_JUDGE = "featalign.world.judge:reward"


def _world_keys(r: dict) -> dict:
    """The world judge's reward and parts under the report's ground-truth names."""
    r["gt_reward"] = r["reward"]
    for key, v in r.get("reward_parts", {}).items():
        r[f"gt_{key}"] = v
    return r


@dataclass
class CompareConfig:
    out: str = field(default="reports/compare", metadata={"help": "report folder (report.md, results.json, curves.png, frontier.png, runs/)"})
    world: str = field(default="data/world", metadata={"help": "built-in world folder (built when missing or built with other settings)"})
    quick: bool = field(default=False, metadata={"help": "the quick world and budget (a few minutes; what the tests run)"})
    seeds: int = field(default=1, metadata={"help": "training seeds per method (spreads and noise verdicts)"})
    methods: str = field(default=ALL_METHODS, metadata={"help": "comma-separated methods to train"})
    layer: int = field(default=2, metadata={"help": "decoder layer of the SAE and of FPO's constraint"})
    steps: int | None = field(default=None, metadata={"help": "training steps per method (default: 300, quick 40)"})
    batch_size: int = field(default=16, metadata={"help": "pairs per step"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate of every method"})
    simpo_lr: float | None = field(default=None, metadata={"help": "SimPO's own learning rate (default: --lr)"})
    trdpo_tau: int | None = field(default=None, metadata={"help": "TR-DPO reference update period (default: a quarter of the steps)"})
    trdpo_alpha: float = field(default=0.6, metadata={"help": "TR-DPO reference update weight"})
    k: int = field(default=50, metadata={"help": "FPO's k"})
    sae_d: int = field(default=512, metadata={"help": "SAE latents (trained on the SFT model, cached by its settings)"})
    sae_k: int = field(default=32, metadata={"help": "SAE TopK k"})
    sae_tokens: int | None = field(default=None, metadata={"help": "SAE training tokens (default: 600k, quick 150k)"})
    n_prompts: int | None = field(default=None, metadata={"help": "held-out prompts sampled per evaluation (default: 300, quick 64)"})
    max_length: int = field(default=128, metadata={"help": "max tokens of prompt + answer"})
    max_prompt_length: int = field(default=32, metadata={"help": "max prompt tokens"})

    def budget(self) -> dict:
        steps = self.steps or (40 if self.quick else 300)
        return {
            "steps": steps,
            "trdpo_tau": self.trdpo_tau or max(1, steps // 4),
            "n_prompts": self.n_prompts or (64 if self.quick else 300),
            "sae_tokens": self.sae_tokens or (150_000 if self.quick else 600_000),
        }


def _run(cmd: list[str], log_path: str) -> None:
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"command failed ({' '.join(cmd[:5])} ...), see {log_path}:\n{tail}")


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean paired difference a - b and its standard error."""
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / max(1, len(d) - 1))
    return m, sd / math.sqrt(len(d))


def compare(cfg: CompareConfig) -> dict:
    from .data import prepare_pairs
    from .evaluate import EvalConfig, eval_prompts, evaluate_policy, reference_answers
    from .judges import make_judge
    from .models import load_model, load_tokenizer
    from .reference import CacheSettings, build_cache, expected_manifest
    from .sae import load_sae
    from .sae.train import SAE_TRAIN_VERSION, SAETrainConfig, train_sae
    from .data import load_pairs, tokenize_pairs
    from .world import WorldConfig, build_world, world_paths

    b = cfg.budget()
    os.makedirs(cfg.out, exist_ok=True)
    t_start = time.time()
    world_dir = cfg.world + "-quick" if (cfg.quick and cfg.world == "data/world") else cfg.world
    wcfg = WorldConfig.quick() if cfg.quick else WorldConfig()
    manifest = build_world(world_dir, wcfg)
    wp = world_paths(world_dir)
    sft, train_data, test_data = wp["sft"], wp["train"], wp["test"]
    tok = load_tokenizer(sft)
    ref = load_model(sft).eval()

    sae_cfg = SAETrainConfig(model=sft, data=wp["sft_text"], layer=cfg.layer, out="", d_sae=cfg.sae_d, k=cfg.sae_k,
                             tokens=b["sae_tokens"])
    # the folder name carries a hash of every training setting (and of the trainer's version), so a
    # changed default never silently reuses an SAE trained the old way
    key = hashlib.sha256(json.dumps([SAE_TRAIN_VERSION, {k: v for k, v in asdict(sae_cfg).items()
                                                         if k not in ("out", "progress", "device")}], sort_keys=True).encode()).hexdigest()[:8]
    sae_dir = os.path.join(world_dir, f"sae-l{cfg.layer}-topk{cfg.sae_k}-{cfg.sae_d}-{b['sae_tokens']}-{key}")
    sae_cfg.out = sae_dir
    if not os.path.exists(os.path.join(sae_dir, "eval.json")):
        train_sae(sae_cfg, model=ref, tokenizer=tok)
    with open(os.path.join(sae_dir, "eval.json")) as f:
        sae_eval = json.load(f)

    cache_dir = os.path.join(cfg.out, "ref_cache")
    settings = CacheSettings(layer=cfg.layer, k=cfg.k, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    pairs = tokenize_pairs(load_pairs(train_data), tok, cfg.max_length, cfg.max_prompt_length)
    t0 = time.time()
    build_cache(ref, tok, pairs, cache_dir, expected_manifest(sft, train_data, sae_dir, settings), load_sae(sae_dir, cfg.layer),
                cfg.layer, cfg.k)
    cache_seconds = time.time() - t0

    ev = dict(data=test_data, ref_model=None, sae=sae_dir, layer=cfg.layer, k=cfg.k, n_prompts=b["n_prompts"],
              max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, reward_fn=WORLD_JUDGE)
    judge = make_judge(WORLD_JUDGE)
    _, test_pairs, _ = prepare_pairs(EvalConfig(**ev), tok)
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    results: dict = {"config": asdict(cfg), "budget": b, "world": manifest, "sae": sae_eval, "cache_seconds": cache_seconds,
                     "runs": {}}
    os.makedirs(os.path.join(cfg.out, "runs"), exist_ok=True)
    bar = tqdm(total=cfg.seeds * (len(methods) + 1), desc="compare")
    for seed in range(cfg.seeds):
        bar.set_postfix_str(f"sft seed {seed}")
        ecfg = EvalConfig(model=sft, seed=1234 + seed, **ev)
        reference = reference_answers(ecfg, ref, tok, *eval_prompts(test_pairs, b["n_prompts"]), judge)
        sft_res = _world_keys(evaluate_policy(ecfg, model=ref, ref=ref, tok=tok, judge=judge, reference=reference))
        sft_res.update(wall_seconds=0.0, peak_memory_mb=None)
        results["runs"].setdefault("sft", []).append(sft_res)
        bar.update()
        for m in methods:
            bar.set_postfix_str(f"{m} seed {seed}")
            run_dir = os.path.join(cfg.out, "runs", f"{m}-s{seed}")
            cmd = [sys.executable, "-m", "featalign", "train", "--method", m, "--model", sft, "--data", train_data,
                   "--out", run_dir, "--layer", str(cfg.layer), "--max-steps", str(b["steps"]), "--batch-size", str(cfg.batch_size),
                   "--lr", str(cfg.simpo_lr if (m == "simpo" and cfg.simpo_lr) else cfg.lr), "--seed", str(seed),
                   "--max-length", str(cfg.max_length), "--max-prompt-length", str(cfg.max_prompt_length), "--k", str(cfg.k),
                   "--trdpo-tau", str(b["trdpo_tau"]), "--trdpo-alpha", str(cfg.trdpo_alpha), "--no-progress", "--no-resume",
                   "--log-every", "5"]
            if m in ("dpo", "ipo", "dpo_ln", "fpo"):
                cmd += ["--cache", cache_dir]
            if m == "fpo":
                cmd += ["--sae", sae_dir]
            _run(cmd, os.path.join(cfg.out, "runs", f"{m}-s{seed}.log"))
            with open(os.path.join(run_dir, "summary.json")) as f:
                summary = json.load(f)
            pol = load_model(os.path.join(run_dir, "final")).eval()
            r = _world_keys(evaluate_policy(EvalConfig(model=run_dir, seed=1234 + seed, **ev), model=pol, ref=ref, tok=tok,
                                            judge=judge, reference=reference))
            r.update(wall_seconds=summary["wall_seconds"], peak_memory_mb=summary["peak_memory_mb"],
                     tokens_per_second=summary["tokens_per_second"], reference_model_loaded=summary["reference_model_loaded"])
            results["runs"].setdefault(m, []).append(r)
            bar.update()
    bar.close()
    results["summary"] = summarise(results["runs"])
    results["total_seconds"] = round(time.time() - t_start, 1)
    write_report(cfg, results)
    return results


METRICS = ["pref_accuracy", "reward_accuracy", "gt_reward", "win_rate", "lc_win_rate", "entropy", "distinct2", "kl_to_ref",
           "feature_mse", "wall_seconds", "peak_memory_mb", "gt_topic", "gt_sentiment", "gt_length", "mean_length"]


def summarise(runs: dict) -> dict:
    out = {}
    for m, rs in runs.items():
        row = {}
        for key in METRICS:
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                mean = sum(vals) / len(vals)
                sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
                row[key] = {"mean": mean, "sd": sd, "n": len(vals)}
        out[m] = row
    # reward differences with their noise: paired over prompts, pooled over seeds
    for m in runs:
        if m == "sft":
            continue
        for base in ("sft", "dpo"):
            if base == m or base not in runs:
                continue
            a = [x for r in runs[m] for x in r["rewards_per_prompt"]]
            c = [x for r in runs[base] for x in r["rewards_per_prompt"]]
            diff, se = _paired(a, c)
            out[m][f"gt_reward_minus_{base}"] = {"mean": diff, "se": se, "within_noise": abs(diff) < 2 * se}
    return out


def _fmt(row: dict, key: str, digits: int = 3) -> str:
    if key not in row:
        return "-"
    v = row[key]
    s = f"{v['mean']:.{digits}f}"
    if v.get("n", 1) > 1:
        s += f" ± {v['sd']:.{digits}f}"
    return s


def write_report(cfg: CompareConfig, results: dict) -> None:
    s = results["summary"]
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    cols = [("pref acc", "pref_accuracy", 3), ("reward acc", "reward_accuracy", 3), ("GT reward", "gt_reward", 3),
            ("win vs SFT", "win_rate", 3), ("LC win", "lc_win_rate", 3), ("entropy", "entropy", 3), ("KL to SFT", "kl_to_ref", 2),
            ("feature MSE", "feature_mse", 4), ("wall s", "wall_seconds", 1), ("peak MB", "peak_memory_mb", 0)]
    lines = [f"# featalign compare ({'quick' if cfg.quick else 'default'} budget, {cfg.seeds} seed(s))", "",
             "| method | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, row in s.items():
        lines.append(f"| {m} | " + " | ".join(_fmt(row, k, d) for _, k, d in cols) + " |")
    b = results["budget"]
    lines += ["", f"Budget: {b['steps']} steps x batch {cfg.batch_size} pairs per method, lr {cfg.lr}; TR-DPO tau {b['trdpo_tau']}, "
              f"alpha {cfg.trdpo_alpha}; FPO k={cfg.k} at layer {cfg.layer}. Generations: {b['n_prompts']} held-out prompts x seeds, "
              "temperature 1.0, no top-k, max 48 new tokens. Peak MB: the training process's peak resident memory (CPU) or "
              "peak allocated GPU memory. Feature MSE: FPO's D on held-out chosen responses (policy vs SFT reference).", "",
              "## Differences and noise", "",
              "Ground-truth reward differences, paired over the same prompts (± one standard error); "
              "'inside the noise' when |difference| < 2 SE.", ""]
    for m, row in s.items():
        for base in ("sft", "dpo"):
            d = row.get(f"gt_reward_minus_{base}")
            if d:
                verdict = "inside the noise" if d["within_noise"] else "outside the noise"
                lines.append(f"- {m} - {base}: {d['mean']:+.3f} ± {d['se']:.3f} ({verdict})")
    if "fpo" in s and "dpo" in s:
        f_, d_ = s["fpo"], s["dpo"]
        better = f_["gt_reward"]["mean"] >= d_["gt_reward"]["mean"]
        lower_kl = f_["kl_to_ref"]["mean"] <= d_["kl_to_ref"]["mean"]
        lines += ["", "## FPO vs DPO", "",
                  f"FPO ground-truth reward {f_['gt_reward']['mean']:.3f} vs DPO {d_['gt_reward']['mean']:.3f} "
                  f"({'at least as good' if better else 'lower'}), KL to SFT {f_['kl_to_ref']['mean']:.2f} vs {d_['kl_to_ref']['mean']:.2f} "
                  f"({'equal or lower' if lower_kl else 'higher'})."]
    sae = results["sae"]
    lines += ["", f"SAE (TopK, layer {cfg.layer}, {cfg.sae_d} latents, k={cfg.sae_k}): explained variance "
              f"{sae['explained_variance']:.3f}, L0 {sae['l0']:.1f}, dead {sae['dead_fraction']:.1%}, CE loss recovered "
              f"{sae['ce_loss_recovered']:.3f}. Reference cache built in {results['cache_seconds']:.1f} s.",
              f"Total time {results['total_seconds']:.0f} s.", "", "![training curves](curves.png)", "", "![reward vs KL](frontier.png)"]
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(cfg, results)
    print("\n".join(lines[: 4 + len(s)]))
    print(f"\nreport: {os.path.join(cfg.out, 'report.md')}")


def plot(cfg: CompareConfig, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for m in results["runs"]:
        path = os.path.join(cfg.out, "runs", f"{m}-s0", "metrics.jsonl")
        if not os.path.exists(path):
            continue
        recs = [json.loads(line) for line in open(path)]
        steps = [r["step"] for r in recs]
        for ax, key in zip(axes, ("loss", "rewards/accuracies", "rewards/margins")):
            ax.plot(steps, [r[key] for r in recs], label=m)
            ax.set_title(key)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "curves.png"), dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m, row in results["summary"].items():
        x = row.get("kl_to_ref", {}).get("mean", 0.0)
        y = row["gt_reward"]["mean"]
        ax.scatter([x], [y])
        ax.annotate(m, (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("sequence KL to SFT (nats)")
    ax.set_ylabel("mean ground-truth reward")
    ax.set_title("reward vs KL frontier")
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "frontier.png"), dpi=100)
    plt.close(fig)
