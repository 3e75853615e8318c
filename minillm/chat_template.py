"""Rendering a model's Jinja chat template, exactly as transformers' `apply_chat_template` does.

A chat template turns a list of messages [{"role": ..., "content": ...}, ...] into the one string
the model was trained on, e.g. ChatML:

    <|im_start|>system\\nYou are helpful.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n

Templates ship with models from the hub and are untrusted code, so they run in Jinja's immutable
sandbox. The environment matches transformers' (trim_blocks, lstrip_blocks, loop controls, a JSON
`tojson`, and the globals raise_exception, strftime_now, dict, namespace); the variables are the
messages, add_generation_prompt, tools, documents and the special-token strings (bos_token, ...).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import MinillmError


class _TemplateError(Exception):
    """raise_exception() inside a template: the template's own message for a malformed chat."""


def _raise_exception(message):
    raise _TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's built-in tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() without underscore attributes (no reaching into Python internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 - same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set attribute {name!r}")


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=dict,
                       namespace=_Namespace)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise MinillmError(f"the chat template is not valid Jinja (line {exc.lineno}): {exc.message}") from exc


def render_chat_template(template: str, messages, add_generation_prompt: bool = True, tools=None,
                         documents=None, **variables) -> str:
    """The prompt text for `messages` (a list of {"role", "content", ...} dicts)."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise MinillmError("messages must be a list of {'role': ..., 'content': ...} dicts")
    # As transformers: keys whose value is None are dropped (templates test for presence).
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools, documents=documents, **variables)
    except _TemplateError as exc:
        raise MinillmError(f"the chat template rejected this conversation: {exc}") from exc
    except jinja2.TemplateError as exc:
        raise MinillmError(f"the chat template failed: {exc}") from exc
