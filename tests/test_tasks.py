"""Task presets: pairs sampled from a model and ranked by a ground-truth judge; the arithmetic judge by hand."""

import json

import pytest

from featalign import arithmetic
from featalign.errors import ConfigError
from featalign.tasks import Task, TaskConfig, build_task


def test_arithmetic_judge_reads_the_first_integer_of_the_answer():
    q = arithmetic.question(33, 9)
    assert q.endswith("\n33 + 9 =") and q.startswith("23 + 4 = 27\n70 + 8 = 78\n")
    assert arithmetic.reward(q, " 42") == {"reward": 1.0, "answered": 1.0}  # 33 + 9, not a shot's sum
    assert arithmetic.reward(q, " 41, or 42") == {"reward": 0.0, "answered": 1.0}  # the first number counts
    assert arithmetic.reward(q, " forty-two") == {"reward": 0.0, "answered": 0.0}
    assert arithmetic.reward(q, "The sum is 42.")["reward"] == 1.0
    assert arithmetic.reward(q, " 27")["reward"] == 0.0  # the first shot's answer
    assert arithmetic.first_line(" 42\n1 + 2 = 3") == " 42"


def test_arithmetic_prompts_are_every_two_digit_plus_one_digit_sum_once():
    ps = arithmetic.prompts()
    assert len(ps) == len(set(ps)) == 90 * 9 - len(arithmetic.SHOTS)
    assert ps == arithmetic.prompts()  # a fixed order: the split is the same on every machine


def _world_task(prompts):
    from featalign.world.judge import reward

    return Task(
        name="world",
        version=1,
        prompts=lambda: list(prompts),
        reward=reward,
        default_model=lambda: None,
        no_model="no model",
    )


def test_pairs_are_the_best_and_worst_of_the_samples(world, tmp_path):
    """With four samples a prompt, chosen is the best-judged answer and rejected the worst (the world's judge); a pair
    closer than min_gap is dropped; splits share no prompt; the same settings reuse the folder, new ones rebuild it."""
    with open(world["test"]) as f:
        prompts = sorted({json.loads(line)["prompt"] for line in f})[:24]
    task = _world_task(prompts)
    cfg = TaskConfig(model=world["sft"], n_train=16, n_test=8, max_new_tokens=24, min_gap=0.2, samples=4, batch_size=8)
    m = build_task(str(tmp_path / "t"), task, cfg, progress=False)
    rows = {s: [json.loads(line) for line in open(m[s])] for s in ("train", "test")}
    assert m["stats"]["train"]["pairs"] + m["stats"]["train"]["dropped_ties"] == 16 and rows["train"]
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["test"]}
    for r in rows["train"] + rows["test"]:
        judged = task.reward(r["prompt"], r["chosen"])["reward"], task.reward(r["prompt"], r["rejected"])["reward"]
        assert (r["chosen_reward"], r["rejected_reward"]) == judged and judged[0] >= judged[1] + 0.2
    # the first two of the four samples are the two-sample build's (same seeds): on every prompt that build kept,
    # best-of-4 against worst-of-4 is at least as far apart
    two = build_task(str(tmp_path / "t2"), task, TaskConfig(**{**cfg.__dict__, "samples": 2}), progress=False)
    gap4 = {r["prompt"]: r["chosen_reward"] - r["rejected_reward"] for r in rows["train"]}
    for r in map(json.loads, open(two["train"])):
        assert gap4[r["prompt"]] >= r["chosen_reward"] - r["rejected_reward"]
    assert build_task(str(tmp_path / "t"), task, cfg, progress=False)["key"] == m["key"]
    assert build_task(str(tmp_path / "t"), task, TaskConfig(**{**cfg.__dict__, "seed": 1}), False)["key"] != m["key"]


def test_task_settings_are_checked_before_any_sampling(world, tmp_path):
    task = _world_task(["a", "b", "c"])
    with pytest.raises(ConfigError, match="n_train \\+ n_test must be at most 3"):
        build_task(str(tmp_path / "t"), task, TaskConfig(model=world["sft"], n_train=3, n_test=1), progress=False)
    with pytest.raises(ConfigError, match="samples must be at least 2"):
        build_task(str(tmp_path / "t"), task, TaskConfig(model=world["sft"], n_train=1, n_test=1, samples=1), False)
    with pytest.raises(ConfigError, match="no model"):
        build_task(str(tmp_path / "t"), task, TaskConfig(n_train=1, n_test=1), progress=False)
