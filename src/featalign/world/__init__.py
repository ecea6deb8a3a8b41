"""The built-in world: a synthetic preference task with a ground-truth reward, its tokenizer and a tiny LM."""

from .build import WorldConfig, build_world, world_paths
from .lang import reward, reward_parts

__all__ = ["WorldConfig", "build_world", "world_paths", "reward", "reward_parts"]
