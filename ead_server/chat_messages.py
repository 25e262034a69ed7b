"""What a chat message must hold, checked the same way on every route that takes one.

vLLM accepts any role (custom roles exist for chat templates that know them, e.g.
``ipython``) and a message without ``content``: the template then renders a prompt the
caller never wrote, and a trainer learns from rollouts of a prompt it did not send. So
``/v1/chat/completions`` and ``/v1/rollouts`` both refuse, as OpenAI's API does, a message
that is not an object, lacks a string ``role``, or has no ``content`` (a string or a list
of content parts); an assistant message may carry ``tool_calls`` (or the older
``function_call``) instead, and the deprecated ``function`` role may have null content,
as OpenAI's schema has it. Custom roles stay allowed. Refusals are 400s naming the
field the way OpenAI does: ``messages[0].content``.
"""

from __future__ import annotations

from typing import Any

from ead_server.errors import APIError

__all__ = ["check_conversation"]


def check_conversation(messages: Any, param: str = "messages") -> None:
    """Raise a 400 :class:`APIError` naming the field (``param[i].role`` ...) unless
    ``messages`` is a list of well-formed chat messages. An empty list is left to the
    route (vLLM answers it with its own 400)."""
    if not isinstance(messages, list):
        raise APIError(400, f"{param} must be a list of messages", param)
    for i, message in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise APIError(400, f"{where}.role must be a non-empty string, got {role!r}"[:300], f"{where}.role")
        content = message.get("content")
        if content is None:
            if role == "function" or (role == "assistant" and (message.get("tool_calls")
                                                               or message.get("function_call"))):
                continue  # as OpenAI's schema allows
            raise APIError(400, f"{where} (role {role!r}) has no content"[:300], f"{where}.content")
        if isinstance(content, list):
            if not all(isinstance(part, dict) for part in content):
                raise APIError(400, f"{where}.content must be a string or a list of content-part objects",
                               f"{where}.content")
        elif not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string or a list of content-part objects, got "
                                f"{type(content).__name__}", f"{where}.content")
