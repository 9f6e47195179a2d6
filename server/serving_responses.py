"""POST/GET/DELETE /v1/responses: OpenAI's Responses API on saved recurrent states.

With ``previous_response_id`` the client sends only what is new. A recurrent model's whole conversation
is one fixed-size state, so the server restores the state saved at that response and prefills only the
continuation: the previous reply as the chat template renders it (the template re-renders a reply, which
need not give the tokens that were generated; where it does, the state after the reply is restored and
only the new input prefilled) and the new input, rendered through the template. The prompt is therefore
exactly the one a chat completion with the whole history would prefill, so the outputs are the same (a
continuation is split from the history's text after the generation prompt, where the template puts a
space, so tokenizing the two parts apart gives the tokens of the whole). Nothing on this path depends on
the length of the history: a turn costs the same after 10 or 10,000 turns. A saved state that is gone is
rebuilt from the stored token ids (slower, never wrong).

``instructions`` are a system message before the input. A recurrent state cannot forget, so with
``previous_response_id`` the new instructions join the conversation where they are given and the
earlier ones stay in it (OpenAI drops them).
"""

from __future__ import annotations

import time
import uuid
from array import array
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from .engine_client import EngineUnavailableError, RequestGroup
from .errors import APIError, json_response
from .outputs import RequestOutput
from .protocol import DEFAULT_CHAT_MAX_TOKENS
from .protocol_responses import (
    IncompleteDetails,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    ResponseDeleted,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseStreamEvent,
    ResponseUsage,
)
from .request import StateContext
from .response_store import ResponseStore, Segment, StoredResponse
from .sampling_params import ParamError, SamplingParams
from .serving_base import ServingBase, collect, sse, with_pings
from .state_cache import state_key
from .tenancy import request_namespace, tenant_of


def continuation_text(tokenizer: Any, reply: str, messages: list[dict[str, str]]) -> str:
    """What follows a prompt that ended with the generation prompt: the reply and the new messages as the
    chat template renders them, and the generation prompt again."""
    text = tokenizer.apply_chat_template([{"role": "assistant", "content": reply}, *messages],
                                         add_generation_prompt=True)
    # a template whose assistant turn does not begin with its generation prompt continues after it anyway
    return text.removeprefix(tokenizer.generation_prompt)


class Turn:
    """One request's prompt: its token ids, the saved state it continues, and the keys its states get."""

    def __init__(self, conversation: Segment, length: int, namespace: str, context: StateContext | None,
                 prompt: list[int]):
        self.conversation = conversation  # its last segment: the turn's own tokens (the chat-rendered input)
        self.length = length  # tokens of the conversation up to the end of this prompt
        self.namespace = namespace
        self.context = context  # the saved state the engine restores (None: a conversation's first turn)
        self.prompt = prompt  # what the engine prefills after it

    def key(self, token_ids: list[int]) -> bytes:
        """The state-cache key the engine saves the state after ``self.prompt + generated`` under."""
        return state_key(self.context.key if self.context is not None else None, self.namespace, token_ids)


class OpenAIServingResponses(ServingBase):
    id_prefix = "resp"

    def __init__(self, *args: Any, store: ResponseStore, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.store = store

    # ---- routes ---------------------------------------------------------------------------------------

    async def create(self, request: ResponsesRequest, raw: Request) -> Response:
        request.check_fields()
        self.check_request(request.model, request.stream, None)
        tenant = tenant_of(raw)
        namespace = request_namespace(raw, request.cache_salt)
        previous = None
        if request.previous_response_id is not None:
            previous = self._stored(tenant, request.previous_response_id, "previous_response_id")
            if previous.namespace != namespace:
                raise APIError(400, "cache_salt must be the one the previous response was made with",
                               "cache_salt", "invalid_value")
        turn = await self._turn(request.messages(), previous, namespace)
        chosen = {"temperature": request.temperature, "top_p": request.top_p}  # null: SamplingParams' default
        params = SamplingParams(**{k: v for k, v in chosen.items() if v is not None},
                                max_tokens=request.max_output_tokens or DEFAULT_CHAT_MAX_TOKENS)
        try:
            group = self.submit([(turn.prompt, None)], params, raw, request.cache_salt, context=turn.context)
        except ParamError as exc:  # the engine's limits name the prompt; here it is the input
            raise APIError(400, str(exc), "input" if exc.param == "prompt" else exc.param, "invalid_value") from exc
        body = self._body(request, previous, params)
        if request.stream:
            return self._stream_response(self._events(request, turn, tenant, body, group), group)
        (final,) = await self.unless_disconnected(raw, collect(group, 1), group)
        return json_response(self._finish(request, turn, tenant, body, final))

    def retrieve(self, raw: Request, response_id: str) -> Response:
        body = self._stored(tenant_of(raw), response_id, "response_id").body
        return json_response(ResponseObject.model_validate(body))

    def delete(self, raw: Request, response_id: str) -> Response:
        if not self.store.delete(tenant_of(raw), response_id):
            raise _not_found(response_id, "response_id")
        return json_response(ResponseDeleted(id=response_id, object="response.deleted", deleted=True))

    # ---- the prompt -----------------------------------------------------------------------------------

    def _stored(self, tenant: str, response_id: str, param: str) -> StoredResponse:
        stored = self.store.get(tenant, response_id)
        if stored is None:
            raise _not_found(response_id, param)
        return stored

    async def _turn(self, messages: list[dict[str, str]], previous: StoredResponse | None, namespace: str) -> Turn:
        tokenizer = self.tokenizer
        if previous is None:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = await self.text.encode(text, True, "input")
            return Turn(Segment(array("i", ids)), len(ids), namespace, None, ids)
        ids = await self.text.encode(continuation_text(tokenizer, previous.output_text, messages), False, "input")
        conversation = Segment(array("i", ids), previous.segment)
        length = previous.length + len(ids)
        if not self.engine.model_info.saves_states:  # no saved states at all: prefill the whole conversation
            return Turn(conversation, length, namespace, None, conversation.token_ids())
        fed = previous.output_ids[:-1]  # the last generated token was sampled, never fed
        segment = previous.segment
        if fed and len(ids) > len(fed) and ids[:len(fed)] == fed:  # the reply re-renders as it was generated
            context = StateContext(previous.finish_key, previous.length + len(fed),
                                   lambda: segment.token_ids() + fed)
            return Turn(conversation, length, namespace, context, ids[len(fed):])
        context = StateContext(previous.prompt_key, previous.length, segment.token_ids)
        return Turn(conversation, length, namespace, context, ids)

    # ---- the response ---------------------------------------------------------------------------------

    def _body(self, request: ResponsesRequest, previous: StoredResponse | None, params: SamplingParams
              ) -> ResponseObject:
        """The response object as it starts (status in_progress, no output yet)."""
        return ResponseObject(
            id=f"resp_{uuid.uuid4().hex}", object="response", created_at=int(time.time()), status="in_progress",
            error=None, incomplete_details=None, instructions=request.instructions,
            max_output_tokens=request.max_output_tokens, model=self.served_model_name, output=[],
            parallel_tool_calls=False, previous_response_id=previous.id if previous else None, reasoning=None,
            store=request.store is not False, temperature=params.temperature, text={"format": {"type": "text"}},
            tool_choice="none", tools=[], top_p=params.top_p, truncation="disabled", usage=None,
            metadata=request.metadata or {})

    def _finish(self, request: ResponsesRequest, turn: Turn, tenant: str, body: ResponseObject,
                final: RequestOutput) -> ResponseObject:
        """The completed response object; stored (with what a continuation needs) unless ``store`` is false."""
        (out,) = final.outputs
        incomplete = out.finish_reason == "length"
        usage = ResponseUsage(input_tokens=turn.length,
                              input_tokens_details=InputTokensDetails(cached_tokens=final.num_cached_tokens),
                              output_tokens=len(out.token_ids),
                              output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
                              total_tokens=turn.length + len(out.token_ids))
        body = body.model_copy(update={
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            "output": [_message(body.id, out.text, "incomplete" if incomplete else "completed")], "usage": usage})
        if request.store is not False:
            generated = turn.prompt + out.token_ids[:-1]
            self.store.put(StoredResponse(
                body.id, tenant, turn.namespace, body.model_dump(mode="json", exclude_unset=True), turn.conversation,
                turn.length, out.token_ids, out.text, turn.key(turn.prompt), turn.key(generated)))
        return body

    async def _events(self, request: ResponsesRequest, turn: Turn, tenant: str, body: ResponseObject,
                      group: RequestGroup) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The Responses event sequence: each event's type and fields (numbered by the caller)."""
        item = _message(body.id, "", "in_progress")
        yield "response.created", {"response": body}
        yield "response.in_progress", {"response": body}
        yield "response.output_item.added", {"output_index": 0, "item": item.model_copy(update={"content": []})}
        where = {"item_id": item.id, "output_index": 0, "content_index": 0}
        yield "response.content_part.added", {**where, "part": _text_part("")}
        final = RequestOutput("", [], [])
        try:
            async for _, delta in group:
                final.merge(delta)
                for out in delta.outputs:
                    if out.text:
                        yield "response.output_text.delta", {**where, "delta": out.text, "logprobs": []}
        except Exception as exc:  # noqa: BLE001 - the 200 is already sent: report in band, as OpenAI does
            code, message = ("unavailable", str(exc)) if isinstance(exc, EngineUnavailableError) else \
                ("internal_error", f"internal server error: {type(exc).__name__}")
            yield "error", {"code": code, "message": message, "param": None}
            failed = body.model_copy(update={"status": "failed",
                                             "error": ResponseError(code="server_error", message=message)})
            yield "response.failed", {"response": failed}
            return
        body = self._finish(request, turn, tenant, body, final)
        message = body.output[0]
        text = message.content[0].text
        yield "response.output_text.done", {**where, "text": text, "logprobs": []}
        yield "response.content_part.done", {**where, "part": _text_part(text)}
        yield "response.output_item.done", {"output_index": 0, "item": message}
        yield f"response.{body.status}", {"response": body}

    def _stream_response(self, events: AsyncIterator[tuple[str, dict[str, Any]]], group: RequestGroup
                         ) -> StreamingResponse:
        """SSE with ``event:`` lines and numbered events (the Responses API sends no ``[DONE]``), with
        comment pings while none comes. A client that goes away aborts the request."""

        async def numbered() -> AsyncIterator[str]:
            number = 0
            async for kind, data in events:
                event = ResponseStreamEvent(type=kind, sequence_number=number, **data)
                yield f"event: {kind}\n" + sse(event)
                number += 1

        async def framed() -> AsyncIterator[str]:
            try:
                async for chunk in with_pings(numbered(), self.sse_ping_interval):
                    yield chunk
            finally:
                group.abort()

        return StreamingResponse(framed(), media_type="text/event-stream; charset=utf-8",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _message(response_id: str, text: str, status: str) -> OutputMessage:
    return OutputMessage(id=f"msg_{response_id.removeprefix('resp_')}", type="message", role="assistant",
                         status=status, content=[_text_part(text)])


def _text_part(text: str) -> OutputText:
    return OutputText(type="output_text", text=text, annotations=[], logprobs=[])


def _not_found(response_id: str, param: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param, "response_not_found")
