"""Chat templates: render ``messages`` to text the way transformers' ``apply_chat_template`` does,
and find where the prompt of a conversation ends (for ``--mask-prompt``).

transformers renders a tokenizer's Jinja template in a sandboxed jinja2 environment with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``raise_exception``
helper, a ``tojson`` filter that keeps non-ASCII text, a ``strftime_now`` helper and the special
tokens (``bos_token``, ``eos_token``, ...) as variables; ``add_generation_prompt`` appends the
header of an assistant turn. The same environment is built here, so a model's own template gives
the text its authors trained on.

Prompt masking of a conversation: the prompt is everything up to the last assistant turn's
content, which is what the template renders for ``messages[:-1]`` with the generation prompt. The
full conversation's text must start with that text (true of ChatML, Llama 3 and Qwen templates);
a template that rewrites earlier turns depending on later ones cannot be masked this way and is
refused with the row that shows it.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

__all__ = ["ChatTemplateError", "render", "prompt_and_full"]


class ChatTemplateError(ValueError):
    """The template failed to render, or cannot be split into prompt and completion."""


def _generation_extension():
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it for
    its assistant-token mask): rendered as its body."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return Generation


@lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _generation_extension()])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not parse: {exc}") from exc


def special_tokens(settings: Mapping[str, Any]) -> dict[str, str | None]:
    """``bos_token``, ``eos_token``, ... as strings (tokenizer_config may store them as dicts)."""
    out = {}
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = settings.get(k)
        out[k] = v.get("content") if isinstance(v, dict) else v
    return out


def render(template: str, messages: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
           add_generation_prompt: bool = False) -> str:
    """The text of ``messages`` under ``template`` (``settings``: the tokenizer_config)."""
    from jinja2.exceptions import TemplateError

    try:
        return _compiled(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                          **special_tokens(settings))
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template refused the messages: {exc}") from exc


def prompt_and_full(template: str, messages: Sequence[Mapping[str, Any]],
                    settings: Mapping[str, Any]) -> tuple[str, str]:
    """``(prompt_text, full_text)``: the conversation without its last turn plus the generation
    prompt, and the whole conversation; ``full_text`` starts with ``prompt_text``. The last
    message must be the assistant's."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ChatTemplateError("the last message must have role 'assistant' (the turn that is trained)")
    full = render(template, messages, settings, add_generation_prompt=False)
    prompt = render(template, messages[:-1], settings, add_generation_prompt=True)
    if not full.startswith(prompt):
        raise ChatTemplateError("the chat template does not render the conversation as its earlier turns plus the "
                                "generation prompt followed by the last turn, so the prompt cannot be masked; "
                                "drop --mask-prompt or use {\"prompt\", \"completion\"} rows")
    return prompt, full
