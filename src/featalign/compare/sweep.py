"""The sweep: train and evaluate every (method, knob value, seed) of a budget from one source.

Each run is a ``TrainConfig`` written to ``runs/<run>/config.yaml`` and run by ``featalign train --config`` in a
process of its own (so its peak memory is its own), or in this process (``isolate_runs`` off). Finished runs are
keyed on their settings and reused, so a killed sweep resumes; every run is judged against the SFT model's own
samples, drawn once per seed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

from tqdm.auto import tqdm

from ..atomic import write_json
from ..config import settings_key
from ..errors import RunFailedError
from ..losses import METHODS
from ..train import TrainConfig
from .budget import KNOB, Budget, CompareConfig
from .sources import Source

RUN_VERSION = 3  # bumped when a run's training or evaluation changes in a way its settings do not show


def run_command(argv: list[str], log_path: str, isolate: bool = True) -> None:
    """``featalign <argv>`` in a process of its own, or in this one; its output goes to ``log_path``."""
    with open(log_path, "w") as log:
        if isolate:
            rc = subprocess.run(
                [sys.executable, "-m", "featalign", *argv], stdout=log, stderr=subprocess.STDOUT
            ).returncode
        else:
            from ..cli import main

            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                rc = main(argv)
    if rc != 0:
        with open(log_path) as f:
            last = [line.strip() for line in f if line.strip()][-1:] or ["(empty log)"]
        raise RunFailedError(
            f"featalign {' '.join(argv[:3])} failed (exit {rc}); see {log_path}, which ends: {last[0][:300]}"
        )


def train_config(
    cfg: CompareConfig, src: Source, b: Budget, cache_dir: str, method: str, value: float, seed: int, out: str
) -> TrainConfig:
    """One run's training settings: the budget's, the method's knob at ``value``, the shared offline cache for the
    methods that read one, the source's SAE for FPO."""
    spec = METHODS[method]
    lr = b.simpo_lr if method == "simpo" else b.lr
    controls = {
        name: getattr(cfg, name)
        for name in ("ablate_features", "preserve_features", "preserve_weight", "suppress_features", "suppress_weight")
    }
    controlled = bool(cfg.ablate_features or cfg.preserve_features or cfg.suppress_features)
    # a run with feature controls builds its own cache: the shared one holds neither a reference run under ablation
    # nor the preserved features' values
    shared = spec.ref_logps and not spec.live_reference and not controlled
    return TrainConfig(
        method=method,
        model=src.sft,
        data=src.train,
        out=out,
        layer=src.layer,
        max_steps=b.steps,
        batch_size=b.batch_size,
        lr=lr,
        seed=seed,
        max_length=b.max_length,
        max_prompt_length=b.max_prompt_length,
        k=cfg.k,
        trdpo_tau=b.trdpo_tau,
        trdpo_alpha=cfg.trdpo_alpha,
        log_every=5,
        progress=False,
        resume=False,
        cache=cache_dir if shared else None,
        sae=src.sae if spec.features or controlled else None,
        fpo_variant=cfg.fpo_variant,
        **controls,
        **{KNOB[method]: value},
    )


class Evaluator:
    """Evaluates every run of a sweep with one judge, against the SFT model's own samples per seed (drawn once)."""

    def __init__(self, src: Source, b: Budget, cfg: CompareConfig, ref, tok):
        from ..judges import make_judge
        from ..reference import path_hash

        self.src, self.b, self.cfg, self.ref, self.tok = src, b, cfg, ref, tok
        self.judge = make_judge(src.reward_fn, src.reward_model)
        self.references: dict[int, dict] = {}
        # the contents, not the paths: a model, data file or SAE changed in place is not the one a run was judged on
        self.contents = {name: path_hash(getattr(src, name)) for name in ("sft", "train", "test", "sae")}

    def config(self, model_path: str, seed: int):
        from ..evaluate import EvalConfig

        b = self.b
        return EvalConfig(
            model=model_path,
            data=self.src.test,
            sae=self.src.sae,
            layer=self.src.layer,
            k=self.cfg.k,
            n_prompts=b.n_prompts,
            max_length=b.max_length,
            max_prompt_length=b.max_prompt_length,
            max_new_tokens=b.max_new_tokens,
            seed=1234 + seed,
            progress=False,
        )

    def key(self) -> list:
        """What every evaluation depends on besides the policy: part of each run's key."""
        b, s = self.b, self.src
        return [
            RUN_VERSION,
            self.contents,
            b.n_prompts,
            self.cfg.k,
            b.max_length,
            b.max_prompt_length,
            b.max_new_tokens,
            s.reward_fn,
            s.reward_model,
        ]

    def __call__(self, seed: int, model, model_path: str) -> dict:
        from .. import data as D
        from ..evaluate import eval_prompts, evaluate_policy, reference_answers

        ev = self.config(model_path, seed)
        if seed not in self.references:
            _, pairs, _ = D.prepare_pairs(ev, self.tok)
            prompts, ids = eval_prompts(pairs, ev.n_prompts, ev.samples_per_prompt)
            self.references[seed] = reference_answers(ev, self.ref, self.tok, prompts, ids, self.judge)
        r = evaluate_policy(
            ev, model=model, ref=self.ref, tok=self.tok, judge=self.judge, reference=self.references[seed]
        )
        # the judged reward under the report's names: gt_reward, gt_<part>
        r["gt_reward"] = r["reward"]
        r.update({f"gt_{k}": v for k, v in r.get("reward_parts", {}).items()})
        r["win_rate_vs_sft"], r["lc_win_rate_vs_sft"] = r["win_rate"], r["lc_win_rate"]
        return r


def cached(path: str, make) -> tuple[dict, bool]:
    """``make()`` once: its result is stored at ``path`` and read back on later calls; (result, reused)."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f), True
    res = make()
    write_json(path, res, indent=None)
    return res, False


def _shared_cache(cfg: CompareConfig, src: Source, b: Budget, ref, tok) -> str:
    """The reference's offline cache over the training pairs (log-probs and the SAE's top-k), built once for every
    run that reads one."""
    from ..data import load_pairs, tokenize_pairs
    from ..reference import CacheSettings, build_cache, expected_manifest
    from ..sae import load_sae

    cache_dir = os.path.join(cfg.out, "ref_cache")
    settings = CacheSettings(
        layer=src.layer,
        k=cfg.k,
        max_length=b.max_length,
        max_prompt_length=b.max_prompt_length,
        fpo_variant=cfg.fpo_variant,
    )
    pairs = tokenize_pairs(load_pairs(src.train), tok, b.max_length, b.max_prompt_length)
    manifest = expected_manifest(src.sft, src.train, src.sae, settings)
    sae = load_sae(src.sae, src.layer)
    build_cache(ref, tok, pairs, cache_dir, manifest, sae, src.layer, cfg.k, fpo_variant=cfg.fpo_variant)
    return cache_dir


def _train_and_evaluate(cfg: CompareConfig, tcfg: TrainConfig, evaluate: Evaluator, seed: int) -> dict:
    from ..models import load_model

    run_dir = tcfg.out
    shutil.rmtree(run_dir, ignore_errors=True)  # a run killed half-way starts over
    os.makedirs(run_dir)
    tcfg.save(os.path.join(run_dir, "config.yaml"))
    run_command(["train", "--config", os.path.join(run_dir, "config.yaml")], run_dir + ".log", cfg.isolate_runs)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    r = evaluate(seed, load_model(os.path.join(run_dir, "final")).eval(), run_dir)
    r.update({k: summary[k] for k in ("wall_seconds", "peak_memory_mb", "tokens_per_second", "reference_model_loaded")})
    if not cfg.isolate_runs:
        r["peak_memory_mb"] = None  # the whole sweep's process, not the run's
    return r


def sweep(cfg: CompareConfig, src: Source, progress: bool = True) -> list[dict]:
    """Train and evaluate every (method, knob value, seed), reusing runs whose settings were already run."""
    from ..models import load_model, load_tokenizer

    b = cfg.budget()
    tok = load_tokenizer(src.tokenizer)
    ref = load_model(src.sft).eval()
    cache_dir = _shared_cache(cfg, src, b, ref, tok)
    evaluate = Evaluator(src, b, cfg, ref, tok)
    runs_dir = os.path.join(cfg.out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    jobs = [(m, v, s) for s in range(b.seeds) for m, vals in b.grid.items() for v in vals]
    bar = tqdm(total=len(jobs) + b.seeds, desc="compare", disable=not progress)
    runs = []
    for seed in range(b.seeds):
        bar.set_postfix_str(f"sft seed {seed}")
        path = os.path.join(runs_dir, f"sft-s{seed}-{settings_key([evaluate.key(), src.sft, seed])}.json")
        res, reused = cached(path, lambda seed=seed: {**evaluate(seed, ref, src.sft), "wall_seconds": 0.0})
        runs.append({"method": "sft", "knob": None, "value": None, "seed": seed, "reused": reused, **res})
        bar.update()
    for m, value, seed in jobs:
        bar.set_postfix_str(f"{m} {KNOB[m]}={value:g} seed {seed}")
        tcfg = train_config(cfg, src, b, cache_dir, m, value, seed, out="")
        settings = {k: v for k, v in asdict(tcfg).items() if k not in ("out", "progress")}
        tcfg.out = os.path.join(runs_dir, f"{m}-{KNOB[m]}{value:g}-s{seed}-{settings_key([evaluate.key(), settings])}")
        res, reused = cached(
            os.path.join(tcfg.out, "eval.json"),
            lambda tcfg=tcfg, seed=seed: _train_and_evaluate(cfg, tcfg, evaluate, seed),
        )
        runs.append(
            {"method": m, "knob": KNOB[m], "value": value, "seed": seed, "run_dir": tcfg.out, "reused": reused, **res}
        )
        bar.update()
    bar.close()
    return runs
