"""`featalign generate`: prompt files in, AlpacaEval's model_outputs.json and JSONL out."""

import json

import pytest

from featalign import cli
from featalign import data as D
from featalign.errors import ConfigError
from featalign.generate import read_prompts, sample, stop_ids
from featalign.models import load_model, load_tokenizer


def test_read_prompts_takes_every_prompt_format(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\nfirst\n")
    assert read_prompts(str(txt)) == ["first", "second"]  # blank lines skipped, repeats once
    alpaca = tmp_path / "eval.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi", "dataset": "x"}, {"instruction": "Say bye"}]))
    assert read_prompts(str(alpaca)) == ["Say hi", "Say bye"]
    rows = [
        {"prompt": "a"},
        {"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
        {"prompt": "q", "chosen": "x", "rejected": "y"},
    ]
    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_prompts(str(jl)) == ["a", [{"role": "user", "content": "b"}], "q"]
    assert read_prompts(str(jl), limit=2) == ["a", [{"role": "user", "content": "b"}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: .*'instruction', 'prompt' or 'messages'"):
        read_prompts(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        read_prompts(str(tmp_path / "missing.txt"))


@pytest.mark.slow
def test_generate_writes_alpacaeval_outputs(world, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    test_rows = [json.loads(line) for line in open(world["test"])][:6]
    prompts.write_text("\n".join(json.dumps({"instruction": r["prompt"]}) for r in test_rows) + "\n")
    out = tmp_path / "gen"
    assert (
        cli.main(
            [
                "generate",
                "--model",
                world["sft"],
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--max-new-tokens",
                "12",
                "--generator",
                "world-sft",
            ]
        )
        == 0
    )
    outputs = json.loads((out / "model_outputs.json").read_text())
    distinct = list(dict.fromkeys(r["prompt"] for r in test_rows))
    assert [o["instruction"] for o in outputs] == distinct
    assert all(set(o) == {"instruction", "output", "generator"} and o["generator"] == "world-sft" for o in outputs)
    assert any(o["output"] for o in outputs)
    rows = [json.loads(line) for line in open(out / "generations.jsonl")]
    assert [r["output"] for r in rows] == [o["output"] for o in outputs] and all(0 < r["n_tokens"] <= 12 for r in rows)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["temperature"] == 0.7 and settings["max_new_tokens"] == 12
    assert settings["rendering"] == D.renderer(load_tokenizer(world["sft"])).name and settings["stop_token_ids"]


@pytest.mark.slow
def test_sample_stops_at_the_stop_token_and_greedy_repeats(world):
    tok, model = load_tokenizer(world["sft"]), load_model(world["sft"]).eval()
    prompts = [tok(json.loads(line)["prompt"])["input_ids"] for line in list(open(world["test"]))[:8]]
    stops = stop_ids(tok)
    gens = sample(model, tok, prompts, max_new_tokens=40, temperature=1.0, batch_size=3, seed=5)
    assert len(gens) == len(prompts)
    for g in gens:  # an answer ends at its first stop token, or runs to the budget without one
        assert all(t not in stops for t in g[:-1]) and (g[-1] in stops or len(g) == 40)
    assert sample(model, tok, prompts, 40, temperature=1.0, batch_size=3, seed=5) == gens  # seeded
    g1 = sample(model, tok, prompts[:3], 10, temperature=0, batch_size=3)
    assert g1 == sample(model, tok, prompts[:3], 10, temperature=0, batch_size=3, seed=99)  # greedy ignores the seed
