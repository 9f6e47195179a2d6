"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .async_engine import RequestGroup
from .errors import APIError
from .outputs import CompletionOutput
from .protocol import DEFAULT_CHAT_MAX_TOKENS, ChatCompletionRequest, ChatMessage
from .serving_base import ServingBase, StreamUsage, clamp, collect, sse, top_entries, usage


def render_chat(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                         add_generation_prompt=add_generation_prompt)


class OpenAIServingChat(ServingBase):
    id_prefix = "chatcmpl"

    async def create(self, request: ChatCompletionRequest, raw: Request) -> Response:
        self.check_request(request.model, request.stream, request.stream_options)
        request.check_fields()
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", "top_logprobs", "invalid_value")
        max_tokens = request.max_completion_tokens or request.max_tokens or DEFAULT_CHAT_MAX_TOKENS
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = request.sampling_params(max_tokens, logprobs)
        text = render_chat(self.tokenizer, request.messages, request.add_generation_prompt is not False)
        ids = await self.text.encode(text, request.add_special_tokens is not False, "messages")
        group = self.submit([(ids, text)], params, raw, request.cache_salt)
        meta = self.response_meta("chat.completion")
        if request.stream:
            return self.stream_response(self._stream(request, len(ids), params.n, group, meta), group)
        (final,) = await self.unless_disconnected(raw, collect(group, 1), group)
        choices = [{"index": out.index, "message": {"role": "assistant", "content": out.text},
                    "logprobs": self._logprobs(out) if request.logprobs else None,
                    "finish_reason": out.finish_reason, "stop_reason": out.stop_reason} for out in final.outputs]
        return JSONResponse({**meta, "choices": choices,
                             "usage": usage(len(ids), final.num_generated_tokens, final.num_cached_tokens)})

    def _logprobs(self, out: CompletionOutput) -> dict[str, Any]:
        def item(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": clamp(logprob), "bytes": list(token.encode())}

        content = []
        for token_id, entry in zip(out.token_ids, out.logprobs or [], strict=False):
            top = [item(t, lp) for t, lp in top_entries(entry, self.token_str)]
            content.append({**item(self.token_str(token_id), entry.logprob), "top_logprobs": top})
        return {"content": content}

    async def _stream(self, request: ChatCompletionRequest, prompt_tokens: int, n: int, group: RequestGroup,
                      meta: dict[str, Any]) -> AsyncIterator[str]:
        chunk = {**meta, "object": "chat.completion.chunk"}
        counts = StreamUsage(request.stream_options, prompt_tokens)
        for index in range(n):  # the role comes first, in a chunk of its own (as OpenAI and vLLM send it)
            yield sse(counts.stamp({**chunk, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}]}))
        async for _, out in group:
            counts.count(out)
            for delta in out.outputs:
                logprobs = self._logprobs(delta) if request.logprobs and delta.token_ids else None
                if not (delta.text or delta.finish_reason or logprobs):
                    continue
                choice = {"index": delta.index, "delta": {"content": delta.text} if delta.text else {},
                          "logprobs": logprobs, "finish_reason": delta.finish_reason}
                if delta.finish_reason:
                    choice["stop_reason"] = delta.stop_reason
                yield sse(counts.stamp({**chunk, "choices": [choice]}))
        if last := counts.last_event(chunk):
            yield last
