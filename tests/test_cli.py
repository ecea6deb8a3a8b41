import json
import re

import pytest
import yaml

from featalign import cli

from conftest import margin


def test_train_from_yaml_with_flag_override(world, tmp_path, capsys):
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(yaml.safe_dump({"method": "dpo", "model": world["sft"], "data": world["train"], "out": str(tmp_path / "run"),
                                   "batch_size": 4, "max_steps": 5, "limit": 40, "max_length": 96, "max_prompt_length": 24,
                                   "beta": 0.2, "tensorboard": False}))
    assert cli.main(["train", "--config", str(cfg), "--max-steps", "2", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text()) if (tmp_path / "run" / "checkpoint").exists() else None
    assert state is None  # save_every=0: only the final model is written


@pytest.mark.parametrize("argv, message", [
    (["train", "--method", "dpo", "--model", "MODEL", "--data", "/nonexistent/x.jsonl"], "/nonexistent/x.jsonl: no such file"),
    (["train", "--method", "fpo", "--model", "MODEL", "--data", "DATA", "--sae", "SAE", "--layer", "7"], "layer 7 is out of range"),
    (["cache", "--model", "MODEL", "--data", "DATA", "--out", "OUT", "--sae", "SAE", "--layer", "2", "--max-length", "8",
      "--max-prompt-length", "16"], "max_prompt_length (16) must be below max_length (8)"),
])
def test_errors_are_one_line(world, world_sae, tmp_path, capsys, argv, message):
    subs = {"MODEL": world["sft"], "DATA": world["train"], "SAE": world_sae["path"], "OUT": str(tmp_path / "o")}
    argv = [subs.get(a, a) for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run"), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("featalign: error:") and message in err and "\n" not in err, err


def test_an_unknown_choice_is_refused_with_the_choices(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--method", "ppo", "--model", world["sft"], "--data", world["train"]])
    assert e.value.code == 2
    assert "invalid choice: 'ppo' (choose from 'dpo', 'dpo_ln', 'fpo', 'ipo', 'simpo', 'tdpo1', 'tdpo2', 'trdpo')" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"  # the same setting from a YAML file goes through the config's own check
    cfg.write_text(yaml.safe_dump({"method": "ppo", "model": world["sft"], "data": world["train"]}))
    assert cli.main(["train", "--config", str(cfg)]) == 2
    assert "unknown method 'ppo'" in capsys.readouterr().err


def test_world_build_command_reuses_the_cache(world, capsys):
    from conftest import SEED

    assert cli.main(["world", "build", "--out", world["root"], "--quick", "--seed", str(SEED)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sft_ppl"] == world["manifest"]["sft_ppl"]


def test_sae_eval_with_frontier(world, world_sae, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["sae", "eval", "--sae", world_sae["path"], "--model", world["sft"], "--data", world["test"],
                     "--out", str(out), "--max-tokens", "3000", "--frontier", "--frontier-values", "2,4,8,16"]) == 0
    res = json.loads((out / "eval.json").read_text())
    l0s = [r["l0"] for r in res["frontier"]]
    mses = [r["normalized_mse"] for r in res["frontier"]]
    assert l0s == sorted(l0s)  # more latents kept, more active: by construction
    # fewer latents, worse reconstruction: not guaranteed for a trained SAE, so the smallest step is printed
    margin("smallest MSE ratio between neighbouring k", min(a / b for a, b in zip(mses, mses[1:])), 1.0)
    assert (out / "frontier.png").stat().st_size > 1000
    assert -1 <= res["decoder_cosine_to_init"] < 0.99  # the init is regenerated from the seed; trained rows have moved
    assert "explained_variance" in capsys.readouterr().out


def _subcommands(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {n}".strip(), p) for n, p in _subcommands(sub))
                yield name, sub


def test_every_flag_of_every_command_has_help():
    """`--help` teaches: one line per flag, choices listed for enumerated settings."""
    parser = cli.build_parser()
    missing = []
    for name, sub in _subcommands(parser):
        assert sub.format_help()  # renders (a stray % in a help string would raise here)
        for action in sub._actions:
            if action.dest in ("help", "command", "sae_cmd", "world_cmd") or action.help == "==SUPPRESS==":
                continue
            if not re.sub(r"\s*\(default: [^)]*\)$", "", action.help or "").strip():  # a default alone teaches nothing
                missing.append(f"{name}: {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing
    text = dict(_subcommands(parser))["train"].format_help()
    assert "{dpo,dpo_ln,fpo,ipo,simpo,tdpo1,tdpo2,trdpo}" in text and "{union,policy}" in text
    assert "data (how preference records are read and tokenised)" in text


def test_cache_takes_max_length_alone(world, tmp_path, capsys):
    """A default must not break a valid flag: --max-length 64 alone (the prompt budget follows it)."""
    assert cli.main(["cache", "--model", world["sft"], "--data", world["train"], "--out", str(tmp_path / "c"), "--max-length", "64",
                     "--limit", "16"]) == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["settings"]["max_prompt_length"] == 32 and manifest["n_pairs"] <= 16
