"""Does a world LM track an answer's mood, and does it compare a noun's topic with the prompt's? Two probes.

At each unnegated sentiment word that follows an earlier sentiment phrase of the same response, the probe takes
the share of the model's sentiment-word probability that falls on the word's polarity. A model blind to mood
scores 0.5; the Bayes-optimal predictor, which knows the generator (Beta(0.5, 0.5) moods) and the polarities
of the earlier phrases, scores what ``mood_oracle`` returns on the same positions (about 0.66).
"""

from __future__ import annotations

import random

import torch

from . import lang


def _positions(responses: list[str]):
    """(response index, word index, polarity of that word, polarities of the earlier phrases) per probed word."""
    for n, resp in enumerate(responses):
        words = resp.split()
        pols = lang.polarities(words)
        seen = 0
        for i, w in enumerate(words):
            if w in lang.POS_SET or w in lang.NEG_SET:
                if seen and words[i - 1] != lang.NEGATION:
                    yield n, i, 1 if w in lang.POS_SET else -1, pols[:seen]
                seen += 1


def probe_examples(n: int = 200, seed: int = 5) -> list[dict]:
    from .build import sample_examples

    return sample_examples(random.Random(seed), n)


def mood_oracle(examples: list[dict]) -> float:
    """Mean probability of the right polarity under the generator's own posterior predictive."""
    scores = []
    for _, _, pol, prev in _positions([e["response"] for e in examples]):
        p_pos = (prev.count(1) + 0.5) / (len(prev) + 1)
        scores.append(p_pos if pol > 0 else 1 - p_pos)
    return sum(scores) / len(scores)


@torch.no_grad()
def _share_on_right(model, tokenizer, examples: list[dict], items, group_a: list[str], group_b: list[str]) -> float:
    """Mean share, at each (response n, word i, side) item, of the model's probability for word i over the words of
    ``group_a`` and ``group_b`` that falls on the right group (side > 0: ``group_a``)."""
    from .. import data as D

    a = torch.tensor(tokenizer.convert_tokens_to_ids(group_a))
    b = torch.tensor(tokenizer.convert_tokens_to_ids(group_b))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    by_response: dict[int, list[tuple[int, int]]] = {}
    for n, i, side in items:
        by_response.setdefault(n, []).append((i, side))
    scores = []
    for n, its in by_response.items():
        prompt = D.encode_prompt(tokenizer, examples[n]["prompt"])
        # the world's tokenizer is word-level: word i of the response is response token i
        response = D.encode_response(tokenizer, examples[n]["response"])
        probs = model(torch.tensor([prompt + response], device=device)).logits[0].float().softmax(-1).cpu()
        for i, side in its:
            q = probs[len(prompt) + i - 1]
            p_a = q[a].sum() / (q[a].sum() + q[b].sum())
            scores.append(float(p_a if side > 0 else 1 - p_a))
    model.train(was_training)
    return sum(scores) / len(scores)


def mood_probe(model, tokenizer, examples: list[dict]) -> float:
    """Mean share of the model's sentiment-word probability on the right polarity (0.5 = blind to mood)."""
    items = [(n, i, pol) for n, i, pol, _ in _positions([e["response"] for e in examples])]
    return _share_on_right(model, tokenizer, examples, items, lang.POSITIVE, lang.NEGATIVE)


def _cue_positions(examples: list[dict]):
    """(response index, word index, +1 on-topic cue / -1 off-topic cue, the earlier cues' signs) per cue word."""
    for n, e in enumerate(examples):
        topic = lang.prompt_topic(e["prompt"])
        words = e["response"].split()
        seen: list[int] = []
        for i, w in enumerate(words):
            if i and w in (lang.ON_TOPIC_CUE, lang.OFF_TOPIC_CUE):
                side = 1 if lang.TOPIC_OF.get(words[i - 1]) == topic else -1
                yield n, i, side, list(seen)
                seen.append(side)


def topic_blind(examples: list[dict]) -> float:
    """What a predictor blind to whether the noun matches the prompt scores: the generator's posterior
    predictive of an on-topic clause given the earlier cues (Beta(0.5, 0.5) topicality)."""
    scores = []
    for _, _, side, prev in _cue_positions(examples):
        p_on = (prev.count(1) + 0.5) / (len(prev) + 1)
        scores.append(p_on if side > 0 else 1 - p_on)
    return sum(scores) / len(scores)


def topic_probe(model, tokenizer, examples: list[dict]) -> float:
    """Mean share of the model's probability for the topic cue (the word after a clause's first noun: "indeed" when
    the noun is on the prompt's topic, "anyway" when not) that falls on the right cue. The cue is fixed by the noun
    and the prompt, so a model that compares the two scores near 1; one blind to the comparison can only guess from
    how often the answer has been on topic so far (``topic_blind`` on the same positions)."""
    items = [(n, i, side) for n, i, side, _ in _cue_positions(examples)]
    return _share_on_right(model, tokenizer, examples, items, [lang.ON_TOPIC_CUE], [lang.OFF_TOPIC_CUE])
