"""Loading causal LMs, finding decoder layers, capturing hidden states by hook, and response log-probs."""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from .errors import ConfigError

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = "auto"):
    """A causal LM from a folder or hub id, on the GPU when there is one (``device="auto"``)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ConfigError(f"cannot load a causal LM from '{path}': {e}") from None
    if device == "auto":
        device = default_device()
    return model.to(device) if device is not None else model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    from .data import prepare_tokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ConfigError(f"cannot load a tokenizer from '{path}': {e}") from None
    return prepare_tokenizer(tok)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of decoder blocks for the common HF layouts (Llama/Gemma/Mistral/Qwen, GPT-2/NeoX), PEFT-wrapped too."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "layers"):
        obj = m
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}")


def hidden_size(model) -> int:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))


def check_layer(model, layer: int) -> int:
    n = len(decoder_layers(model))
    if not -n <= layer < n:
        raise ConfigError(f"layer {layer} is out of range: the model has {n} decoder layers (0..{n - 1})")
    return layer % n


@contextlib.contextmanager
def capture_layer(model, layer: int, stop: bool = False):
    """Capture the residual-stream output of decoder ``layer`` in ``box['h']`` via a forward hook.

    With ``stop=True`` the forward pass is cut short after that layer (an exception caught here), which
    saves the rest of the model's compute when only the activations are wanted.
    """
    layer = check_layer(model, layer)
    box: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        box["h"] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield box
    except _StopForward:
        pass
    finally:
        handle.remove()


class _StopForward(Exception):
    pass


def run_to_layer(model, layer: int, **inputs) -> torch.Tensor:
    """Residual stream after decoder ``layer``, without computing the layers above it."""
    with capture_layer(model, layer, stop=True) as box:
        model(**inputs, use_cache=False)
    return box["h"]


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_t | <t) for t >= 1: shape [N, T-1], computed in float32."""
    logits = logits[:, :-1].float()
    return torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:, None]).squeeze(2)


def response_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-prob and response length per row (prompt and padding masked)."""
    mask = response_mask[:, 1:].to(torch.float32)
    lp = token_logps(logits, input_ids)
    return (lp * mask).sum(-1), mask.sum(-1)


def sequential_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """TDPO's K(y) = sum over response positions of KL(p_ref || p_theta) of the next-token distributions."""
    mask = response_mask[:, 1:].to(torch.float32)
    lp = F.log_softmax(policy_logits[:, :-1].float(), -1)
    lr = F.log_softmax(ref_logits[:, :-1].float(), -1)
    kl = (lr.exp() * (lr - lp)).sum(-1)
    return (kl * mask).sum(-1)


def pool_response(acts: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean over response-token positions (divides by the number of response tokens, not the padded length).

    ``acts`` is [N, T, d] aligned with ``response_mask`` [N, T].
    """
    m = response_mask.to(acts.dtype).unsqueeze(-1)
    return (acts * m).sum(1) / m.sum(1).clamp(min=1)
