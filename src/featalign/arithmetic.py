"""A verifiable ground truth for a base model: two-digit sums, judged exactly.

Prompts are few-shot text (``Q: 23 + 41 = ?\\nA: 64\\n...Q: a + b = ?\\nA:``) that a base model without a chat
template continues; an answer is kept up to its first line break. The judge reads the first integer of the answer:
reward 1 when it is the sum, else 0 (``featalign.arithmetic:reward``). Unlike a sentiment lexicon, this judge cannot
be pleased by anything but the right number, so a method that games the judge has nothing to find.
"""

from __future__ import annotations

import random
import re

from .packaged import gemma3_gguf
from .tasks import Task

SHOTS = [(23, 41), (70, 18), (35, 47)]
_QUESTION = re.compile(r"Q: (\d+) \+ (\d+) = \?")
_NUMBER = re.compile(r"-?\d+")


def question(a: int, b: int) -> str:
    shots = "".join(f"Q: {x} + {y} = ?\nA: {x + y}\n" for x, y in SHOTS)
    return f"{shots}Q: {a} + {b} = ?\nA:"


def prompts() -> list[str]:
    """Every two-digit sum but the shots', in a fixed shuffled order."""
    out = [question(a, b) for a in range(10, 100) for b in range(10, 100) if (a, b) not in SHOTS]
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
    version=1,
    prompts=prompts,
    reward=reward,
    default_model=gemma3_gguf,
    no_model="the arithmetic task needs a model: --model, or the Gemma 3 270M wheels (make gemma)",
    trim=first_line,
    settings={"n_train": 512, "n_test": 128, "max_new_tokens": 8, "min_gap": 0.5, "samples": 4, "batch_size": 64},
)
