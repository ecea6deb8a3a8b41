"""Judges and the win-rate statistics, each against a value worked out by hand in the test."""

import math

import pytest

from featalign.errors import ConfigError
from featalign.judges import RewardFunction, distinct_n, length_controlled_win_rate, make_judge, mean_se, win_rate, wins


def logit(p):
    return math.log(p / (1 - p))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_win_rate_counts_ties_half_with_its_standard_error():
    a, b = [1, 2, 3, 4], [0, 2, 5, 1]
    assert wins(a, b) == [1.0, 0.5, 0.0, 1.0]
    rate, se = win_rate(a, b)
    # mean 2.5/4; sample sd of (1, .5, 0, 1) = sqrt(((.375)^2 + (.125)^2 + (.625)^2 + (.375)^2) / 3)
    sd = math.sqrt((0.375**2 + 0.125**2 + 0.625**2 + 0.375**2) / 3)
    assert rate == pytest.approx(0.625) and se == pytest.approx(sd / 2)
    assert mean_se([3.0]) == (3.0, 0.0)


def test_length_controlled_win_rate_is_the_intercept_of_a_two_group_logistic_fit():
    """Two equal groups, longer (+d) winning 80% and shorter (-d) winning 40%: the saturated fit gives
    logit p = a + b x with x = +-tanh(1) (the differences are +-1 sd), so the rate at x = 0 is
    sigmoid((logit .8 + logit .4) / 2), and var(a) = (1/(n .8 .2) + 1/(n .4 .6)) / 4 by the Fisher information."""
    n = 50
    a, b, la, lb = [], [], [], []
    for i in range(n):  # longer answers: 40 wins of 50
        a.append(1.0 if i < 40 else 0.0)
        b.append(0.5)
        la.append(30)
        lb.append(10)
    for i in range(n):  # shorter answers: 20 wins of 50
        a.append(1.0 if i < 20 else 0.0)
        b.append(0.5)
        la.append(10)
        lb.append(30)
    rate, se = length_controlled_win_rate(a, b, la, lb)
    s = sigmoid((logit(0.8) + logit(0.4)) / 2)
    var_a = (1 / (n * 0.8 * 0.2) + 1 / (n * 0.4 * 0.6)) / 4
    assert rate == pytest.approx(s, abs=1e-6)
    assert se == pytest.approx(s * (1 - s) * math.sqrt(var_a), rel=1e-4)
    plain, _ = win_rate(a, b)
    assert plain == pytest.approx(0.6)  # the plain rate averages probabilities, the fit averages logits


def test_a_pure_length_advantage_is_worth_half_and_equal_lengths_fall_back():
    # wins exactly when longer, loses exactly when shorter, balanced: at zero difference it is a coin flip
    a = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    la, lb = [20, 25, 5, 8, 30, 2], [10, 10, 10, 10, 10, 10]
    # a perfectly separable fit (the slope runs off) falls back to the plain rate, itself 0.5 here
    rate, _ = length_controlled_win_rate(a, [0.5] * 6, la, lb)
    assert rate == pytest.approx(0.5)
    # overlapping: one loss while longer and one win while shorter keeps the fit finite; symmetric data -> 0.5
    a2 = [1.0, 0.0, 1.0, 0.0]
    rate2, se2 = length_controlled_win_rate(a2, [0.5] * 4, [20, 20, 0, 0], [10, 10, 10, 10])
    assert rate2 == pytest.approx(0.5, abs=1e-6) and se2 > 0
    assert length_controlled_win_rate([1, 0, 1], [0, 1, 0], [5, 5, 5], [5, 5, 5]) == win_rate([1, 0, 1], [0, 1, 0])


def test_distinct_n_pools_word_ngrams():
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)  # (a b),(b a),(a b),(a b): 2 distinct of 4
    assert distinct_n(["x y z"], 1) == 1.0 and distinct_n([""], 2) == 0.0


def wordy(prompt, response):
    return {"reward": float(len(response.split())), "words": float(len(response.split()))}


def test_reward_function_takes_floats_or_dicts_and_errors_name_the_spec():
    j = RewardFunction("tests.test_judges:wordy")
    assert j(["p", "q"], ["one two", "three"]) == [{"reward": 2.0, "words": 2.0}, {"reward": 1.0, "words": 1.0}]
    assert RewardFunction("math:hypot")([3.0], [4.0]) == [{"reward": 5.0}]
    for spec, msg in [
        ("nocolon", "module:function"),
        ("no_such_mod_x:f", "cannot import"),
        ("math:nope", "has no 'nope'"),
        ("math:pi", "not callable"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            RewardFunction(spec)
    with pytest.raises(ConfigError, match="not a number"):
        RewardFunction("builtins:max")(["a"], ["b"])
    with pytest.raises(ConfigError, match="not both"):
        make_judge("math:hypot", "some/model")
    assert make_judge() is None


def test_world_reward_is_a_judge_like_any_other():
    import random

    from featalign.world import lang

    j = make_judge("featalign.world.judge:reward")
    prompt = lang.sample_prompt(random.Random(0)).prompt
    resp = "a plain answer of a few words"
    out = j([prompt], [resp])[0]
    assert out["reward"] == pytest.approx(lang.reward(prompt, resp))
    assert {"topic", "sentiment", "length"} <= set(out)
    with pytest.raises(ConfigError, match="world prompts"):
        j(["not a world prompt at all"], ["x"])


def test_reward_model_scores_with_the_last_logit(tmp_path):
    """A tiny seed-built sequence-classification model: the judge's scores equal its own forward's last logit."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "good", "bad", "movie", "the", "[UNK]"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="[UNK]")
    from tiny import tiny_lm

    tiny_lm(
        vocab=len(vocab), hidden=16, intermediate=32, layers=1, heads=2, task="classify", num_labels=1, pad_token_id=0
    ).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    j = make_judge(reward_model=str(tmp_path))
    scores = j(["the movie", "the"], [" good", " bad movie"])
    model = LlamaForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        for (p, a), s in zip([("the movie", " good"), ("the", " bad movie")], scores):
            ids = tok(p + a, return_tensors="pt")
            assert s["reward"] == pytest.approx(float(model(**ids).logits[0, -1]), abs=1e-5)
    with pytest.raises(ConfigError, match="sequence-classification"):
        make_judge(reward_model=str(tmp_path / "missing"))
