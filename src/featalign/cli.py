"""`featalign` command line. Each command is one config dataclass (``COMMANDS``): its flags are the dataclass's
fields, ``--config FILE.yaml`` fills it first and flags override. featalign's own errors print as one line (exit 2),
never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .config import ConfigError, base_type, choices, decode, hints
from .errors import FeatalignError


def _json(result, cfg) -> str:
    return json.dumps(result, indent=2, default=str)


def _world(manifest, cfg) -> str:
    return _json({k: manifest[k] for k in ("vocab_size", "n_params", "sft_ppl", "unigram_ppl", "build_seconds")}, cfg)


def _sae_table(result, cfg) -> str:
    from .sae.metrics import format_table

    _, report = result
    return format_table(report) + f"\nwritten to {cfg.out}"


def _sae_eval(result, cfg) -> str:
    from .sae.evaluate import eval_lines

    return "\n".join(eval_lines(result))


def _sae_match(result, cfg) -> str:
    from .sae.match import match_lines

    return "\n".join(match_lines(result))


def _explain(result, cfg) -> str:
    from .explain import explain_table

    return explain_table(result) + f"\nwritten to {cfg.out}/explain.{{json,md,png}}"


def _attribute(result, cfg) -> str:
    from .attribute import attribute_table

    return attribute_table(result) + f"\nwritten to {cfg.out}/attribution.{{json,pt,png}}"


def _selected(result, cfg) -> str:
    from .select_features import select_table

    return select_table(result) + f"\nwritten to {cfg.out}/features.{{json,md}}"


def _generated(out, cfg) -> str:
    return f"written to {out}/model_outputs.json (AlpacaEval), generations.jsonl, settings.json"


def _compared(results, cfg) -> str:
    from .compare import summary_lines

    return "\n".join(summary_lines(cfg, results))


@dataclass(frozen=True)
class Command:
    """A command: its words (``sae train``), its config class and the library function that runs it (both as
    ``module:name``, imported when used), and how its result is shown."""

    words: tuple[str, ...]
    config: str
    run: str
    show: Callable
    help: str

    def load(self, what: str):
        module, name = getattr(self, what).split(":")
        return getattr(importlib.import_module(module), name)


COMMANDS = [
    Command(
        ("world", "build"),
        "featalign.world.build:WorldBuildConfig",
        "featalign.world.build:run_world_build",
        _world,
        "build the built-in world: tokenizer, a small SFT model and ranked preference pairs",
    ),
    Command(
        ("train",),
        "featalign.train:TrainConfig",
        "featalign.train:run_train",
        _json,
        "preference training: dpo, ipo, simpo, dpo_ln, tdpo1, tdpo2, trdpo or fpo",
    ),
    Command(
        ("cache",),
        "featalign.reference:CacheConfig",
        "featalign.reference:run_cache",
        lambda out, cfg: f"cache written to {out}",
        "build the offline reference cache: reference log-probs and top-k SAE activations",
    ),
    Command(
        ("sae", "train"),
        "featalign.sae.train:SAETrainConfig",
        "featalign.sae.train:train_sae",
        _sae_table,
        "train an SAE on a model's layer",
    ),
    Command(
        ("sae", "eval"),
        "featalign.sae.evaluate:SAEEvalConfig",
        "featalign.sae.evaluate:run_sae_eval",
        _sae_eval,
        "evaluate an SAE: reconstruction, sparsity, CE loss recovered, and the MSE-vs-L0 frontier",
    ),
    Command(
        ("sae", "match"),
        "featalign.sae.match:SAEMatchConfig",
        "featalign.sae.match:run_sae_match",
        _sae_match,
        "match the latents of two SAEs one to one (SAE Match)",
    ),
    Command(
        ("explain",),
        "featalign.explain:ExplainConfig",
        "featalign.explain:run_explain",
        _explain,
        "the SAE features whose activation alignment changed most, with their tokens",
    ),
    Command(
        ("attribute",),
        "featalign.attribute:AttributeConfig",
        "featalign.attribute:run_attribute",
        _attribute,
        "attribute a margin or reward to SAE features, checked by ablation",
    ),
    Command(
        ("select-features",),
        "featalign.select_features:SelectFeaturesConfig",
        "featalign.select_features:run_select_features",
        _selected,
        "the SAE features that tell chosen from rejected answers, for the feature controls",
    ),
    Command(
        ("eval",),
        "featalign.evaluate:EvalConfig",
        "featalign.evaluate:evaluate_policy",
        _json,
        "evaluate a trained policy on held-out preference data and its own samples",
    ),
    Command(
        ("generate",),
        "featalign.generate:GenerateConfig",
        "featalign.generate:run_generate",
        _generated,
        "sample answers to a prompt file for external judges (AlpacaEval format)",
    ),
    Command(
        ("compare",),
        "featalign.compare:CompareConfig",
        "featalign.compare:run_compare",
        _compared,
        "train every method on one budget and report reward against KL (the main job)",
    ),
]
GROUPS = {"world": "the built-in synthetic world", "sae": "sparse autoencoders: train, evaluate, match"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_help(f: dataclasses.Field, typ) -> str:
    """The field's help with its default, as ``--help`` and the docs print it."""
    text = f.metadata.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else None
    if base_type(typ) is bool:
        return f"{text} (default: {'on' if default else 'off'})"
    return f"{text} (default: {default})" if default not in (None, "") else text


def _argtype(typ, name: str):
    def convert(text: str):
        try:
            return decode(text, typ, name)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{name}: ")) from None

    convert.__name__ = base_type(typ).__name__ if isinstance(base_type(typ), type) else name
    return convert


def add_config_args(p: argparse.ArgumentParser, cls) -> None:
    """One flag per field of ``cls`` (positional where the field says so), the shared data options grouped."""
    from .data import DataOptions

    h = hints(cls)
    data_fields = {f.name for f in dataclasses.fields(DataOptions)} if issubclass(cls, DataOptions) else set()
    groups = {True: p.add_argument_group("data (how preference records are read and tokenised)"), False: p}
    for f in dataclasses.fields(cls):
        typ = h[f.name]
        help_ = field_help(f, typ).replace("%", "%%")  # argparse %-formats help strings
        allowed = choices(typ)
        g = groups[f.name in data_fields]
        if f.metadata.get("positional"):
            g.add_argument(
                f.name,
                nargs="?",
                type=_argtype(typ, f.name),
                default=argparse.SUPPRESS,
                help=help_,
                metavar=f.name.upper(),
            )
        elif base_type(typ) is bool:
            g.add_argument(
                flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_
            )
        else:
            g.add_argument(
                flag(f.name),
                dest=f.name,
                type=_argtype(typ, f.name),
                choices=allowed,
                default=argparse.SUPPRESS,
                help=help_,
                metavar=None if allowed else f.name.upper(),
            )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="featalign",
        description="Preference optimisation with SAE feature-level constraints. "
        "Every command reads its settings from flags and from --config FILE.yaml (flags win).",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log what each step does (data drops are warned either way)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for c in COMMANDS:
        parent = sub
        if len(c.words) == 2:
            if c.words[0] not in groups:
                gp = sub.add_parser(c.words[0], help=GROUPS[c.words[0]], description=GROUPS[c.words[0]])
                groups[c.words[0]] = gp.add_subparsers(dest=f"{c.words[0]}_command", required=True, metavar="COMMAND")
            parent = groups[c.words[0]]
        cls = c.load("config")
        cp = parent.add_parser(c.words[-1], help=c.help, description=f"featalign {' '.join(c.words)}: {c.help}.")
        cp.add_argument(
            "--config", metavar="FILE.yaml", help=f"YAML file of {cls.__name__} settings (flags override it)"
        )
        add_config_args(cp, cls)
        cp.set_defaults(command_=c)
    return p


def config_from_args(cls, ns: argparse.Namespace):
    """The command's settings: the YAML file's first, then the flags given."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(ns).items() if k in names}
    if getattr(ns, "config", None):
        return cls.from_yaml(ns.config, **given)
    return cls.from_dict(given)


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
    c: Command = ns.command_
    try:
        cfg = config_from_args(c.load("config"), ns)
        cfg.validate()
        print(c.show(c.load("run")(cfg), cfg))
    except FeatalignError as e:
        print(f"featalign: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"featalign: error: {e.filename}: no such file", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
