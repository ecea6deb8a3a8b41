"""Tiny transformers models built from a seed: a real architecture with weights that do not depend on the CPU."""

import torch


def tiny_lm(
    kind: str = "llama",
    vocab: int = 300,
    hidden: int = 32,
    intermediate: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    task: str = "causal",
    **kw,
):
    """A Llama (``kind="llama"``) or Gemma-2 (``"gemma2"``) of the given shape; ``task="classify"`` gives a
    sequence classifier. Extra keyword arguments go to the model's config."""
    import transformers as tf

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        **kw,
    )
    torch.manual_seed(seed)
    if kind == "gemma2":
        cfg = tf.Gemma2Config(head_dim=hidden // heads, **common)
        return (tf.Gemma2ForSequenceClassification if task == "classify" else tf.Gemma2ForCausalLM)(cfg)
    cfg = tf.LlamaConfig(**common)
    return (tf.LlamaForSequenceClassification if task == "classify" else tf.LlamaForCausalLM)(cfg)
