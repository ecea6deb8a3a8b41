"""Judges: what scores a sampled answer, and the statistics that compare two sets of scored answers.

A judge maps ``(prompts, answers)`` to one dict per answer with at least a ``"reward"`` key (other keys are
parts of the reward, reported as means). Two kinds, both chosen on the command line:

- ``--reward-fn module:function``: any Python callable ``(prompt, response) -> float | dict`` (rule-based or
  programmatic rewards; the built-in world's reward is ``featalign.world.judge:reward``);
- ``--reward-model PATH``: an ``AutoModelForSequenceClassification``; the exchange is rendered with its chat
  template when it has one, and the score is the last logit (the only one of a usual reward model).

Win rates count ties as one half. The length-controlled win rate follows AlpacaEval 2: a logistic regression of
the win on ``tanh(length difference / its sd)``, read off at zero difference, so a policy cannot win by
being longer.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Protocol

import torch

from .errors import ConfigError


class Judge(Protocol):
    name: str

    def __call__(self, prompts: list, answers: list[str]) -> list[dict]: ...


class RewardFunction:
    """A Python callable named ``module:function``, called once per (prompt, answer)."""

    def __init__(self, spec: str):
        self.name = spec
        self.fn = load_callable(spec)

    def __call__(self, prompts: list, answers: list[str]) -> list[dict]:
        out = []
        for p, a in zip(prompts, answers):
            r = self.fn(p, a)
            if isinstance(r, dict):
                if "reward" not in r:
                    raise ConfigError(
                        f"reward function {self.name} returned a dict without a 'reward' key: {sorted(r)}"
                    )
                out.append({k: float(v) for k, v in r.items()})
            else:
                try:
                    out.append({"reward": float(r)})
                except (TypeError, ValueError):
                    raise ConfigError(
                        f"reward function {self.name} returned {type(r).__name__}, not a number"
                    ) from None
        return out


def load_callable(spec: str) -> Callable:
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"--reward-fn must be 'module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ConfigError(f"--reward-fn {spec}: cannot import {module!r} ({e})") from None
    except AttributeError:
        raise ConfigError(f"--reward-fn {spec}: module {module!r} has no {attr!r}") from None
    if not callable(fn):
        raise ConfigError(f"--reward-fn {spec}: {attr!r} is not callable")
    return fn


class RewardModel:
    """A sequence-classification reward model; scores in batches, on the device it was loaded on."""

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 1024, device=None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .models import default_device

        self.name = path
        try:
            self.tok = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        except (OSError, ValueError) as e:
            raise ConfigError(f"--reward-model {path}: cannot load a sequence-classification model ({e})") from None
        self.model.to(device or default_device())
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.batch_size, self.max_length = batch_size, max_length

    def text(self, prompt, answer: str) -> str:
        if getattr(self.tok, "chat_template", None):
            msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
        return (prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)) + answer

    @torch.no_grad()
    def __call__(self, prompts: list, answers: list[str]) -> list[dict]:
        texts = [self.text(p, a) for p, a in zip(prompts, answers)]
        scores: list[float] = []
        device = next(self.model.parameters()).device
        for i in range(0, len(texts), self.batch_size):
            t = self.tok(
                texts[i : i + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=not getattr(self.tok, "chat_template", None),
            )
            logits = self.model(**{k: v.to(device) for k, v in t.items()}).logits
            scores += logits[:, -1].float().tolist()
        return [{"reward": s} for s in scores]


def make_judge(reward_fn: str | None = None, reward_model: str | None = None) -> Judge | None:
    if reward_fn and reward_model:
        raise ConfigError("give one judge: --reward-fn or --reward-model, not both")
    if reward_fn:
        return RewardFunction(reward_fn)
    if reward_model:
        return RewardModel(reward_model)
    return None


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for fewer than two values)."""
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def wins(a: list[float], b: list[float]) -> list[float]:
    """Per-prompt outcome of a against b: 1 win, 0.5 tie, 0 loss."""
    if len(a) != len(b):
        raise ValueError(f"win rate needs paired scores, got {len(a)} and {len(b)}")
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]


def win_rate(a: list[float], b: list[float]) -> tuple[float, float]:
    return mean_se(wins(a, b))


def _logistic_fit(x: list[float], y: list[float], iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton's method for logit P(y) = w0 + w1 x with fractional targets; (weights, their covariance)."""
    X = torch.tensor([[1.0, v] for v in x], dtype=torch.float64)
    Y = torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(2, dtype=torch.float64)
    ridge = 1e-8 * torch.eye(2, dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(X @ w)
        H = X.T @ (X * (p * (1 - p)).unsqueeze(1)) + ridge
        step = torch.linalg.solve(H, X.T @ (Y - p))
        w = w + step
        if step.abs().max() < 1e-10:
            break
    p = torch.sigmoid(X @ w)
    H = X.T @ (X * (p * (1 - p)).unsqueeze(1)) + ridge
    return w, torch.linalg.inv(H)


def length_controlled_win_rate(
    a: list[float], b: list[float], len_a: list[int], len_b: list[int]
) -> tuple[float, float]:
    """AlpacaEval-2-style win rate of a over b at zero length difference, with its delta-method standard error.

    Falls back to the plain win rate when the lengths never differ or the outcomes are all equal (no slope to
    fit, or a separable fit whose intercept runs off to infinity)."""
    w = wins(a, b)
    d = [float(x - y) for x, y in zip(len_a, len_b)]
    m = sum(d) / len(d)
    sd = math.sqrt(sum((v - m) ** 2 for v in d) / max(1, len(d) - 1))
    if sd == 0 or len(set(w)) < 2:
        return win_rate(a, b)
    x = [math.tanh(v / sd) for v in d]
    coef, cov = _logistic_fit(x, w)
    if not torch.isfinite(coef).all() or coef.abs().max() > 30:
        return win_rate(a, b)
    s = float(torch.sigmoid(coef[0]))
    return s, s * (1 - s) * math.sqrt(float(cov[0, 0]))


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Share of distinct word n-grams among all n-grams of the answers (pooled): falls when answers repeat."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
