"""`featalign eval` with a judge: reward, win rates against the reference's own samples, diversity, saved
generations."""

import json

import pytest
import torch

from featalign import cli
from featalign.evaluate import EvalConfig, evaluate_policy
from featalign.models import load_model, load_tokenizer

WORLD = "featalign.world.judge:reward"


def n_words(prompt, response):
    return len(response.split())


@pytest.mark.slow
def test_the_reference_against_itself_ties_everywhere(world, tmp_path):
    """Policy == reference with the same seed: the same samples, so every prompt ties (win rate and LC win rate
    exactly 0.5), the KL estimate is 0 and the reward equals the reference's."""
    tok, sft = load_tokenizer(world["sft"]), load_model(world["sft"]).eval()
    cfg = EvalConfig(
        model=world["sft"],
        data=world["test"],
        n_prompts=24,
        max_new_tokens=24,
        reward_fn=WORLD,
        save_generations=str(tmp_path / "gens"),
    )
    res = evaluate_policy(cfg, model=sft, ref=sft, tok=tok)
    assert res["win_rate"] == 0.5 and res["lc_win_rate"] == 0.5 and res["win_rate_se"] == 0.0
    assert res["kl_to_ref"] == pytest.approx(0.0, abs=1e-5)
    assert res["reward"] == pytest.approx(res["reference"]["reward"])
    assert len(res["rewards_per_prompt"]) == 24 and res["reward_se"] > 0
    assert set(res["reward_parts"]) == {"topic", "sentiment", "length"} and 0 < res["distinct2"] <= 1
    outputs = json.loads((tmp_path / "gens" / "model_outputs.json").read_text())
    assert len(outputs) == 24 and {o["generator"] for o in outputs} == {"sft"}
    rows = [json.loads(line) for line in open(tmp_path / "gens" / "generations.jsonl")]
    assert [r["reward"] for r in rows] == res["rewards_per_prompt"]


@pytest.mark.slow
def test_a_policy_that_only_says_eos_loses_to_the_reference(world, tmp_path):
    """A policy whose every answer is empty (eos forced by its output bias), judged by a word count: the reference
    wins wherever it says anything (the SFT model answers with several words nearly always), ties elsewhere."""
    tok, sft = load_tokenizer(world["sft"]), load_model(world["sft"]).eval()
    mute = load_model(world["sft"]).eval()
    with torch.no_grad():
        head = mute.get_output_embeddings()
        bias = torch.zeros(head.weight.shape[0])
        bias[tok.eos_token_id] = 1e4
        head.bias = torch.nn.Parameter(bias)
    res = evaluate_policy(
        EvalConfig(
            model=world["sft"],
            data=world["test"],
            n_prompts=32,
            max_new_tokens=16,
            reward_fn="tests.test_evaluate:n_words",
        ),
        model=mute,
        ref=sft,
        tok=tok,
    )
    assert res["mean_length"] == 1.0 and res["distinct2"] == 0.0
    assert res["win_rate"] < 0.25 and res["reward"] < res["reference"]["reward"]


@pytest.mark.slow
def test_eval_cli_takes_a_reward_function(world, tmp_path, capsys):
    assert (
        cli.main(
            [
                "eval",
                "--model",
                world["sft"],
                "--ref-model",
                world["sft"],
                "--data",
                world["test"],
                "--n-prompts",
                "8",
                "--max-new-tokens",
                "8",
                "--reward-fn",
                WORLD,
                "--limit",
                "16",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["judge"] == WORLD and res["win_rate"] == 0.5 and "lc_win_rate" in res and res["n_pairs"] == 16
