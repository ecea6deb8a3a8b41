"""The built-in world's ground-truth reward as a judge: ``--reward-fn featalign.world.judge:reward``."""

from __future__ import annotations

from . import lang


def reward(prompt: str, response: str) -> dict[str, float]:
    """The reward and its parts (topic, sentiment, length); a prompt that is no world prompt is an error."""
    if not isinstance(prompt, str) or lang.prompt_topic(prompt) is None:
        from ..errors import ConfigError

        raise ConfigError(f"the world's reward needs world prompts; got {str(prompt)[:60]!r}")
    return {"reward": lang.reward(prompt, response), **lang.reward_parts(prompt, response)}


def is_world_prompt(prompt) -> bool:
    return isinstance(prompt, str) and lang.prompt_topic(prompt) is not None
