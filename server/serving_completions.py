"""POST /v1/completions: prompts as text, a batch of texts, token ids or a batch of token-id lists."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from .engine_client import RequestGroup
from .errors import APIError, json_response
from .outputs import CompletionOutput, RequestOutput, TokenLogprob
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, usage_info
from .serving_base import ServingBase, StreamUsage, SurpriseStream, TextChunks, clamp, collect, sse, top_entries


@dataclass
class _Choice:
    """A choice's running state while its deltas are turned into API text and logprobs."""

    text_offset: int = 0
    echoed: bool = False


class OpenAIServingCompletion(ServingBase):
    id_prefix = "cmpl"

    async def prompts(self, request: CompletionRequest) -> list[tuple[list[int], str | None]]:
        prompt = request.prompt
        if isinstance(prompt, str) or prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        add_bos = request.add_special_tokens is not False
        for p in prompt:  # every text within the limit before any is tokenized
            if isinstance(p, str):
                self.text.check(p, "prompt")
        return [(await self.text.encode(p, add_bos, "prompt"), p) if isinstance(p, str) else (list(p), None)
                for p in prompt]

    async def create(self, request: CompletionRequest, raw: Request) -> Response:
        self.check_request(request.model, request.stream, request.stream_options)
        request.check_fields()
        if request.suffix:
            raise APIError(400, "suffix is not supported", "suffix", "unsupported_parameter")
        max_tokens = request.or_default("max_tokens")
        prompt_logprobs = request.logprobs if request.echo else None
        params = request.sampling_params(max_tokens, request.logprobs, prompt_logprobs)
        prompts = await self.prompts(request)
        group = self.submit(prompts, params, raw, request.cache_salt)
        meta = self.response_meta("text_completion")
        if request.stream:
            return self.stream_response(self._stream(request, prompts, params.n, group, meta), group)
        finals = await self.unless_disconnected(raw, collect(group, len(prompts)), group)
        return json_response(self._response(request, prompts, finals, meta))

    def _choice(self, state: _Choice, request: CompletionRequest, prompt: tuple[list[int], str | None],
                delta: CompletionOutput, prompt_logprobs: list[TokenLogprob | None] | None) -> CompletionChoice:
        text, tokens, entries = delta.text, list(delta.token_ids), list(delta.logprobs or [])
        if request.echo and not state.echoed:
            state.echoed = True
            ids, prompt_text = prompt
            text = (prompt_text if prompt_text is not None else self.tokenizer.decode(ids)) + text
            if prompt_logprobs is not None:  # its first entry is None: nothing precedes the first token
                tokens, entries = ids + tokens, prompt_logprobs + entries
        logprobs = self._logprobs(state, tokens, entries) if request.logprobs is not None else None
        return CompletionChoice(index=0, text=text, logprobs=logprobs, finish_reason=delta.finish_reason,
                                stop_reason=delta.stop_reason)

    def _logprobs(self, state: _Choice, tokens: list[int], entries: list[TokenLogprob | None]) -> CompletionLogprobs:
        out = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        for token, entry in zip(tokens, entries, strict=False):
            piece = self.token_str(token)
            out.tokens.append(piece)
            out.text_offset.append(state.text_offset)
            state.text_offset += len(piece)
            out.token_logprobs.append(None if entry is None else clamp(entry.logprob))
            if entry is None:
                out.top_logprobs.append(None)
                continue
            top = dict(top_entries(entry, self.token_str))
            top.setdefault(piece, clamp(entry.logprob))  # the chosen token is always listed (as vLLM does)
            out.top_logprobs.append(top)
        return out

    async def _stream(self, request: CompletionRequest, prompts: list[tuple[list[int], str | None]], n: int,
                      group: RequestGroup, meta: dict[str, Any]) -> AsyncIterator[str]:
        states: dict[int, _Choice] = {}
        prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}  # by prompt, once its prefill is done
        counts = StreamUsage(request.stream_options, sum(len(ids) for ids, _ in prompts))
        surprise = SurpriseStream(self.surprise_layers) if request.return_surprise else None
        # plain text deltas (most tokens) skip the chunk models: the same bytes from a template
        plain = TextChunks(CompletionResponse, meta) if request.logprobs is None and not request.echo \
            and surprise is None and not counts.continuous else None
        async for prompt_index, out in group:
            counts.count(out)
            if out.prompt_logprobs is not None:
                prompt_logprobs[prompt_index] = out.prompt_logprobs
            for delta in out.outputs:
                index = prompt_index * n + delta.index
                if plain is not None:
                    if delta.text or delta.finish_reason:
                        yield plain.completion(index, delta.text, delta.finish_reason, delta.stop_reason)
                    continue
                state = states.setdefault(index, _Choice())
                choice = self._choice(state, request, prompts[prompt_index], delta, prompt_logprobs.get(prompt_index))
                if surprise is not None:
                    surprise.add(index, out.prompt_surprise, delta)
                if not (choice.text or choice.finish_reason or delta.token_ids and choice.logprobs):
                    continue  # nothing to say (text held back for a possible stop string)
                choice.index = index
                if surprise is not None:
                    choice.surprise = surprise.take(index)
                yield sse(counts.stamp(CompletionResponse(**meta, choices=[choice])))
        if last := counts.last_event(CompletionResponse, meta):
            yield last

    def _response(self, request: CompletionRequest, prompts: list[tuple[list[int], str | None]],
                  finals: list[RequestOutput], meta: dict[str, Any]) -> CompletionResponse:
        choices = []
        n = len(finals[0].outputs)
        for prompt_index, final in enumerate(finals):
            for out in final.outputs:
                choice = self._choice(_Choice(), request, prompts[prompt_index], out, final.prompt_logprobs)
                choice.index = prompt_index * n + out.index
                if request.return_surprise:
                    choice.surprise = self.surprise(final.prompt_surprise, out)
                choices.append(choice)
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        completion_tokens = sum(f.num_generated_tokens for f in finals)
        cached_tokens = sum(f.num_cached_tokens for f in finals)
        return CompletionResponse(**meta, choices=choices, usage=usage_info(prompt_tokens, completion_tokens,
                                                                            cached_tokens))
