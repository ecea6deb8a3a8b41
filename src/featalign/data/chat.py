"""Turning prompts and answers into token ids: through the tokenizer's chat template when it has one, raw text when not.

With a template, the prompt is the conversation rendered with the generation prompt (``add_generation_prompt``) and
an answer is its content followed by the template's end-of-turn marker (ChatML's ``<|im_end|>``, Gemma's
``<end_of_turn>``, Llama-3's ``<|eot_id|>``), read off the template itself. Generation stops at that marker, so the
answer ends there: the newline some templates print after it (TRL keeps it in the answer) separates turns and is
never generated. Without a template, the prompt is tokenised as text (with the tokenizer's special tokens, e.g. BOS)
and an answer is its text followed by the eos token.
"""

from __future__ import annotations

from ..errors import ConfigError

_SENTINEL = "\u2063featalign-answer\u2063"


def prepare_tokenizer(tokenizer):
    """Give a tokenizer without a pad token the eos token as pad (what TRL does), or fail clearly."""
    import logging

    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                "the tokenizer has neither a pad token nor an eos token; set one (tokenizer.pad_token = ...)"
            )
        logging.getLogger("featalign.data").warning(
            "tokenizer has no pad token; using eos token %r for padding", tokenizer.eos_token
        )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class Renderer:
    """Prompt and answer token ids for one tokenizer (the template's end-of-turn marker is found once)."""

    def __init__(self, tokenizer, chat_template: bool | None = None):
        self.tok = tokenizer
        self.template = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
        self.end_of_turn = self._end_of_turn() if self.template else None

    @property
    def name(self) -> str:
        return (
            f"chat template (answers end with {self.end_of_turn!r})" if self.template else "raw text (no chat template)"
        )

    def _end_of_turn(self) -> str:
        msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
        try:
            text = self.tok.apply_chat_template(msgs, tokenize=False)
        except Exception as e:  # a template that refuses this minimal conversation is unusable
            raise ConfigError(f"the tokenizer's chat template cannot render a user/assistant exchange: {e}") from None
        at = text.find(_SENTINEL)
        suffix = text[at + len(_SENTINEL) :].rstrip() if at >= 0 else ""
        return suffix or (self.tok.eos_token or "")

    def render(self, messages: list[dict], **kw) -> str:
        """The chat template applied; a template that refuses the conversation (a role it does not take, say) is a
        one-line error naming the roles."""
        from jinja2 import TemplateError

        try:
            return self.tok.apply_chat_template(messages, tokenize=False, **kw)
        except TemplateError as e:
            roles = "/".join(m.get("role", "?") for m in messages)
            raise ConfigError(f"the tokenizer's chat template refuses a conversation of roles {roles}: {e}") from None

    def prompt_text(self, prompt: str | list[dict], raw_prompt: str | None = None) -> str:
        if self.template:
            msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.render(msgs, add_generation_prompt=True)
        if raw_prompt is not None:
            return raw_prompt
        if isinstance(prompt, list):
            return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        return prompt

    def prompt_ids(self, prompt: str | list[dict], raw_prompt: str | None = None) -> list[int]:
        text = self.prompt_text(prompt, raw_prompt)
        return self.tok(text, add_special_tokens=not self.template)["input_ids"]

    def answer_ids(self, answer: str, raw: bool = False) -> tuple[list[int], int]:
        """(ids, number of content tokens). ``raw``: the answer is the raw continuation of an HH dialogue, whose
        leading separator belongs to the raw format, not to the answer."""
        if self.template:
            content = answer.strip() if raw else answer
            n = len(self.tok(content, add_special_tokens=False)["input_ids"])
            return self.tok(content + self.end_of_turn, add_special_tokens=False)["input_ids"], n
        ids = self.tok(answer, add_special_tokens=False)["input_ids"]
        return ids + ([self.tok.eos_token_id] if self.tok.eos_token_id is not None else []), len(ids)

    def conversation_ids(self, messages: list[dict]) -> list[int]:
        """A whole conversation (SAE training documents)."""
        if self.template:
            return self.tok(self.render(messages), add_special_tokens=False)["input_ids"]
        return self.tok("\n".join(f"{m['role']}: {m['content']}" for m in messages))["input_ids"]


_RENDERERS: dict = {}


def renderer(tokenizer) -> Renderer:
    """The Renderer of a tokenizer, made once (finding the end-of-turn marker renders the template)."""
    key = (id(tokenizer), getattr(tokenizer, "chat_template", None), tokenizer.eos_token)
    if key not in _RENDERERS:
        if len(_RENDERERS) > 8:
            _RENDERERS.clear()
        _RENDERERS[key] = Renderer(tokenizer)
    return _RENDERERS[key]


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    return renderer(tokenizer).prompt_ids(prompt)


def encode_response(tokenizer, response: str) -> list[int]:
    return renderer(tokenizer).answer_ids(response)[0]
