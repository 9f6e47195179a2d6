"""Tool calls, as vLLM serves them: ``tool_choice`` "required" or a named function constrain the output with a
grammar (server/structured.py) so that it always parses; "auto" lets the model choose, and a tool-call parser
(``--tool-call-parser``) finds the calls in its text.

The shipped chat format (docs/serving.md#tool-calls): the tools are one ``tools:`` turn holding the JSON list of
function definitions; an assistant turn that calls tools is exactly a JSON array of
``{"name": ..., "arguments": {...}}`` objects; a tool's answer is a ``tool:`` turn. The parser ``miras_json``
reads that array back; a named ``tool_choice`` makes the whole output that function's arguments object.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import APIError
from .protocol import ChatCompletionRequest, ChatMessage, FunctionCall, NamedToolChoice, ToolCallOut, ToolDefinition
from .sampling_params import GuidedDecoding

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolMode:
    """How a chat request's output becomes tool calls: ``choice`` is "required", "auto" or "named" (then
    ``name`` is the function's); ``guided`` constrains the output (None for "auto")."""

    choice: str
    name: str | None
    guided: GuidedDecoding | None
    tools: tuple[str, ...]


def tool_mode(request: ChatCompletionRequest, auto_parser: str | None) -> ToolMode | None:
    """The request's tool mode (None: plain text), or a 400 naming the field that makes it impossible.
    ``auto_parser``: the server's --tool-call-parser when --enable-auto-tool-choice is on."""
    tools, choice = request.tools or [], request.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", "tool_choice", "invalid_value")
        return None
    choice = choice or "auto"  # OpenAI's default when tools are given
    if choice == "none":
        return None
    names = tuple(t.function.name for t in tools)
    if choice == "auto":
        if auto_parser is None:
            raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
                           "set on the server", "tool_choice", "invalid_value")
        return ToolMode("auto", None, None, names)
    if isinstance(choice, NamedToolChoice):
        tool = next((t for t in tools if t.function.name == choice.function.name), None)
        if tool is None:
            raise APIError(400, f"tool_choice names function {choice.function.name!r}, which is not in tools",
                           "tool_choice", "invalid_value")
        return ToolMode("named", tool.function.name, _guide(_parameters(tool)), names)
    calls = {"type": "array", "minItems": 1, "items": {"anyOf": [_call_schema(t) for t in tools]}}
    if request.parallel_tool_calls is False:
        calls["maxItems"] = 1
    return ToolMode("required", None, _guide(calls), names)


def _parameters(tool: ToolDefinition) -> dict[str, Any]:
    return tool.function.parameters or ANY_OBJECT


def _call_schema(tool: ToolDefinition) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": _parameters(tool)},
            "required": ["name", "arguments"], "additionalProperties": False}


def _guide(schema: dict[str, Any]) -> GuidedDecoding:
    return GuidedDecoding("json", json.dumps(schema), "tools")


def parse_tool_calls(text: str, mode: ToolMode) -> list[ToolCallOut] | None:
    """The OpenAI ``tool_calls`` in a finished output, or None when it holds none (plain content)."""
    if mode.choice == "named":
        try:
            json.loads(text)
        except ValueError:
            return None  # cut short (max_tokens): what was generated goes back as content
        return [_tool_call(mode.name, text)]
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    if not isinstance(calls, list) or not calls or not all(
            isinstance(c, dict) and c.get("name") in mode.tools and isinstance(c.get("arguments"), dict)
            for c in calls):
        return None
    return [_tool_call(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]


def _tool_call(name: str, arguments: str) -> ToolCallOut:
    return ToolCallOut(id=f"call_{uuid.uuid4().hex[:24]}", type="function",
                       function=FunctionCall(name=name, arguments=arguments))


def chat_turns(messages: list[ChatMessage], tools: list[ToolDefinition] | None) -> list[dict[str, str]]:
    """Messages (and tools) as the role/content turns the chat template renders."""
    turns = []
    if tools:
        functions = [t.function.model_dump(exclude_none=True) for t in tools]
        turns.append({"role": "tools", "content": json.dumps(functions, ensure_ascii=False)})
    for m in messages:
        content = m.text()
        if m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)} for c in m.tool_calls]
            content += json.dumps(calls, ensure_ascii=False)
        turns.append({"role": m.role, "content": content})
    return turns


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise APIError(400, "messages: a tool call's function.arguments must be JSON text", "messages",
                       "invalid_value") from None
