"""`featalign` command line. Each command maps onto one config dataclass; ``--config FILE.yaml`` fills it
first and explicit flags override. featalign's own errors print as one line (exit 2), never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing

from .errors import ConfigError, FeatalignError


def _choices(f: dataclasses.Field, typ) -> list | None:
    if typing.get_origin(typ) is typing.Literal:
        return list(typing.get_args(typ))
    return f.metadata.get("choices")


def _add_dataclass_args(p: argparse.ArgumentParser, cls, skip=()) -> None:
    """One flag per field of ``cls``, its help and choices read off the field (``metadata={"help": ...}``, a
    ``Literal`` type or ``metadata={"choices": ...}``), the shared data options in a group of their own."""
    from .data import DataOptions

    hints = typing.get_type_hints(cls)
    data_fields = {f.name for f in dataclasses.fields(DataOptions)} if issubclass(cls, DataOptions) else set()
    groups = {True: p.add_argument_group("data (how preference records are read and tokenised)"), False: p}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name == "extra":
            continue
        typ = hints[f.name]
        args = [a for a in typing.get_args(typ) if a is not type(None)] if typing.get_origin(typ) is not typing.Literal else []
        base = args[0] if len(args) == 1 else typ
        choices = _choices(f, base)
        kind = type(choices[0]) if choices else base
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help strings
        if default not in (None, "") and kind is not bool:
            help_ += f" (default: {default})"
        g = groups[f.name in data_fields]
        if f.metadata.get("positional"):
            g.add_argument(f.name, type=kind, choices=choices, help=help_)
        elif kind is bool:
            g.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_ + f" (default: {'on' if default else 'off'})")
        else:
            g.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, choices=choices, default=argparse.SUPPRESS,
                           help=help_, metavar=None if choices else f.name.upper())


def _config(cls, ns: argparse.Namespace, skip=()):
    values: dict = {}
    if getattr(ns, "config", None):
        import yaml

        with open(ns.config) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{ns.config}: a config file must be a mapping of settings")
        values.update(loaded)
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(ns).items() if k in names and k not in skip})
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown} for {cls.__name__}")
    return cls(**values)


def cmd_world_build(ns):
    from .world import WorldConfig, build_world

    cfg = WorldConfig.quick(ns.seed) if ns.quick else WorldConfig(seed=ns.seed)
    m = build_world(ns.out, cfg, force=ns.force)
    print(json.dumps({k: m[k] for k in ("vocab_size", "n_params", "sft_ppl", "unigram_ppl", "build_seconds")}, indent=2))


def cmd_train(ns):
    from .train import TrainConfig, train

    summary = train(_config(TrainConfig, ns))
    print(json.dumps(summary, indent=2))


def cmd_cache(ns):
    from .reference import CacheConfig, run_cache

    run_cache(_config(CacheConfig, ns))


def cmd_sae_train(ns):
    from .sae.metrics import format_table
    from .sae.train import SAETrainConfig, train_sae

    _, report = train_sae(_config(SAETrainConfig, ns))
    print(format_table(report))


def cmd_sae_eval(ns):
    from .sae.evaluate import run_eval

    run_eval(ns)


def cmd_sae_match(ns):
    from .sae.match import run_match

    run_match(ns)


def cmd_explain(ns):
    from .explain import ExplainConfig, explain, explain_table

    cfg = _config(ExplainConfig, ns)
    print(explain_table(explain(cfg)))
    print(f"written to {cfg.out}/explain.{{json,md,png}}")


def cmd_attribute(ns):
    from .explain import AttributeConfig, attribute, attribute_table

    cfg = _config(AttributeConfig, ns)
    print(attribute_table(attribute(cfg)))
    print(f"written to {cfg.out}/attribution.{{json,pt,png}}")


def cmd_eval(ns):
    from .evaluate import EvalConfig, evaluate_policy

    print(json.dumps(evaluate_policy(_config(EvalConfig, ns)), indent=2))


def cmd_generate(ns):
    from .generate import GenerateConfig, run_generate

    out = run_generate(_config(GenerateConfig, ns))
    print(f"written to {out}/model_outputs.json (AlpacaEval), generations.jsonl, settings.json")


def cmd_compare(ns):
    from .compare import CompareConfig, compare

    compare(_config(CompareConfig, ns))


def _config_command(sub, name: str, cls, fn, help: str) -> argparse.ArgumentParser:
    """A command whose flags are the fields of ``cls``, also settable from ``--config FILE.yaml``."""
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--config", help=f"YAML file of {cls.__name__} settings (flags override it)")
    _add_dataclass_args(p, cls)
    p.set_defaults(fn=fn)
    return p


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import EvalConfig
    from .train import TrainConfig

    p = argparse.ArgumentParser(prog="featalign", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log what each step does (data drops are warned either way)")
    sub = p.add_subparsers(dest="command", required=True)

    world = sub.add_parser("world", help="the built-in synthetic world").add_subparsers(dest="world_cmd", required=True)
    wb = world.add_parser("build", help="build tokenizer, SFT model and preference pairs")
    wb.add_argument("--out", default="data/world", help="world folder (default: data/world)")
    wb.add_argument("--seed", type=int, default=0, help="seed of the corpus, the pairs and the SFT run (default: 0)")
    wb.add_argument("--quick", action="store_true", help="smaller world (tests)")
    wb.add_argument("--force", action="store_true", help="rebuild even if cached")
    wb.set_defaults(fn=cmd_world_build)

    _config_command(sub, "train", TrainConfig, cmd_train, "preference training (dpo, ipo, simpo, dpo_ln, tdpo1, tdpo2, trdpo, fpo)")

    from .reference import CacheConfig

    _config_command(sub, "cache", CacheConfig, cmd_cache, "build the offline reference cache (reference log-probs + top-k SAE activations)")

    sae = sub.add_parser("sae", help="sparse autoencoders").add_subparsers(dest="sae_cmd", required=True)
    from .sae.metrics import OUTLIER_NORM
    from .sae.train import SAETrainConfig

    _config_command(sae, "train", SAETrainConfig, cmd_sae_train, "train an SAE on a model's layer")
    se = sae.add_parser("eval", help="evaluate an SAE (JSON + table; --frontier sweeps k and plots MSE vs L0)")
    se.add_argument("--sae", required=True, help="SAE: SAELens/featalign folder or Gemma Scope params.npz")
    se.add_argument("--model", required=True, help="the model whose layer the SAE reads (HF folder, hub id or .gguf)")
    se.add_argument("--data", required=True, help="documents: text, conversations, prompt/response or preference records")
    se.add_argument("--layer", type=int, help="decoder layer (default: the layer the SAE records)")
    se.add_argument("--out", default=None, help="output folder (default: <sae>/eval)")
    se.add_argument("--max-tokens", type=int, default=40_000, help="held-out tokens to evaluate on (default: 40000)")
    se.add_argument("--outlier-norm", type=float, default=OUTLIER_NORM, help=f"leave out tokens whose residual norm exceeds this multiple of the batch's median (massive activations, as in training); 0 keeps all (default: {OUTLIER_NORM:g})")
    se.add_argument("--frontier", action="store_true", help="also sweep the sparsity knob and plot MSE vs L0")
    se.add_argument("--frontier-values", default="4,8,16,32,64", help="k values (TopK) or threshold multipliers (JumpReLU) to sweep")
    se.set_defaults(fn=cmd_sae_eval)

    sm = sae.add_parser("match", help="match the latents of two SAEs one-to-one (SAE Match: folded parameters + optimal assignment)")
    sm.add_argument("sae_a", help="first SAE (its latents are matched to the second's)")
    sm.add_argument("sae_b", help="second SAE")
    sm.add_argument("--out", default=None, help="folder for match.json / match.png (default: <sae_a>-vs-<sae_b>)")
    sm.add_argument("--encoder", action="store_true", help="include encoder columns in the cost (decoder rows only by default)")
    sm.add_argument("--min-cosine", type=float, default=0.7, help="a match is confident at or above this cosine")
    sm.add_argument("--dense-limit", type=int, default=4096, help="above this many latents, solve a sparsified cost")
    sm.add_argument("--candidates", type=int, default=32, help="cheapest partners kept per latent when sparsified")
    sm.add_argument("--device", default=None, help="device for the cost computation (default: the GPU when there is one)")
    sm.add_argument("--model", help="with --data: evaluate the matched decode on the model's hidden states")
    sm.add_argument("--data", help="documents for the transfer check (with --model)")
    sm.add_argument("--layer-a", type=int, help="layer of the first SAE (default: the layer it records)")
    sm.add_argument("--layer-b", type=int, help="layer of the second SAE (default: the layer it records)")
    sm.add_argument("--max-tokens", type=int, default=20_000, help="tokens for the transfer check (default: 20000)")
    sm.set_defaults(fn=cmd_sae_match)

    from .explain import AttributeConfig, ExplainConfig

    _config_command(sub, "explain", ExplainConfig, cmd_explain,
                    "the SAE features whose activation alignment changed most, with their tokens")
    _config_command(sub, "attribute", AttributeConfig, cmd_attribute,
                    "attribute a margin or reward to SAE features (attribution patching + ablation check)")

    _config_command(sub, "eval", EvalConfig, cmd_eval, "evaluate a saved policy")

    from .generate import GenerateConfig

    _config_command(sub, "generate", GenerateConfig, cmd_generate,
                    "sample answers to a prompt file for external judges (AlpacaEval model_outputs.json + JSONL)")

    from .compare import CompareConfig

    _config_command(sub, "compare", CompareConfig, cmd_compare, "train every method on one budget and report (the main job)")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="featalign: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        ns.fn(ns)
    except FeatalignError as e:
        print(f"featalign: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"featalign: error: {e.filename}: no such file", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
