"""POST /v1/chat/completions: messages (and tools) rendered with the tokenizer's chat template; outputs as text
or as tool calls (server/tool_calls.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from .engine_client import RequestGroup
from .errors import APIError, json_response
from .outputs import CompletionOutput
from .protocol import (
    DEFAULT_CHAT_MAX_TOKENS,
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
    DeltaToolCall,
    ToolDefinition,
    usage_info,
)
from .serving_base import ServingBase, StreamUsage, SurpriseStream, TextChunks, clamp, collect, sse, top_entries
from .tool_calls import ToolMode, chat_turns, parse_tool_calls, tool_mode


def render_chat(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool,
                tools: list[ToolDefinition] | None = None) -> str:
    return tokenizer.apply_chat_template(chat_turns(messages, tools), add_generation_prompt=add_generation_prompt)


def tool_message(out_text: str, finish_reason: str | None, mode: ToolMode | None
                 ) -> tuple[AssistantMessage, str | None]:
    """A finished choice's message and finish reason: its tool calls when it made some, else its text."""
    calls = parse_tool_calls(out_text, mode) if mode is not None and finish_reason == "stop" else None
    if calls is None:
        return AssistantMessage(role="assistant", content=out_text), finish_reason
    return AssistantMessage(role="assistant", content=None, tool_calls=calls), \
        "stop" if mode.choice == "named" else "tool_calls"


def text_delta(text: str) -> DeltaMessage:
    """A streamed choice's new text (no content field at all when there is none)."""
    return DeltaMessage(content=text) if text else DeltaMessage()


class OpenAIServingChat(ServingBase):
    id_prefix = "chatcmpl"

    def __init__(self, *args: Any, tool_call_parser: str | None = None, **kwargs: Any):
        """``tool_call_parser``: the parser of "auto" tool choice (--enable-auto-tool-choice); None: refused."""
        super().__init__(*args, **kwargs)
        self.tool_call_parser = tool_call_parser

    async def create(self, request: ChatCompletionRequest, raw: Request) -> Response:
        self.check_request(request.model, request.stream, request.stream_options)
        request.check_fields()
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", "top_logprobs", "invalid_value")
        max_tokens = request.max_completion_tokens or request.max_tokens or DEFAULT_CHAT_MAX_TOKENS
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = request.sampling_params(max_tokens, logprobs)
        mode = tool_mode(request, self.tool_call_parser)
        if mode is not None and mode.guided is not None:
            if params.guided is not None:
                raise APIError(400, f"{params.guided.field} cannot be combined with tool_choice {mode.choice!r}",
                               params.guided.field, "invalid_value")
            params = replace(params, guided=mode.guided)
        text = render_chat(self.tokenizer, request.messages, request.add_generation_prompt is not False,
                           request.tools)
        ids = await self.text.encode(text, request.add_special_tokens is not False, "messages")
        group = self.submit([(ids, text)], params, raw, request.cache_salt)
        meta = self.response_meta("chat.completion")
        if request.stream:
            return self.stream_response(self._stream(request, len(ids), params.n, group, meta, mode), group)
        (final,) = await self.unless_disconnected(raw, collect(group, 1), group)
        choices = []
        for out in final.outputs:
            message, finish_reason = tool_message(out.text, out.finish_reason, mode)
            choice = ChatChoice(index=out.index, message=message,
                                logprobs=self._logprobs(out) if request.logprobs else None,
                                finish_reason=finish_reason, stop_reason=out.stop_reason)
            if request.return_surprise:
                choice.surprise = self.surprise(final.prompt_surprise, out)
            choices.append(choice)
        return json_response(ChatCompletionResponse(
            **meta, choices=choices, usage=usage_info(len(ids), final.num_generated_tokens, final.num_cached_tokens)))

    def _logprobs(self, out: CompletionOutput) -> ChatLogprobs:
        def item(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": clamp(logprob), "bytes": list(token.encode())}

        content = []  # plain entries, validated once by ChatLogprobs (a model per entry costs twice the time)
        for token_id, entry in zip(out.token_ids, out.logprobs or [], strict=False):
            top = [item(t, lp) for t, lp in top_entries(entry, self.token_str)]
            content.append({**item(self.token_str(token_id), entry.logprob), "top_logprobs": top})
        return ChatLogprobs(content=content)

    @staticmethod
    def _held_delta(held: dict[int, str], delta: CompletionOutput, mode: ToolMode) -> tuple[DeltaMessage, str | None]:
        """A streamed delta of a request with tools: nothing until the choice finishes, then its tool calls
        (each whole, with its index) or its text."""
        held[delta.index] = held.get(delta.index, "") + delta.text
        if not delta.finish_reason:
            return DeltaMessage(), None
        message, finish_reason = tool_message(held.pop(delta.index), delta.finish_reason, mode)
        if message.tool_calls is not None:
            calls = [DeltaToolCall(index=i, id=c.id, type=c.type, function=c.function)
                     for i, c in enumerate(message.tool_calls)]
            return DeltaMessage(tool_calls=calls), finish_reason
        return text_delta(message.content), finish_reason

    async def _stream(self, request: ChatCompletionRequest, prompt_tokens: int, n: int, group: RequestGroup,
                      meta: dict[str, Any], mode: ToolMode | None) -> AsyncIterator[str]:
        """With tools, a choice's text is held back until it finishes, then sent as tool calls (one delta
        each, whole) or, if it made none, as content."""
        meta = {**meta, "object": "chat.completion.chunk"}
        held: dict[int, str] = {}
        counts = StreamUsage(request.stream_options, prompt_tokens)
        for index in range(n):  # the role comes first, in a chunk of its own (as OpenAI and vLLM send it)
            role = ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""), logprobs=None,
                                    finish_reason=None)
            yield sse(counts.stamp(ChatCompletionChunk(**meta, choices=[role])))
        surprise = SurpriseStream(self.surprise_layers) if request.return_surprise else None
        # plain text deltas (most tokens) skip the chunk models: the same bytes from a template
        plain = TextChunks(ChatCompletionChunk, meta) if mode is None and not request.logprobs \
            and surprise is None and not counts.continuous else None
        async for _, out in group:
            counts.count(out)
            for delta in out.outputs:
                if plain is not None:
                    if delta.text or delta.finish_reason:
                        yield plain.chat(delta.index, delta.text, delta.finish_reason, delta.stop_reason)
                    continue
                logprobs = self._logprobs(delta) if request.logprobs and delta.token_ids else None
                if surprise is not None:
                    surprise.add(delta.index, out.prompt_surprise, delta)
                if mode is not None:
                    body, finish_reason = self._held_delta(held, delta, mode)
                else:
                    body, finish_reason = text_delta(delta.text), delta.finish_reason
                if not (body.model_fields_set or finish_reason or logprobs):
                    continue
                choice = ChatStreamChoice(index=delta.index, delta=body, logprobs=logprobs, finish_reason=finish_reason)
                if surprise is not None:
                    choice.surprise = surprise.take(delta.index)
                if delta.finish_reason:
                    choice.stop_reason = delta.stop_reason
                yield sse(counts.stamp(ChatCompletionChunk(**meta, choices=[choice])))
        if last := counts.last_event(ChatCompletionChunk, meta):
            yield last
