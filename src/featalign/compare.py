"""The main job: reward-vs-KL frontiers of every method, trained from one SFT model on one budget.

Each method is trained at several values of its KL knob (beta for the DPO family, alpha for FPO and TDPO-2)
and several seeds, each run in its own process (``python -m featalign train``) so that its wall time and
peak memory are its own. One point per method cannot compare methods that sit at different KLs; a
frontier can: the ground-truth reward is interpolated at common KL levels, per seed, and compared there
with its spread across seeds. Finished runs are keyed on their settings and reused, so a killed sweep
resumes. The sweep only sees a ``Source`` (SFT model, pairs, SAE); ``world_source`` builds the built-in one.
Output folder: ``report.md``, ``results.json`` (every figure), ``frontier.png``, ``curves.png``, ``runs/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

from tqdm.auto import tqdm

from .atomic import write_json
from .config import Config, check_model_path, setting
from .errors import ConfigError

ALL_METHODS = "dpo,ipo,simpo,dpo_ln,tdpo1,tdpo2,trdpo,fpo"
# the knob that trades reward for closeness to the reference, and its grid (largest KL first). beta
# scales the implicit reward (larger: stays closer); alpha weighs TDPO-2's token KL and FPO's feature
# term (larger: stays closer). The grids span the published defaults (beta 0.1, SimPO 2, alpha 0.5)
# by about 10x either way, where the world's KL moves from well under 1 nat to several.
KNOB = {
    "dpo": "beta",
    "ipo": "beta",
    "simpo": "beta",
    "dpo_ln": "beta",
    "tdpo1": "beta",
    "trdpo": "beta",
    "tdpo2": "alpha",
    "fpo": "alpha",
}
GRID = {
    "dpo": [0.03, 0.1, 0.3, 1.0, 3.0],
    "ipo": [0.03, 0.1, 0.3, 1.0, 3.0],
    "simpo": [0.5, 1.0, 2.0, 5.0, 10.0],
    "dpo_ln": [0.03, 0.1, 0.3, 1.0, 3.0],
    "tdpo1": [0.03, 0.1, 0.3, 1.0, 3.0],
    "trdpo": [0.03, 0.1, 0.3, 1.0, 3.0],
    "tdpo2": [0.02, 0.05, 0.2, 0.5, 2.0],
    "fpo": [0.05, 0.2, 0.5, 2.0, 8.0],
}
# on the built-in world FPO's grid sits lower: the world SAE's feature term binds harder, and at alpha 0.2-2 FPO's KL
# stays below most of the range DPO's grid covers, so the two frontiers would barely overlap (bench/results, docs)
WORLD_GRID = {**GRID, "fpo": [0.003, 0.01, 0.03, 0.1, 0.3]}
# the papers' own settings: a one-value sweep runs each method where it was published
PUBLISHED = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "dpo_ln": 0.1, "tdpo1": 0.1, "trdpo": 0.1, "tdpo2": 0.5, "fpo": 0.5}
# the default tier keeps the middle three values of each grid; quick keeps the two ends of those.
# The world's SAE is Feature Choice with Zipf-shaped token shares: on the world's narrow layer-2 stream (about 200
# features, some on 5-9% of the tokens) no TopK SAE of 128-512 latents kept both dead and dense latents under 5%
WORLD = dict(
    lr=1e-4,
    batch_size=16,
    sae_arch="featurechoice",
    sae_d=256,
    sae_k=6,
    sae_fc_zipf=1.0,
    sae_lr=1e-2,
    sae_dead_tokens=100_000,
    max_length=128,
    max_prompt_length=32,
    max_new_tokens=48,
)
TIERS = {
    "quick": dict(WORLD, methods="dpo,fpo", seeds=1, grid_values=2, steps=40, n_prompts=64, sae_tokens=150_000),
    "default": dict(WORLD, methods="dpo,fpo", seeds=2, grid_values=3, steps=200, n_prompts=200, sae_tokens=2_000_000),
    "full": dict(WORLD, methods=ALL_METHODS, seeds=3, grid_values=5, steps=300, n_prompts=300, sae_tokens=4_000_000),
}
# a real LM (--model, --preset sentiment): full fine-tuning at a small lr and an SAE 8x the hidden size; the default
# tier runs the sentiment preset's four methods on SmolLM2-135M on 2 CPU cores in about 20 minutes
REAL = dict(
    lr=5e-5,
    batch_size=8,
    sae_arch="topk",
    sae_fc_zipf=0.0,
    sae_d=None,
    sae_k=None,
    sae_lr=3e-3,
    sae_dead_tokens=10_000_000,
    max_length=192,
    max_prompt_length=None,
    max_new_tokens=40,
)
REAL_TIERS = {
    "quick": dict(REAL, methods="dpo,fpo", seeds=1, grid_values=1, steps=4, n_prompts=16, sae_tokens=20_000),
    "default": dict(
        REAL, methods="dpo,simpo,tdpo2,fpo", seeds=1, grid_values=1, steps=12, n_prompts=64, sae_tokens=40_000, lr=1e-4
    ),
    "full": dict(
        REAL, methods="dpo,simpo,tdpo2,fpo", seeds=2, grid_values=3, steps=60, n_prompts=128, sae_tokens=400_000
    ),
}
PRESET_JUDGE = {"world": "featalign.world.judge:reward", "sentiment": "featalign.sentiment:reward"}
RUN_VERSION = 2  # bumped when a run's training or evaluation changes in a way its settings do not show


@dataclass
class CompareConfig(Config):
    """`featalign compare`: every method trained from one SFT model on one budget, judged at matched KL."""

    out: str = setting("reports/compare", "report folder (report.md, results.json, frontier.png, curves.png, runs/)")
    preset: Literal["world", "sentiment"] = setting(
        "world", "world: the built-in world; sentiment: SmolLM2 (or --model) made more positive, judged by VADER"
    )
    model: str | None = setting(
        None, "your starting (SFT) model: HF folder, hub id or .gguf file; with data, replaces the world"
    )
    data: str | None = setting(None, "your preference data to train on (any format `train` reads)")
    test_data: str | None = setting(
        None, "held-out preference data to evaluate on (default: a test_fraction split of data, by prompt)"
    )
    test_fraction: float = setting(0.1, "share of the data's prompts held out when no test_data is given", gt=0, lt=1)
    sae: str | None = setting(
        None, "SAE for FPO (any format); default: one trained on the model's layer with the sae_* settings"
    )
    reward_fn: str | None = setting(
        None, "judge: a Python callable 'module:function' taking (prompt, response) (default: the preset's)"
    )
    reward_model: str | None = setting(None, "judge: a sequence-classification reward model folder")
    world: str = setting(
        "data/world",
        "built-in world folder (built when missing); with the sentiment preset, the task's (data/sentiment)",
    )
    world_seed: int = setting(0, "seed of the built-in world: its corpus, SFT model and SAE")
    quick: bool = setting(False, "quick tier: small world, DPO and FPO, two knob values, one seed (a few minutes)")
    full: bool = setting(
        False, "full tier: every method, five knob values, three seeds, longer runs (hours on 2 cores)"
    )
    seeds: int | None = setting(None, "training seeds per knob value (default: quick 1, default 2, full 3)", ge=1)
    methods: str | None = setting(None, f"comma-separated methods (default: dpo,fpo; full tier: {ALL_METHODS})")
    grid: str = setting(
        "", "knob values per method, e.g. 'dpo=0.1,0.3;fpo=0.5,2' (default: the tier's slice of each grid)"
    )
    kl_levels: str = setting(
        "", "comma-separated KL levels in nats to compare rewards at (default: 6 where two methods overlap)"
    )
    layer: int | None = setting(
        None, "decoder layer of the SAE and of FPO's constraint (default: 2 in the world, else the middle)"
    )
    steps: int | None = setting(None, "training steps per run (default: the tier's)", ge=1)
    batch_size: int | None = setting(None, "pairs per step (default: world 16, real model 8)", ge=1)
    lr: float | None = setting(None, "learning rate of every method (default: the tier's)", gt=0)
    simpo_lr: float | None = setting(None, "SimPO's own learning rate (default: lr)", gt=0)
    trdpo_tau: int | None = setting(None, "TR-DPO reference update period (default: a quarter of the steps)", ge=1)
    trdpo_alpha: float = setting(0.6, "TR-DPO reference update weight", gt=0, le=1)
    k: int = setting(50, "FPO's k", ge=1)
    sae_arch: Literal["topk", "batchtopk", "featurechoice"] | None = setting(
        None, "SAE architecture (default: world featurechoice, real model topk)"
    )
    sae_fc_zipf: float | None = setting(
        None, "Feature Choice SAE: Zipf exponent of the latents' token shares (default: world 1)", ge=0
    )
    sae_d: int | None = setting(None, "SAE latents (default: world 256, real model 8x its hidden size)", ge=1)
    sae_k: int | None = setting(
        None, "SAE active latents per token (default: world 6, real model 5% of its hidden size)", ge=1
    )
    sae_dead_tokens: int | None = setting(
        None, "SAE: a latent silent for this many tokens is trained by AuxK (default: world 100k, else 10M)", ge=1
    )
    sae_tokens: int | None = setting(None, "SAE training tokens (default: the tier's)", ge=1)
    sae_lr: float | None = setting(None, "SAE learning rate (default: world 1e-2, real model 3e-3)", gt=0)
    n_prompts: int | None = setting(None, "held-out prompts sampled per evaluation (default: the tier's)", ge=1)
    max_length: int | None = setting(
        None, "most tokens of prompt plus answer (default: world 128, real model 192)", ge=2
    )
    max_prompt_length: int | None = setting(
        None, "most prompt tokens (default: world 32, real model half of max_length)", ge=1
    )
    max_new_tokens: int | None = setting(
        None, "most tokens per sampled answer in evaluation (default: world 48, real model 40)", ge=1
    )
    isolate_runs: bool = setting(
        True, "train each run in a process of its own, so its peak memory is its own (off: faster, no peak memory)"
    )

    def validate(self) -> None:
        super().validate()
        check_model_path(self.model or "")
        self.budget()

    @property
    def tier(self) -> str:
        return "quick" if self.quick else "full" if self.full else "default"

    @property
    def real(self) -> bool:
        return self.preset != "world" or bool(self.model)

    def budget(self) -> dict:
        if self.preset not in PRESET_JUDGE:
            raise ConfigError(f"preset: {self.preset!r} is not one of {', '.join(PRESET_JUDGE)}")
        t = (REAL_TIERS if self.real else TIERS)[self.tier]
        steps = self.steps or t["steps"]
        methods = [m.strip() for m in (self.methods or t["methods"]).split(",") if m.strip()]
        for m in methods:
            if m not in KNOB:
                raise ConfigError(f"methods: unknown method {m!r}; choose from {ALL_METHODS}")
        grids = GRID if self.real else WORLD_GRID
        grid = {m: [PUBLISHED[m]] if t["grid_values"] == 1 else _middle(grids[m], t["grid_values"]) for m in methods}
        for item in filter(None, (s.strip() for s in self.grid.split(";"))):
            m, _, vals = item.partition("=")
            if m.strip() not in grid or not vals:
                raise ConfigError(f"grid: {item!r} is not 'method=v1,v2' for one of the methods {','.join(methods)}")
            grid[m.strip()] = [float(v) for v in vals.split(",")]
        settings = {k: getattr(self, k) if getattr(self, k) is not None else t[k] for k in WORLD}
        return {
            **settings,
            "tier": self.tier,
            "steps": steps,
            "trdpo_tau": self.trdpo_tau or max(1, steps // 4),
            "seeds": self.seeds or t["seeds"],
            "n_prompts": self.n_prompts or t["n_prompts"],
            "sae_tokens": self.sae_tokens or t["sae_tokens"],
            "grid": grid,
        }


def _middle(values: list[float], n: int) -> list[float]:
    """A tier's slice of a 5-value grid: all, the middle three, or the two ends of the middle three."""
    if n >= len(values):
        return values
    return values[1:4] if n == 3 else [values[1], values[3]]


@dataclass
class Source:
    """What a comparison trains from and is judged on: the sweep sees only this, so a user's own model and
    data plug in by building one (an SFT model, its tokenizer, train/test preference pairs, an SAE)."""

    sft: str
    tokenizer: str
    train: str
    test: str
    sae: str
    layer: int
    reward_fn: str | None = None
    reward_model: str | None = None
    info: dict = field(default_factory=dict)


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _trained_sae(
    cfg: CompareConfig,
    b: dict,
    model_path: str,
    data: str,
    layer: int,
    root: str,
    model,
    tokenizer,
    progress: bool = True,
) -> tuple[str, dict]:
    """Train (or reuse) the comparison's SAE, keyed on every training setting and the trainer's version (a
    changed default never reuses a stale SAE); returns its folder and its evaluation."""
    from .models import hidden_size
    from .sae import load_sae
    from .sae.metrics import decoder_cosine_to_init
    from .sae.train import SAE_TRAIN_VERSION, SAETrainConfig, train_sae

    d = hidden_size(model)
    sae_k = b["sae_k"] or max(1, d // 20)
    d_sae = b["sae_d"] or 8 * d
    sae_cfg = SAETrainConfig(
        model=model_path,
        data=data,
        layer=layer,
        out="",
        architecture=b["sae_arch"],
        d_sae=d_sae,
        k=sae_k,
        fc_zipf=b["sae_fc_zipf"],
        tokens=b["sae_tokens"],
        lr=b["sae_lr"],
        dead_tokens=b["sae_dead_tokens"],
        seed=cfg.world_seed,
        progress=progress,
    )
    key = _key(
        [SAE_TRAIN_VERSION, {k: v for k, v in asdict(sae_cfg).items() if k not in ("out", "progress", "device")}]
    )
    sae_cfg.out = os.path.join(root, f"sae-l{layer}-{b['sae_arch']}{sae_k}-{d_sae}-{key}")
    if not os.path.exists(os.path.join(sae_cfg.out, "eval.json")):
        train_sae(sae_cfg, model=model, tokenizer=tokenizer)
    with open(os.path.join(sae_cfg.out, "eval.json")) as f:
        sae_eval = json.load(f)
    sae_eval["decoder_cosine_to_init"] = decoder_cosine_to_init(load_sae(sae_cfg.out))
    sae_eval["config"] = {
        "architecture": b["sae_arch"],
        **({"fc_zipf": b["sae_fc_zipf"]} if b["sae_arch"] == "featurechoice" else {}),
        "d_sae": d_sae,
        "k": sae_k,
        "tokens": b["sae_tokens"],
        "lr": b["sae_lr"],
        "dead_tokens": b["sae_dead_tokens"],
    }
    return sae_cfg.out, sae_eval


def world_source(cfg: CompareConfig, progress: bool = True) -> Source:
    """Build (or reuse) the built-in world and its SAE at ``cfg.layer`` (default 2)."""
    from .models import load_model, load_tokenizer
    from .world import WorldConfig, build_world, world_paths

    b = cfg.budget()
    layer = 2 if cfg.layer is None else cfg.layer
    world_dir = cfg.world + "-quick" if (cfg.quick and cfg.world == "data/world") else cfg.world
    manifest = build_world(
        world_dir, WorldConfig.quick(cfg.world_seed) if cfg.quick else WorldConfig(seed=cfg.world_seed), progress
    )
    wp = world_paths(world_dir)
    model = load_model(wp["sft"]).eval()
    sae, sae_eval = _trained_sae(
        cfg, b, wp["sft"], wp["sft_text"], layer, world_dir, model, load_tokenizer(wp["sft"]), progress
    )
    return Source(
        sft=wp["sft"],
        tokenizer=wp["sft"],
        train=wp["train"],
        test=wp["test"],
        sae=sae,
        layer=layer,
        reward_fn=cfg.reward_fn or (None if cfg.reward_model else PRESET_JUDGE["world"]),
        reward_model=cfg.reward_model,
        info={"world": manifest, "sae": sae_eval, "sae_config": sae_eval["config"]},
    )


def user_source(
    cfg: CompareConfig,
    model: str | None = None,
    data: str | None = None,
    test_data: str | None = None,
    reward_fn: str | None = None,
    progress: bool = True,
) -> Source:
    """A real model and its preference data: a GGUF file converted once to an HF folder (every run then loads the
    folder), a held-out split by prompt when no test data is given, the user's SAE or one trained on the middle layer."""
    from .data import split_by_prompt
    from .models import decoder_layers, load_model, load_tokenizer, resolve_model
    from .reference import path_hash

    model, data, test_data = model or cfg.model, data or cfg.data, test_data or cfg.test_data
    reward_fn = reward_fn or cfg.reward_fn
    if not model or not data:
        raise ConfigError("compare on your own model needs both --model and --data")
    if not (reward_fn or cfg.reward_model):
        raise ConfigError("compare on your own model needs a judge: --reward-fn module:function or --reward-model PATH")
    b = cfg.budget()
    root = os.path.join(cfg.out, "source")
    os.makedirs(root, exist_ok=True)
    model = resolve_model(model)  # a GGUF file: its HF folder, converted once per machine
    if not test_data:
        data, test_data = split_by_prompt(
            data, os.path.join(root, f"split-{path_hash(data)[:10]}"), cfg.test_fraction, seed=0
        )
    m = load_model(model).eval()
    layer = cfg.layer if cfg.layer is not None else len(decoder_layers(m)) // 2
    if cfg.sae:
        sae, sae_eval = cfg.sae, {}
    else:
        sae, sae_eval = _trained_sae(cfg, b, model, data, layer, root, m, load_tokenizer(model), progress)
    return Source(
        sft=model,
        tokenizer=model,
        train=data,
        test=test_data,
        sae=sae,
        layer=layer,
        reward_fn=reward_fn,
        reward_model=cfg.reward_model,
        info={
            "model": cfg.model,
            "data": cfg.data,
            "sae": sae_eval,
            "sae_config": sae_eval.get("config", {"path": sae}),
        },
    )


def sentiment_source(cfg: CompareConfig, progress: bool = True) -> Source:
    """The sentiment preset: its task built (or reused) in ``--world`` (default ``data/sentiment``), then a real-model source."""
    from .sentiment import SentimentConfig, build_task

    folder = "data/sentiment" if cfg.world == "data/world" else cfg.world
    m = build_task(folder, SentimentConfig(model=cfg.model or ""), progress)
    src = user_source(
        cfg,
        model=m["model"],
        data=m["train"],
        test_data=m["test"],
        reward_fn=cfg.reward_fn or (None if cfg.reward_model else PRESET_JUDGE["sentiment"]),
        progress=progress,
    )
    src.info["task"] = m
    return src


def make_source(cfg: CompareConfig, progress: bool = True) -> Source:
    if cfg.preset == "sentiment":
        return sentiment_source(cfg, progress)
    if cfg.model or cfg.data:
        return user_source(cfg, progress=progress)
    return world_source(cfg, progress)


def _run(argv: list[str], log_path: str, isolate: bool = True) -> None:
    """``featalign <argv>`` in a process of its own, or in this one; its output goes to ``log_path``."""
    with open(log_path, "w") as log:
        if isolate:
            rc = subprocess.run(
                [sys.executable, "-m", "featalign", *argv], stdout=log, stderr=subprocess.STDOUT
            ).returncode
        else:
            import contextlib

            from .cli import main

            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                rc = main(argv)
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"featalign {' '.join(argv[:4])} ... failed, see {log_path}:\n{tail}")


def _train_cmd(cfg: CompareConfig, src: Source, b: dict, cache_dir: str, m: str, value: float, seed: int) -> list[str]:
    lr = cfg.simpo_lr if (m == "simpo" and cfg.simpo_lr) else b["lr"]
    cmd = [
        "--method",
        m,
        "--model",
        src.sft,
        "--data",
        src.train,
        "--layer",
        str(src.layer),
        "--max-steps",
        str(b["steps"]),
        "--batch-size",
        str(b["batch_size"]),
        "--lr",
        str(lr),
        "--seed",
        str(seed),
        "--max-length",
        str(b["max_length"]),
        "--k",
        str(cfg.k),
        "--trdpo-tau",
        str(b["trdpo_tau"]),
        "--trdpo-alpha",
        str(cfg.trdpo_alpha),
        f"--{KNOB[m]}",
        repr(value),
    ]
    if b["max_prompt_length"] is not None:
        cmd += ["--max-prompt-length", str(b["max_prompt_length"])]
    if m in ("dpo", "ipo", "dpo_ln", "fpo"):
        cmd += ["--cache", cache_dir]
    if m == "fpo":
        cmd += ["--sae", src.sae]
    return cmd


class _Evaluator:
    """Evaluates every run of a sweep with one judge, against the SFT model's own samples per seed (drawn once)."""

    def __init__(self, src: Source, b: dict, cfg: CompareConfig, ref, tok):
        from .judges import make_judge

        self.src, self.b, self.cfg, self.ref, self.tok = src, b, cfg, ref, tok
        self.judge = make_judge(src.reward_fn, src.reward_model)
        self.references: dict[int, dict] = {}

    def config(self, model_path: str, seed: int):
        from .evaluate import EvalConfig

        b = self.b
        return EvalConfig(
            model=model_path,
            data=self.src.test,
            sae=self.src.sae,
            layer=self.src.layer,
            k=self.cfg.k,
            n_prompts=b["n_prompts"],
            max_length=b["max_length"],
            max_prompt_length=b["max_prompt_length"],
            max_new_tokens=b["max_new_tokens"],
            seed=1234 + seed,
            progress=False,
        )

    def __call__(self, seed: int, model, model_path: str) -> dict:
        from . import data as D
        from .evaluate import eval_prompts, evaluate_policy, reference_answers

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


def _cached(path: str, make) -> tuple[dict, bool]:
    """``make()`` once: its result is stored at ``path`` and read back on later calls."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f), True
    res = make()
    _dump(path, res)
    return res, False


def _dump(path: str, obj, indent: int | None = None) -> None:
    write_json(path, obj, indent)


def sweep(cfg: CompareConfig, src: Source, progress: bool = True) -> list[dict]:
    """Train and evaluate every (method, knob value, seed), reusing runs whose settings were already run."""
    from .data import load_pairs, tokenize_pairs
    from .models import load_model, load_tokenizer
    from .reference import CacheSettings, build_cache, expected_manifest
    from .sae import load_sae

    b = cfg.budget()
    tok = load_tokenizer(src.tokenizer)
    ref = load_model(src.sft).eval()
    cache_dir = os.path.join(cfg.out, "ref_cache")
    settings = CacheSettings(
        layer=src.layer, k=cfg.k, max_length=b["max_length"], max_prompt_length=b["max_prompt_length"]
    )
    pairs = tokenize_pairs(load_pairs(src.train), tok, b["max_length"], b["max_prompt_length"])
    build_cache(
        ref,
        tok,
        pairs,
        cache_dir,
        expected_manifest(src.sft, src.train, src.sae, settings),
        load_sae(src.sae, src.layer),
        src.layer,
        cfg.k,
    )
    evaluate = _Evaluator(src, b, cfg, ref, tok)
    eval_key = [
        RUN_VERSION,
        src.test,
        src.sae,
        b["n_prompts"],
        cfg.k,
        b["max_length"],
        b["max_prompt_length"],
        b["max_new_tokens"],
        src.reward_fn,
        src.reward_model,
    ]
    runs_dir = os.path.join(cfg.out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    jobs = [(m, v, s) for s in range(b["seeds"]) for m, vals in b["grid"].items() for v in vals]
    bar = tqdm(total=len(jobs) + b["seeds"], desc="compare", disable=not progress)
    runs = []
    for seed in range(b["seeds"]):
        bar.set_postfix_str(f"sft seed {seed}")
        path = os.path.join(runs_dir, f"sft-s{seed}-{_key([eval_key, src.sft, seed])}.json")
        res, reused = _cached(path, lambda: {**evaluate(seed, ref, src.sft), "wall_seconds": 0.0})
        runs.append({"method": "sft", "knob": None, "value": None, "seed": seed, "reused": reused, **res})
        bar.update()
    for m, value, seed in jobs:
        bar.set_postfix_str(f"{m} {KNOB[m]}={value:g} seed {seed}")
        args = _train_cmd(cfg, src, b, cache_dir, m, value, seed)
        run_dir = os.path.join(runs_dir, f"{m}-{KNOB[m]}{value:g}-s{seed}-{_key([eval_key, args])}")

        def train_and_eval():
            shutil.rmtree(run_dir, ignore_errors=True)  # a run killed half-way starts over
            _run(
                ["train", *args, "--out", run_dir, "--no-progress", "--no-resume", "--log-every", "5"],
                run_dir + ".log",
                cfg.isolate_runs,
            )
            with open(os.path.join(run_dir, "summary.json")) as f:
                summary = json.load(f)
            pol = load_model(os.path.join(run_dir, "final")).eval()
            r = evaluate(seed, pol, run_dir)
            r.update(
                {
                    k: summary[k]
                    for k in ("wall_seconds", "peak_memory_mb", "tokens_per_second", "reference_model_loaded")
                }
            )
            if not cfg.isolate_runs:
                r["peak_memory_mb"] = None  # the whole sweep's process, not the run's
            return r

        res, reused = _cached(os.path.join(run_dir, "eval.json"), train_and_eval)
        runs.append(
            {"method": m, "knob": KNOB[m], "value": value, "seed": seed, "run_dir": run_dir, "reused": reused, **res}
        )
        bar.update()
    bar.close()
    return runs


def run_compare(cfg: CompareConfig, src: Source | None = None) -> dict:
    t0 = time.time()
    b = cfg.budget()
    os.makedirs(cfg.out, exist_ok=True)
    src = src or make_source(cfg)
    runs = sweep(cfg, src)
    levels = [float(x) for x in cfg.kl_levels.split(",")] if cfg.kl_levels else None
    results = {
        "config": asdict(cfg),
        "budget": b,
        "source": asdict(src),
        "runs": runs,
        "points": summarise_points(runs),
    }
    results["frontier"] = frontier(runs, levels)
    results["total_seconds"] = round(time.time() - t0, 1)
    write_report(cfg, results)
    return results


METRICS = [
    "pref_accuracy",
    "reward_accuracy",
    "gt_reward",
    "win_rate_vs_sft",
    "lc_win_rate_vs_sft",
    "entropy",
    "distinct1",
    "distinct2",
    "kl_to_ref",
    "feature_mse",
    "wall_seconds",
    "peak_memory_mb",
    "gt_topic",
    "gt_sentiment",
    "gt_length",
    "gt_pos",
    "gt_neg",
    "mean_length",
    "reward_se",
    "win_rate_se",
    "lc_win_rate_se",
]


def _mean_sd(vals: list[float]) -> dict:
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "sd": sd, "n": len(vals)}


def summarise_points(runs: list[dict]) -> list[dict]:
    """One row per (method, knob value): every metric's mean and spread across seeds."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["method"], r["value"]), []).append(r)
    out = []
    for (m, v), rs in groups.items():
        row = {"method": m, "knob": rs[0]["knob"], "value": v}
        for key in METRICS:
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                row[key] = _mean_sd(vals)
        out.append(row)
    return out


def _prompt_se(rewards: list[float]) -> float:
    return _mean_sd(rewards)["sd"] / math.sqrt(len(rewards))


def _interp(points: list[tuple[float, float, float]], x: float) -> tuple[float, float] | None:
    """Linear interpolation of (reward, its prompt SE) at KL ``x`` over (kl, reward, se) points; None outside them."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0, s0), (x1, y1, s1) in zip(pts, pts[1:] + pts[-1:]):
        if x0 <= x <= x1:
            w = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return y0 + w * (y1 - y0), s0 + w * (s1 - s0)
    return None


def default_levels(per: dict, n_levels: int = 6) -> list[float]:
    """KL levels evenly over the span where at least two methods have a seed (the only KLs where methods can be
    compared; a method alone elsewhere is still drawn in frontier.png); with one method, or no overlap, over the
    span of every KL reached. ``per``: method -> seed -> [(kl, ...)]."""
    spans = {
        m: (min(p[0] for pts in seeds.values() for p in pts), max(p[0] for pts in seeds.values() for p in pts))
        for m, seeds in per.items()
        if seeds
    }
    edges = sorted({x for span in spans.values() for x in span})
    shared = [(a, b) for a, b in zip(edges, edges[1:]) if sum(lo <= a and b <= hi for lo, hi in spans.values()) >= 2]
    if shared:
        lo, hi = shared[0][0], shared[-1][1]
    else:
        lo, hi = (edges[0], edges[-1]) if edges else (0.0, 0.0)
    return [float(f"{lo + (hi - lo) * (i + 0.5) / n_levels:.3g}") for i in range(n_levels)] if hi > lo else []


def frontier(runs: list[dict], levels: list[float] | None = None, n_levels: int = 6) -> dict:
    """Ground-truth reward of each method at common KL levels, interpolated along each seed's own frontier
    (its knob values), then averaged over the seeds that reach the level. The noise of a method at a level is
    SE = sqrt((sd over seeds^2 + prompt SE^2) / n): the seeds' spread, plus the sampling noise of the prompts
    so that one seed is not taken as noise-free. The best method at a level is named only when it beats every
    other by more than 2 combined SEs; otherwise the level is 'inside the noise'."""
    per: dict = {}
    for r in runs:
        if r["method"] != "sft" and r.get("kl_to_ref") is not None:
            per.setdefault(r["method"], {}).setdefault(r["seed"], []).append(
                (r["kl_to_ref"], r["gt_reward"], _prompt_se(r["rewards_per_prompt"]))
            )
    if levels is None:
        levels = default_levels(per, n_levels)
    rows = []
    for x in levels:
        cells = {}
        for m, seeds in per.items():
            got = [v for v in (_interp(pts, x) for pts in seeds.values()) if v is not None]
            if got:
                ms = _mean_sd([g[0] for g in got])
                pse2 = sum(g[1] ** 2 for g in got) / len(got)
                cells[m] = {**ms, "se": math.sqrt((ms["sd"] ** 2 + pse2) / ms["n"])}
        row = {"kl": x, "methods": cells, "best": None, "inside_noise": []}
        if len(cells) >= 2:
            best = max(cells, key=lambda m: cells[m]["mean"])
            close = [
                m
                for m in cells
                if m != best
                and cells[best]["mean"] - cells[m]["mean"]
                <= 2 * math.sqrt(cells[best]["se"] ** 2 + cells[m]["se"] ** 2)
            ]
            row["best"] = None if close else best
            row["inside_noise"] = [best] + close if close else []
            row["leader"] = best
        if "dpo" in cells:
            d = cells["dpo"]
            row["minus_dpo"] = {
                m: {
                    "diff": c["mean"] - d["mean"],
                    "se": math.sqrt(c["se"] ** 2 + d["se"] ** 2),
                    "within_noise": abs(c["mean"] - d["mean"]) <= 2 * math.sqrt(c["se"] ** 2 + d["se"] ** 2),
                }
                for m, c in cells.items()
                if m != "dpo"
            }
        rows.append(row)
    return {"levels": rows, "methods": sorted(per)}


SE_OF = {"gt_reward": "reward_se", "win_rate_vs_sft": "win_rate_se", "lc_win_rate_vs_sft": "lc_win_rate_se"}


def _fmt(d: dict | None, digits: int = 3, se: dict | None = None) -> str:
    """mean ± sd over seeds; with one seed, mean ± its standard error over prompts where one is known."""
    if not d:
        return "-"
    s = f"{d['mean']:.{digits}f}"
    if d.get("n", 1) > 1:
        return s + f" ± {d['sd']:.{digits}f}"
    return s + (f" ± {se['mean']:.{digits}f} SE" if se and se["mean"] > 0 else "")


def verdict(row: dict) -> str:
    if row.get("best"):
        return f"**{row['best']}**"
    if row.get("inside_noise"):
        return "inside the noise (" + ", ".join(row["inside_noise"]) + ")"
    return "-"


def report_lines(cfg: CompareConfig, results: dict) -> list[str]:
    b, fr = results["budget"], results["frontier"]
    methods = fr["methods"]
    n_seeds = b["seeds"]
    levels = fr["levels"] if any(row["methods"] for row in fr["levels"]) else []
    lines = [
        f"# featalign compare ({b['tier']} tier, {n_seeds} seed(s) per knob value)",
        "",
        "## Ground-truth reward at matched KL",
        "",
    ]
    if not levels:
        lines += [
            "No frontier: a method's reward at a common KL is interpolated between two or more of its knob values, and "
            "this sweep ran one per method (`--full`, or `--grid 'dpo=0.05,0.1,0.3;...'`, sweeps more). Read the points "
            "below, each with its own KL."
        ]
    else:
        lines += [
            "Reward of each method's frontier interpolated at common KL levels (per seed, between that seed's knob "
            "values; never extrapolated), mean ± sd over the seeds that reach the level. 'best' needs a lead over "
            "every other method of more than 2 SE, SE = sqrt((sd² + prompt-sampling SE²) / n seeds); otherwise the "
            "methods within 2 SE of the leader are 'inside the noise'.",
            "",
            "| KL to SFT | " + " | ".join(methods) + " | best |",
            "|---" * (len(methods) + 2) + "|",
        ]
    for row in levels:
        cells = [
            (
                _fmt(row["methods"].get(m))
                + (f" (n={row['methods'][m]['n']})" if m in row["methods"] and row["methods"][m]["n"] < n_seeds else "")
            )
            for m in methods
        ]
        lines.append(f"| {row['kl']:.3g} | " + " | ".join(cells) + f" | {verdict(row)} |")
    diffs = [(row["kl"], m, d) for row in fr["levels"] for m, d in row.get("minus_dpo", {}).items()]
    if diffs:
        lines += ["", "Each method minus DPO at the same KL (± combined SE):", ""]
        lines += [
            f"- KL {kl:.3g}: {m} - dpo = {d['diff']:+.3f} ± {d['se']:.3f} ({'inside' if d['within_noise'] else 'outside'} the noise)"
            for kl, m, d in diffs
        ]
    parts = (
        [("sentiment", "gt_sentiment", 3), ("topic", "gt_topic", 3)] if cfg.preset == "world" and not cfg.model else []
    )
    cols = [
        ("pref acc", "pref_accuracy", 3),
        ("reward acc", "reward_accuracy", 3),
        ("GT reward", "gt_reward", 3),
        *parts,
        ("win vs SFT", "win_rate_vs_sft", 3),
        ("LC win", "lc_win_rate_vs_sft", 3),
        ("entropy", "entropy", 3),
        ("distinct-2", "distinct2", 3),
        ("KL to SFT", "kl_to_ref", 2),
        ("feature MSE", "feature_mse", 3),
        ("wall s", "wall_seconds", 1),
    ]
    lines += [
        "",
        "## Every knob value (mean ± sd over seeds)",
        "",
        "| method | knob | " + " | ".join(c[0] for c in cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for row in results["points"]:
        knob = "-" if row["knob"] is None else f"{row['knob']}={row['value']:g}"
        lines.append(
            f"| {row['method']} | {knob} | "
            + " | ".join(_fmt(row.get(k), d, row.get(SE_OF.get(k, ""))) for _, k, d in cols)
            + " |"
        )
    info = results["source"]["info"]
    sae = info.get("sae", {})
    reused = sum(r["reused"] for r in results["runs"])
    src = results["source"]
    lines += [
        "",
        f"Judge (the ground truth here): {src['reward_fn'] or src['reward_model']}. Starting model: {src['sft']}.",
        "",
        f"Budget: {b['steps']} steps x batch {b['batch_size']} pairs per run, lr {b['lr']}; grid "
        + "; ".join(f"{m} {KNOB[m]} {', '.join(f'{v:g}' for v in vals)}" for m, vals in b["grid"].items())
        + f"; TR-DPO tau {b['trdpo_tau']}, alpha {cfg.trdpo_alpha}; FPO k={cfg.k} at layer {src['layer']}. Generations: "
        f"{b['n_prompts']} held-out prompts per run, temperature 1.0, no top-k, max {b['max_new_tokens']} new tokens, sampling seed 1234 + "
        "training seed. KL: sequence KL(policy || SFT) on the policy's own samples. Feature MSE: FPO's D on held-out "
        "chosen responses.",
        "",
    ]
    if sae:
        sc = info.get("sae_config", {})
        cos = sae.get("decoder_cosine_to_init")
        arch = {"topk": "TopK", "batchtopk": "BatchTopK", "featurechoice": "Feature Choice"}.get(
            sc.get("architecture", "topk"), sc.get("architecture")
        )
        arch += f" with Zipf {sc['fc_zipf']:g} token shares" if sc.get("fc_zipf") else ""
        lines += [
            f"SAE ({arch}, layer {src['layer']}, {sc.get('d_sae')} latents, k={sc.get('k')}, {sc.get('tokens', 0):,} tokens): explained "
            f"variance {sae['explained_variance']:.3f}, L0 {sae['l0']:.1f}, dead {sae['dead_fraction']:.1%}, dense "
            f"(>10% of tokens) {sae.get('dense_fraction', float('nan')):.1%}, CE loss recovered {sae['ce_loss_recovered']:.3f}"
            + (f", median decoder cosine to init {cos:.2f}." if cos is not None else "."),
            "",
        ]
    lines += [
        f"Runs: {len(results['runs'])} ({reused} reused from an earlier sweep). Total time {results['total_seconds']:.0f} s.",
        "",
        "![reward vs KL frontier](frontier.png)",
        "",
        "![training curves](curves.png)",
    ]
    return lines


def write_report(cfg: CompareConfig, results: dict) -> None:
    _dump(os.path.join(cfg.out, "results.json"), results, indent=1)
    lines = report_lines(cfg, results)
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(cfg, results)


def summary_lines(cfg: CompareConfig, results: dict) -> list[str]:
    """The report's verdict section and where the whole report is, for the command line."""
    lines = report_lines(cfg, results)
    return lines[: lines.index("## Every knob value (mean ± sd over seeds)")] + [
        f"report: {os.path.join(cfg.out, 'report.md')}"
    ]


def plot(cfg: CompareConfig, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, m in enumerate(["sft"] + results["frontier"]["methods"]):
        color = f"C{i}"
        pts = sorted((p for p in results["points"] if p["method"] == m), key=lambda p: p["kl_to_ref"]["mean"])
        xs = [p["kl_to_ref"]["mean"] for p in pts]
        ys = [p["gt_reward"]["mean"] for p in pts]
        ax.errorbar(
            xs,
            ys,
            xerr=[p["kl_to_ref"]["sd"] for p in pts],
            yerr=[p["gt_reward"]["sd"] for p in pts],
            fmt="o-" if m != "sft" else "s",
            color=color,
            capsize=3,
            label=m,
        )
        for p in pts:
            if p["knob"]:
                ax.annotate(
                    f"{p['knob'][0]}={p['value']:g}",
                    (p["kl_to_ref"]["mean"], p["gt_reward"]["mean"]),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=7,
                    color=color,
                )
        seeds = [r for r in results["runs"] if r["method"] == m]
        ax.scatter([r["kl_to_ref"] for r in seeds], [r["gt_reward"] for r in seeds], color=color, alpha=0.25, s=12)
    ax.set_xlabel("sequence KL to SFT (nats)")
    ax.set_ylabel("mean ground-truth reward")
    ax.set_title(f"reward vs KL frontier (mean ± sd over {results['budget']['seeds']} seed(s); faint: single runs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "frontier.png"), dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in results["runs"]:
        # one run per method: seed 0 at the middle of its grid
        vals = results["budget"]["grid"].get(r["method"])
        if r["seed"] != 0 or not vals or r["value"] != vals[len(vals) // 2]:
            continue
        path = os.path.join(r["run_dir"], "metrics.jsonl")
        if not os.path.exists(path):
            continue
        recs = [json.loads(line) for line in open(path)]
        for ax, key in zip(axes, ("loss", "rewards/accuracies", "rewards/margins")):
            ax.plot(
                [x["step"] for x in recs], [x[key] for x in recs], label=f"{r['method']} {r['knob']}={r['value']:g}"
            )
            ax.set_title(key)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "curves.png"), dpi=100)
    plt.close(fig)
