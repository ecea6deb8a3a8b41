import json
import re

import pytest
import yaml
from conftest import margin

from featalign import cli


def test_train_from_yaml_with_flag_override(world, tmp_path, capsys):
    """YAML values are read by each field's type: PyYAML gives `5e-6` as a string and `on` as a boolean."""
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(
        f"method: dpo\nmodel: {world['sft']}\ndata: {world['train']}\nout: {tmp_path / 'run'}\nbatch_size: 4\n"
        "max_steps: 5\nlimit: 40\nmax_length: 96\nmax_prompt_length: 24\nbeta: 0.2\nlr: 5e-6\npack: off\n"
        "tensorboard: no\nlog_every: 1\n"
    )
    assert cli.main(["train", "--config", str(cfg), "--max-steps", "2", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and not summary["packed"]
    # the lr after step 1 of 2 (no warm-up at 10% of 2 steps): 5e-6 x cosine half-way, 0.5 x (1 + cos(pi / 2))
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == pytest.approx(2.5e-6)
    assert not (tmp_path / "run" / "checkpoint").exists()  # save_every=0: only the final model is written
    assert not (tmp_path / "run" / "tb").exists()


def test_settings_are_decoded_by_type_and_checked_in_one_line():
    from featalign.config import decode
    from featalign.errors import ConfigError
    from featalign.train import TrainConfig

    cfg = TrainConfig.from_dict(
        {
            "method": "dpo",
            "model": "m",
            "data": "d",
            "lr": "5e-6",
            "limit": "1e3",
            "pack": True,
            "bf16": "off",
            "beta": 1,
        }
    )
    assert (cfg.lr, cfg.limit, cfg.pack, cfg.bf16, cfg.beta) == (5e-6, 1000, "on", False, 1.0)
    assert decode("4,8", list[int], "layers") == [4, 8] and decode(None, int | None, "limit") is None
    bad = [
        ({"beta": -1}, "beta: must be > 0, got -1"),
        ({"alpha": -0.5}, "alpha: must be >= 0, got -0.5"),
        ({"k": 0}, "k: must be >= 1, got 0"),
        ({"lr": 0}, "lr: must be > 0, got 0"),
        ({"limit": -3}, "limit: must be >= 1"),
        ({"max_length": -1}, "max_length: must be >= 2"),
        ({"lr": "fast"}, "lr: expected a number, got 'fast'"),
        ({"limit": 2.5}, "limit: expected an integer, got 2.5"),
        ({"method": "ppo"}, "method: 'ppo' is not one of dpo"),
    ]
    for change, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            TrainConfig.from_dict({"method": "dpo", "model": "m", "data": "d", **change}).validate()
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['betta'\] for TrainConfig"):
        TrainConfig.from_dict({"betta": 0.1})


def test_every_command_takes_a_config_file(tmp_path, capsys):
    """Each command reads --config; a misspelt setting in it is one line naming the file and the setting."""
    for c in cli.COMMANDS:
        bad = tmp_path / f"{'-'.join(c.words)}.yaml"
        bad.write_text("no_such_setting: 1\n")
        assert cli.main([*c.words, "--config", str(bad)]) == 2, c.words
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"featalign: error: {bad}: unknown setting(s) ['no_such_setting']") and "\n" not in err, (
            err
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--method", "dpo", "--model", "MODEL", "--data", "/nonexistent/x.jsonl"],
            "/nonexistent/x.jsonl: no such file",
        ),
        (
            ["train", "--method", "fpo", "--model", "MODEL", "--data", "DATA", "--sae", "SAE", "--layer", "7"],
            "layer 7 is out of range",
        ),
        (
            [
                "cache",
                "--model",
                "MODEL",
                "--data",
                "DATA",
                "--out",
                "OUT",
                "--sae",
                "SAE",
                "--layer",
                "2",
                "--max-length",
                "8",
                "--max-prompt-length",
                "16",
            ],
            "max_prompt_length (16) must be below max_length (8)",
        ),
        (
            ["train", "--method", "dpo", "--model", "MODEL", "--data", "DATA", "--beta", "-1"],
            "beta: must be > 0, got -1",
        ),
        (["train", "--method", "dpo", "--model", "/nope", "--data", "DATA"], "model /nope: no such file or folder"),
        (["eval", "--model", "./missing-policy", "--data", "DATA"], "model ./missing-policy: no such file or folder"),
        (
            ["sae", "eval", "--sae", "SAE", "--model", "MODEL", "--data", "/nonexistent/docs.jsonl"],
            "/nonexistent/docs.jsonl: no such file",
        ),
    ],
)
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
    assert (
        "argument --method: 'ppo' is not one of dpo, ipo, simpo, dpo_ln, tdpo1, tdpo2, trdpo, fpo"
        in capsys.readouterr().err
    )
    cfg = tmp_path / "c.yaml"  # the same setting from a YAML file goes through the same decoding
    cfg.write_text(yaml.safe_dump({"method": "ppo", "model": world["sft"], "data": world["train"]}))
    assert cli.main(["train", "--config", str(cfg)]) == 2
    assert "method: 'ppo' is not one of dpo" in capsys.readouterr().err


def test_world_build_command_reuses_the_cache(world, capsys):
    from conftest import SEED

    assert cli.main(["world", "build", "--out", world["root"], "--quick", "--seed", str(SEED)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sft_ppl"] == world["manifest"]["sft_ppl"]


def test_sae_eval_with_frontier(world, world_sae, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        cli.main(
            [
                "sae",
                "eval",
                "--sae",
                world_sae["path"],
                "--model",
                world["sft"],
                "--data",
                world["test"],
                "--out",
                str(out),
                "--max-tokens",
                "3000",
                "--frontier",
                "--frontier-values",
                "2,4,8,16",
            ]
        )
        == 0
    )
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
    """`--help` teaches: one short line per flag, choices listed for enumerated settings."""
    parser = cli.build_parser()
    missing, long = [], []
    for name, sub in _subcommands(parser):
        assert sub.format_help()  # renders (a stray % in a help string would raise here)
        for action in sub._actions:
            if action.dest in ("help", "command", "sae_command", "world_command") or action.help == "==SUPPRESS==":
                continue
            text = re.sub(r"\s*\(default: [^)]*\)$", "", action.help or "").strip()
            if not text:  # a default alone teaches nothing
                missing.append(f"{name}: {'/'.join(action.option_strings) or action.dest}")
            if len(text) > 150:
                long.append(f"{name}: {'/'.join(action.option_strings)}")
    assert not missing and not long, (missing, long)
    text = dict(_subcommands(parser))["train"].format_help()
    assert "{dpo,ipo,simpo,dpo_ln,tdpo1,tdpo2,trdpo,fpo}" in text and "{union,policy}" in text
    assert "data (how preference records are read and tokenised)" in text


def test_cache_takes_max_length_alone(world, tmp_path, capsys):
    """A default must not break a valid flag: --max-length 64 alone (the prompt budget follows it)."""
    assert (
        cli.main(
            [
                "cache",
                "--model",
                world["sft"],
                "--data",
                world["train"],
                "--out",
                str(tmp_path / "c"),
                "--max-length",
                "64",
                "--limit",
                "16",
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["settings"]["max_prompt_length"] == 32 and manifest["n_pairs"] <= 16
