"""A verifiable ground truth for a base model: a two-digit number plus a one-digit one, judged exactly.

Prompts are four-shot text (``23 + 4 = 27\\n70 + 8 = 78\\n...a + b =``) that a base model without a chat template
continues; an answer is kept up to its first line break. The size of the sums is set by what Gemma 3 270M gets
right part of the time, since a pair needs one right and one wrong answer among the samples: sampled at
temperature 1 it answers about 30% of these correctly, against 1-6% of two-digit sums and of a ``Q: ... A:``
layout. The judge reads the first integer of the answer: reward 1 when it is the sum, else 0
(``featalign.arithmetic:reward``). Unlike a sentiment lexicon, this judge cannot be pleased by anything but the
right number, so a method that games the judge has nothing to find.
"""

from __future__ import annotations

import random
import re

from .packaged import gemma3_gguf
from .tasks import Task

SHOTS = [(23, 4), (70, 8), (35, 7), (12, 9)]
_QUESTION = re.compile(r"^(\d+) \+ (\d+) =", re.MULTILINE)
_NUMBER = re.compile(r"-?\d+")


def question(a: int, b: int) -> str:
    shots = "".join(f"{x} + {y} = {x + y}\n" for x, y in SHOTS)
    return f"{shots}{a} + {b} ="


def prompts() -> list[str]:
    """Every two-digit plus one-digit sum but the shots', in a fixed shuffled order."""
    out = [question(a, b) for a in range(10, 100) for b in range(1, 10) if (a, b) not in SHOTS]
    random.Random(0).shuffle(out)
    return out


def reward(prompt, response: str) -> dict[str, float]:
    """1 when the answer's first integer is the prompt's (last) sum, else 0; ``answered``: whether it gave one."""
    asked = _QUESTION.findall(str(prompt))
    found = _NUMBER.search(response)
    if not asked:
        return {"reward": 0.0, "answered": float(found is not None)}
    a, b = map(int, asked[-1])
    return {"reward": float(found is not None and int(found.group()) == a + b), "answered": float(found is not None)}


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip()


TASK = Task(
    name="arithmetic",
    version=2,
    prompts=prompts,
    reward=reward,
    default_model=gemma3_gguf,
    no_model="the arithmetic task needs a model: --model, or the Gemma 3 270M wheels (make gemma)",
    trim=first_line,
    settings={"n_train": 512, "n_test": 128, "max_new_tokens": 8, "min_gap": 0.5, "samples": 4, "batch_size": 64},
)
