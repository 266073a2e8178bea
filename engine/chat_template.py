"""Chat templates: Jinja2 templates from tokenizer_config.json, rendered as transformers renders them.

The environment matches transformers' `apply_chat_template`: a sandbox that cannot mutate its
inputs, `trim_blocks` and `lstrip_blocks`, loop controls, a `{% generation %}` block (rendered
as its body), the `raise_exception` and `strftime_now` globals, and a `tojson` filter that keeps
non-ASCII text as is. Messages are checked first so a malformed request gets an error that names
the field to fix instead of a Jinja traceback.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import CheckpointError, InvalidRequestError

ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own filter escapes <, >, & and ' for HTML; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template. `render` takes checked messages and the template's variables."""

    def __init__(self, source: str, origin: str = "chat template"):
        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise CheckpointError(f"{origin}: the chat template does not parse (line {exc.lineno}: {exc.message})") from exc

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, **variables: Any) -> str:
        """Render `messages` (checked by `check_messages`) with `variables` (bos_token, tools, ...)."""
        plain = check_messages(messages)
        variables = {k: _plain(v, k) for k, v in variables.items()}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        try:
            return self._template.render(messages=plain, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as exc:
            # raise_exception() in templates reports conversation-shape problems (roles out of order, ...).
            raise InvalidRequestError(f"the model's chat template rejected the messages: {exc}", param="messages") from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise InvalidRequestError(f"the model's chat template cannot render these messages: {exc}", param="messages") from exc


def check_messages(messages: Any) -> list[dict]:
    """Validate chat messages and return plain copies (keys whose value is None dropped, as transformers does).

    Each message needs a `role` from ROLES and a `content` that is a string or a list of text
    parts (joined with newlines); an assistant message with `tool_calls` may omit `content`.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    return [_check_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def _check_message(message: Any, where: str) -> dict:
    if not isinstance(message, Mapping):
        raise InvalidRequestError(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}", param=where)
    msg = {k: v for k, v in message.items() if v is not None}
    role = msg.get("role")
    if role is None:
        raise InvalidRequestError(f"{where} has no 'role'", param=f"{where}.role")
    if not isinstance(role, str) or role not in ROLES:
        raise InvalidRequestError(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", param=f"{where}.role")
    if "content" not in msg:
        if not (role == "assistant" and msg.get("tool_calls")):
            raise InvalidRequestError(f"{where} ({role}) has no 'content'", param=f"{where}.content")
    else:
        msg["content"] = _content_text(msg["content"], f"{where}.content")
    return _plain(msg, where)


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    f"{where}[{j}] must be a text part {{'type': 'text', 'text': ...}}; only text content is supported",
                    param=f"{where}[{j}]",
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidRequestError(f"{where} must be a string or a list of text parts, got {type(content).__name__}", param=where)


def _plain(value: Any, where: str) -> Any:
    # Templates only ever see JSON-shaped data: no objects whose methods the sandbox would expose.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise InvalidRequestError(f"{where} holds a {type(value).__name__}, which a chat template cannot render", param=where)
