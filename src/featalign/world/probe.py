"""Does a world LM track an answer's mood? The probe that found why the v2 world's model had no sentiment.

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
def mood_probe(model, tokenizer, examples: list[dict]) -> float:
    """Mean share of the model's sentiment-word probability on the right polarity (0.5 = blind to mood)."""
    from .. import data as D

    pos = torch.tensor(tokenizer.convert_tokens_to_ids(lang.POSITIVE))
    neg = torch.tensor(tokenizer.convert_tokens_to_ids(lang.NEGATIVE))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    by_response: dict[int, list[tuple[int, int]]] = {}
    for n, i, pol, _ in _positions([e["response"] for e in examples]):
        by_response.setdefault(n, []).append((i, pol))
    scores = []
    for n, items in by_response.items():
        prompt = D.encode_prompt(tokenizer, examples[n]["prompt"])
        # the world's tokenizer is word-level: word i of the response is response token i
        response = D.encode_response(tokenizer, examples[n]["response"])
        probs = model(torch.tensor([prompt + response], device=device)).logits[0].float().softmax(-1).cpu()
        for i, pol in items:
            q = probs[len(prompt) + i - 1]
            p_pos = q[pos].sum() / (q[pos].sum() + q[neg].sum())
            scores.append(float(p_pos if pol > 0 else 1 - p_pos))
    model.train(was_training)
    return sum(scores) / len(scores)
