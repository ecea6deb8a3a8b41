"""What a comparison runs: the command's settings (``CompareConfig``), the tiers, and the resolved ``Budget``.

Each method is swept over its KL knob: beta scales the DPO family's implicit reward, alpha weighs TDPO-2's token KL
and FPO's feature term (larger: closer to the reference). A tier says how many knob values, seeds and steps; the
config's own settings override it; ``budget()`` resolves the two into one typed ``Budget``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from ..config import Config, check_model_path, setting
from ..errors import ConfigError
from ..losses import METHODS

ALL_METHODS = tuple(METHODS)
KNOB = {m: ("alpha" if m in ("tdpo2", "fpo") else "beta") for m in METHODS}
# five values per method, loosest first; they span the published defaults (beta 0.1, SimPO 2, alpha 0.5) by about
# 10x either way
GRID = {
    "dpo": [0.03, 0.1, 0.3, 1.0, 3.0],
    "ipo": [0.03, 0.1, 0.3, 1.0, 3.0],
    "simpo": [0.5, 1.0, 2.0, 5.0, 10.0],
    "dpo_ln": [0.03, 0.1, 0.3, 1.0, 3.0],
    "tdpo1": [0.03, 0.1, 0.3, 1.0, 3.0],
    "trdpo": [0.03, 0.1, 0.3, 1.0, 3.0],
    "tdpo2": [0.02, 0.05, 0.2, 0.5, 2.0],
    "fpo": [0.5, 2.0, 10.0, 50.0, 200.0],
}
# FPO's grid on a real model sits above its published 0.5: on SmolLM2 (sentiment, 12 steps) alpha 0.2 and 2 left the
# KL at 4.7 and 4.3 nats, and only alpha 20 brought it to 2.8, where DPO's knob values lie
# on the built-in world FPO's grid sits lower: the world SAE's feature term binds harder, and at alpha 0.2-2 FPO's KL
# stays below most of the range DPO's grid covers, so the two frontiers would barely overlap
WORLD_GRID = {**GRID, "fpo": [0.003, 0.01, 0.03, 0.1, 0.3]}
# on Gemma 3 270M FPO's grid sits four orders lower: its residual stream runs at norms near 6,000, and after DPO at
# KL 3 the feature term D was about 700 where SmolLM2's is below 0.1, so alpha 2 would leave nothing but D to minimise
ARITHMETIC_GRID = {**GRID, "fpo": [3e-5, 3e-4, 3e-3, 3e-2, 3e-1]}
# the papers' own settings: a one-value sweep runs each method where it was published
PUBLISHED = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "dpo_ln": 0.1, "tdpo1": 0.1, "trdpo": 0.1, "tdpo2": 0.5, "fpo": 0.5}
PRESET_JUDGE = {
    "world": "featalign.world.judge:reward",
    "sentiment": "featalign.sentiment:reward",
    "arithmetic": "featalign.arithmetic:reward",
}


@dataclass(frozen=True)
class Budget:
    """Every setting one comparison runs with, resolved from its tier and the config's overrides."""

    tier: str
    grid: dict[str, list[float]]  # method -> knob values
    seeds: int
    steps: int
    batch_size: int
    lr: float
    simpo_lr: float
    trdpo_tau: int
    n_prompts: int  # held-out prompts sampled per evaluation
    max_length: int
    max_prompt_length: int | None
    max_new_tokens: int
    sae_arch: str
    sae_d: int | None  # None: 8x the model's hidden size
    sae_k: int | None  # None: 5% of the model's hidden size
    sae_fc_zipf: float
    sae_lr: float
    sae_dead_tokens: int
    sae_tokens: int

    @property
    def methods(self) -> list[str]:
        return list(self.grid)


@dataclass(frozen=True)
class Tier:
    """A tier's defaults: the methods, how many knob values of each grid (1: the published value), and the rest."""

    methods: tuple[str, ...]
    grid_values: int
    seeds: int
    steps: int
    n_prompts: int
    sae_tokens: int
    lr: float
    batch_size: int
    max_length: int
    max_prompt_length: int | None
    max_new_tokens: int
    sae_arch: str
    sae_d: int | None
    sae_k: int | None
    sae_fc_zipf: float
    sae_lr: float
    sae_dead_tokens: int
    simpo_lr_ratio: float = 1.0  # SimPO's learning rate over the others' (it has no reference to hold it back)


# The world's SAE is Feature Choice with Zipf-shaped token shares: on the world's narrow layer-2 stream (about 200
# features, some on 5-9% of the tokens) no TopK SAE of 128-512 latents kept both dead and dense latents under 5%
# four seeds: with two, the verdict's significance changed between two machines' worlds (the world is trained, so
# its floats differ per CPU)
_WORLD = Tier(
    ("dpo", "fpo"),
    3,
    4,
    200,
    200,
    2_000_000,
    lr=1e-4,
    batch_size=16,
    max_length=128,
    max_prompt_length=32,
    max_new_tokens=48,
    sae_arch="featurechoice",
    sae_d=256,
    sae_k=6,
    sae_fc_zipf=1.0,
    sae_lr=1e-2,
    sae_dead_tokens=100_000,
)
WORLD_TIERS = {
    "quick": replace(_WORLD, grid_values=2, seeds=1, steps=40, n_prompts=64, sae_tokens=150_000),
    "default": _WORLD,
    "full": replace(
        _WORLD, methods=ALL_METHODS, grid_values=5, seeds=4, steps=300, n_prompts=300, sae_tokens=4_000_000
    ),
}
# a real LM (--model, a task preset): full fine-tuning at a small lr and an SAE 8x the hidden size; the default tier
# runs the sentiment preset's four methods on SmolLM2-135M on 2 CPU cores in about 20 minutes
_REAL = Tier(
    ("dpo", "simpo", "tdpo2", "fpo"),
    1,
    1,
    12,
    64,
    40_000,
    lr=1e-4,
    batch_size=8,
    max_length=192,
    max_prompt_length=None,
    max_new_tokens=40,
    sae_arch="topk",
    sae_d=None,
    sae_k=None,
    sae_fc_zipf=0.0,
    sae_lr=3e-3,
    sae_dead_tokens=10_000_000,
)
REAL_TIERS = {
    "quick": replace(_REAL, methods=("dpo", "fpo"), steps=4, n_prompts=16, sae_tokens=20_000, lr=5e-5),
    "default": _REAL,
    # three knob values and three seeds of the four methods in under an hour on 2 CPU cores: few, small steps, so that
    # KL to the SFT model stays within about 1-5 nats, and SimPO (no reference to hold it) at half the learning rate,
    # where its KLs meet the others'
    "full": replace(
        _REAL, grid_values=3, seeds=3, steps=12, n_prompts=56, sae_tokens=100_000, lr=4e-5, simpo_lr_ratio=0.5
    ),
}


# the arithmetic preset (Gemma 3 270M, base): DPO against FPO, whose paper trains Gemma; lr 5e-6, since at 4e-5 (what
# SmolLM2 takes) 12 steps sent every run to a KL near 20 nats and a reward of 0; answers are a few tokens, so
# evaluation samples 8 new tokens on 128 held-out prompts; the four-shot prompts are 47 tokens
_ARITHMETIC = replace(
    _REAL,
    methods=("dpo", "fpo"),
    steps=12,
    lr=5e-6,
    n_prompts=128,
    max_length=80,
    max_prompt_length=64,
    max_new_tokens=8,
    sae_tokens=60_000,
)
ARITHMETIC_TIERS = {
    "quick": replace(_ARITHMETIC, steps=4, n_prompts=32, sae_tokens=20_000),
    "default": _ARITHMETIC,
    "full": replace(_ARITHMETIC, grid_values=3, seeds=3),
}


def _middle(values: list[float], n: int) -> list[float]:
    """A tier's slice of a 5-value grid: all, the middle three, or the two ends of the middle three."""
    if n >= len(values):
        return values
    return values[1:4] if n == 3 else [values[1], values[3]]


@dataclass
class CompareConfig(Config):
    """`featalign compare`: every method trained from one SFT model on one budget, judged at matched KL."""

    out: str = setting("reports/compare", "report folder (report.md, results.json, frontier.png, curves.png, runs/)")
    preset: Literal["world", "sentiment", "arithmetic"] = setting(
        "world",
        "world: the built-in world; sentiment: SmolLM2 (or --model) made more positive, judged by VADER; "
        "arithmetic: Gemma 3 270M adding up, judged exactly",
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
        "built-in world folder (built when missing); with a task preset, the task's (data/<preset>)",
    )
    world_seed: int = setting(0, "seed of the built-in world: its corpus, SFT model and SAE")
    quick: bool = setting(False, "quick tier: small world, DPO and FPO, two knob values, one seed (a few minutes)")
    full: bool = setting(
        False,
        "full tier: every method, five knob values, four seeds on the world (hours on 2 cores); three knob values "
        "and three seeds on a real model",
    )
    seeds: int | None = setting(None, "training seeds per knob value (default: the tier's)", ge=1)
    methods: list[Literal[ALL_METHODS]] | None = setting(None, "comma-separated methods (default: the tier's)")
    grid: str = setting(
        "", "knob values per method, e.g. 'dpo=0.1,0.3;fpo=0.5,2' (default: the tier's slice of each grid)"
    )
    kl_levels: list[float] = setting(
        factory=list,
        help="comma-separated KL levels in nats to compare rewards at (default: 6 where two methods overlap)",
    )
    layer: int | None = setting(
        None, "decoder layer of the SAE and of FPO's constraint (default: 2 in the world, else the middle)"
    )
    steps: int | None = setting(None, "training steps per run (default: the tier's)", ge=1)
    batch_size: int | None = setting(None, "pairs per step (default: world 16, real model 8)", ge=1)
    lr: float | None = setting(None, "learning rate of every method (default: the tier's)", gt=0)
    simpo_lr: float | None = setting(None, "SimPO's own learning rate (default: the tier's, else lr)", gt=0)
    trdpo_tau: int | None = setting(None, "TR-DPO reference update period (default: a quarter of the steps)", ge=1)
    trdpo_alpha: float = setting(0.6, "TR-DPO reference update weight", gt=0, le=1)
    k: int = setting(50, "FPO's k", ge=1)
    fpo_variant: Literal["paper", "released"] = setting(
        "paper", "FPO as the paper writes it, or as its released code computes D"
    )
    ablate_features: str = setting("", "feature controls for every run: features projected out in training")
    preserve_features: str = setting("", "features held near the reference's activations in every run")
    preserve_weight: float = setting(1.0, "weight of the preserved features' MSE", ge=0)
    suppress_features: str = setting("", "features whose pooled activation every run penalises")
    suppress_weight: float = setting(1.0, "weight of the suppressed features' penalty", ge=0)
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
        if self.quick and self.full:
            raise ConfigError("quick and full are two tiers: give one of them")
        self.budget()

    @property
    def tier(self) -> str:
        return "quick" if self.quick else "full" if self.full else "default"

    @property
    def real(self) -> bool:
        """A real language model (a task preset, or --model), rather than the built-in world."""
        return self.preset != "world" or bool(self.model)

    def budget(self) -> Budget:
        tiers = ARITHMETIC_TIERS if self.preset == "arithmetic" else REAL_TIERS if self.real else WORLD_TIERS
        t = tiers[self.tier]
        methods = list(self.methods or t.methods)
        grids = ARITHMETIC_GRID if self.preset == "arithmetic" else GRID if self.real else WORLD_GRID
        grid = {m: [PUBLISHED[m]] if t.grid_values == 1 else _middle(grids[m], t.grid_values) for m in methods}
        for item in filter(None, (s.strip() for s in self.grid.split(";"))):
            m, _, vals = item.partition("=")
            if m.strip() not in grid or not vals:
                raise ConfigError(f"grid: {item!r} is not 'method=v1,v2' for one of the methods {','.join(methods)}")
            grid[m.strip()] = [float(v) for v in vals.split(",")]
        steps = self.steps or t.steps

        def pick(name):
            mine = getattr(self, name)
            return getattr(t, name) if mine is None else mine

        return Budget(
            tier=self.tier,
            grid=grid,
            seeds=pick("seeds"),
            steps=steps,
            batch_size=pick("batch_size"),
            lr=pick("lr"),
            simpo_lr=self.simpo_lr or pick("lr") * t.simpo_lr_ratio,
            trdpo_tau=self.trdpo_tau or max(1, steps // 4),
            n_prompts=pick("n_prompts"),
            max_length=pick("max_length"),
            max_prompt_length=pick("max_prompt_length"),
            max_new_tokens=pick("max_new_tokens"),
            sae_arch=pick("sae_arch"),
            sae_d=pick("sae_d"),
            sae_k=pick("sae_k"),
            sae_fc_zipf=pick("sae_fc_zipf"),
            sae_lr=pick("sae_lr"),
            sae_dead_tokens=pick("sae_dead_tokens"),
            sae_tokens=pick("sae_tokens"),
        )
