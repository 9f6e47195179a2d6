"""Pydantic request/response models of the OpenAI-compatible API (field names and defaults as in vLLM).

Only shapes and static ranges live here; checks that need the model (vocabulary, --max-num-seqs,
--max-prompt-tokens) happen in the engine and come back as 400 errors naming the field.
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from .errors import APIError
from .sampling_params import (
    MAX_STOP_STRINGS,
    MAX_TOKENS_LIMIT,
    RANGES,
    GuidedDecoding,
    ParamError,
    SamplingParams,
)

MAX_N = 128
MAX_PROMPTS = 256  # prompts in one /v1/completions batch
DEFAULT_CHAT_MAX_TOKENS = 4096  # chat has no context wall to fill up to, so the default is a fixed budget
INT64 = dict(ge=-(2**63), le=2**63 - 1)
MAX_JSON_DEPTH = 32  # the API's own bodies nest 4 deep (messages[0].content[0].text)
MAX_CACHE_SALT_CHARS = 1024
TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")  # ASCII digits only: str.isdigit() also accepts "²"

TokenId = Annotated[int, Field(ge=0)]
_SAMPLING_DEFAULTS = SamplingParams()


def sampling_field(name: str, default: Any = ...) -> Any:
    """A request field that is SamplingParams' ``name``: its default (unless given) and its range are
    SamplingParams' (server/sampling_params.py), stated once."""
    limits = RANGES[name].field_limits() if name in RANGES else {}
    return Field(getattr(_SAMPLING_DEFAULTS, name) if default is ... else default, **limits)


class OpenAIModel(BaseModel):
    # unknown fields are kept (``model_extra``) so that request bodies can refuse them by name
    # (``refuse_unsupported``) instead of failing on a pydantic message; numbers must be finite (Python's
    # JSON decoder accepts Infinity, NaN and 1e999)
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# Fields of OpenAI's and vLLM's APIs that this server accepts and leaves out of generation on purpose: they
# never change what is generated (metadata and routing hints every client may send).
IGNORED_FIELDS = frozenset({"metadata", "store", "service_tier", "request_id"})


def refuse_unsupported(extras: dict[str, Any] | None, allowed: dict[str, tuple[Any, ...]] | None = None,
                       where: str = "") -> None:
    """400 ``unsupported_field`` naming the first field this server does not implement. ``extras``: the
    body's unknown fields; null counts as absent, and ``allowed`` maps a field to the values that ask for
    what the server does anyway (``best_of`` equal to ``n``, ``use_beam_search`` false, ...)."""
    for name, value in (extras or {}).items():
        if value is None or name in IGNORED_FIELDS:
            continue
        if any(value == ok and isinstance(value, bool) == isinstance(ok, bool) for ok in (allowed or {}).get(name, ())):
            continue
        field = f"{where}.{name}" if where else name
        shown = "" if allowed is None or name not in allowed else f" (only {' or '.join(map(repr, allowed[name]))})"
        raise APIError(400, f"{field} is not supported by this server{shown}", field, "unsupported_field")


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_json_body(body: Any) -> None:
    """Raise a 400 naming the field for what no field validator should ever see: a string (value or key)
    holding a lone UTF-16 surrogate, which JSON's \\ud800 escapes can produce but no text contains (the
    tokenizer and the JSON encoder both fail on it), or nesting deeper than MAX_JSON_DEPTH."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if _has_lone_surrogate(value):
                raise APIError(400, f"{path or 'body'}: string holds a lone UTF-16 surrogate (not valid Unicode "
                               "text)", path or None, "invalid_value")
            continue
        if not isinstance(value, dict | list):
            continue
        if depth >= MAX_JSON_DEPTH:
            raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels (at {path})", path or None,
                           "invalid_value")
        if isinstance(value, list) and set(map(type, value)).isdisjoint((str, dict, list)):
            continue  # numbers only (a prompt of token ids): skipped at C speed, not item by item
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and _has_lone_surrogate(key):
                raise APIError(400, f"{path or 'body'}: a key holds a lone UTF-16 surrogate (not valid Unicode "
                               "text)", path or None, "invalid_value")
            child = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
            stack.append((item, child, depth + 1))


class RequestBody(OpenAIModel):
    """The top level of a request body: checked as a whole (check_json_body) before any field is parsed."""

    @model_validator(mode="before")
    @classmethod
    def _check_json(cls, data: Any) -> Any:
        check_json_body(data)
        return data


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(OpenAIModel):
    name: str = Field("response", max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")  # `schema` would shadow a pydantic method
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema must be given exactly when type is "json_schema"')
        return self

    def guided(self) -> GuidedDecoding:
        if self.type == "json_object":
            return GuidedDecoding("json_object", "", "response_format")
        return GuidedDecoding("json", json.dumps(self.json_schema.json_schema), "response_format")


class SamplingFields(RequestBody):
    """Fields shared by completions and chat."""

    model: str | None = None
    frequency_penalty: float | None = sampling_field("frequency_penalty")
    presence_penalty: float | None = sampling_field("presence_penalty")
    repetition_penalty: float | None = sampling_field("repetition_penalty")
    logit_bias: dict[str, Annotated[float, Field(**RANGES["logit_bias"].field_limits())]] | None = None
    n: int | None = Field(_SAMPLING_DEFAULTS.n, ge=1, le=MAX_N)
    seed: int | None = Field(None, **INT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = sampling_field("temperature")
    top_p: float | None = sampling_field("top_p")
    top_k: int | None = Field(_SAMPLING_DEFAULTS.top_k, ge=-1)  # -1 is off, as 0 is
    min_p: float | None = sampling_field("min_p")
    min_tokens: int | None = Field(_SAMPLING_DEFAULTS.min_tokens, ge=0)
    ignore_eos: bool | None = _SAMPLING_DEFAULTS.ignore_eos
    include_stop_str_in_output: bool | None = _SAMPLING_DEFAULTS.include_stop_str_in_output
    skip_special_tokens: bool | None = _SAMPLING_DEFAULTS.skip_special_tokens
    user: str | None = None
    # vLLM's field: mixed into the state-cache key, so only requests with the same salt share cached states
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)
    # ---- structured outputs (server/structured.py): OpenAI's response_format and vLLM's guided fields ----
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None
    # ---- end of structured outputs ----

    def guided_decoding(self) -> GuidedDecoding | None:
        """The request's output constraint, if any; at most one of the fields that set one."""
        found = []
        if self.response_format is not None and self.response_format.type != "text":
            found.append(self.response_format.guided())
        if self.guided_json is not None:
            schema = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            found.append(GuidedDecoding("json", schema, "guided_json"))
        if self.guided_regex is not None:
            found.append(GuidedDecoding("regex", self.guided_regex, "guided_regex"))
        if self.guided_choice is not None:
            found.append(GuidedDecoding("choice", json.dumps(self.guided_choice), "guided_choice"))
        if self.guided_grammar is not None:
            found.append(GuidedDecoding("grammar", self.guided_grammar, "guided_grammar"))
        if len(found) > 1:
            raise ParamError(found[1].field, f"only one output constraint per request, got {found[0].field} and "
                             f"{found[1].field}")
        return found[0] if found else None

    # Miras extension: each consumed token's surprise per Miras layer (docs/surprise.md); a JSON boolean only
    return_surprise: StrictBool | None = _SAMPLING_DEFAULTS.return_surprise

    def or_default(self, name: str) -> Any:
        """The field's value; an explicit null means its default."""
        value = getattr(self, name)
        return type(self).model_fields[name].default if value is None else value

    def sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
                        ) -> SamplingParams:
        value = self.or_default
        return SamplingParams(
            n=value("n"), temperature=value("temperature"), top_p=value("top_p"), top_k=value("top_k"),
            min_p=value("min_p"), presence_penalty=value("presence_penalty"),
            frequency_penalty=value("frequency_penalty"), repetition_penalty=value("repetition_penalty"),
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()}, seed=self.seed,
            max_tokens=max_tokens, min_tokens=min(value("min_tokens"), max_tokens),
            stop=self.stop or [], stop_token_ids=self.stop_token_ids or [],
            include_stop_str_in_output=value("include_stop_str_in_output"), ignore_eos=value("ignore_eos"),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=value("skip_special_tokens"),
            guided=self.guided_decoding(),
            return_surprise=value("return_surprise"))

    # vLLM's parameters that ask for what this server does anyway (any other value is refused by name)
    def allowed_values(self) -> dict[str, tuple[Any, ...]]:
        return {"best_of": (self.n or 1,), "use_beam_search": (False,), "length_penalty": (1.0,),
                "priority": (0,), "spaces_between_special_tokens": (True,)}

    def check_fields(self) -> None:
        """400 naming the first field of the request this server does not implement."""
        refuse_unsupported(self.model_extra, self.allowed_values())

    @field_validator("stop", "stop_token_ids", mode="before")
    @classmethod
    def _few_stops(cls, stops: Any, info: Any) -> Any:
        # one clear message (the union's per-member errors are not)
        if isinstance(stops, list) and len(stops) > MAX_STOP_STRINGS:
            kind = "strings" if info.field_name == "stop" else "token ids"
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop {kind} are allowed, got {len(stops)}")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not TOKEN_ID_KEY.fullmatch(key):
                shown = key if len(key) <= 20 else key[:20] + "..."
                raise ValueError(f"keys must be token ids (1 to 10 ASCII digits), got {shown!r}")
        return bias


PromptInput = str | list[str] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    echo: bool | None = False
    logprobs: int | None = sampling_field("logprobs")
    max_tokens: int | None = sampling_field("max_tokens")
    suffix: str | None = None
    add_special_tokens: bool | None = True  # prepend BOS to text prompts

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        # one clear message instead of one error per member of the union
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("prompt must be a non-empty string, list of strings, list of token ids or list of "
                             "token-id lists")
        if len(prompt) > MAX_PROMPTS and not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        kinds = {type(p) for p in prompt}
        if not (kinds <= {str} or kinds <= {int} or kinds <= {list}):
            raise ValueError("prompt lists must hold only strings, only token ids, or only token-id lists")
        if kinds <= {str, list} and any(len(p) == 0 for p in prompt):
            raise ValueError("prompt must not contain an empty prompt")
        return prompt


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


# ---- tool calls (server/tool_calls.py) ----
class FunctionDefinition(OpenAIModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(OpenAIModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall
# ---- end of tool calls ----


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message's answer to that call

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool | None = False
    top_logprobs: int | None = sampling_field("logprobs")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    add_generation_prompt: bool | None = True
    add_special_tokens: bool | None = True  # the default template has no BOS, so it is added here
    # ---- tool calls (server/tool_calls.py) ----
    tools: Annotated[list[ToolDefinition], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    # ---- end of tool calls ----

    def allowed_values(self) -> dict[str, tuple[Any, ...]]:
        return {**super().allowed_values(), "echo": (False,), "continue_final_message": (False,)}


# ---- responses: the wire format, built by the serving classes and sent with ``wire_json`` (server/errors.py):
# only the fields a handler sets go out (a stream chunk says stop_reason once its choice finishes, surprise only
# when asked for, ...)
class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens restored from a saved state instead of prefilled (state cache)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


def usage_info(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class Surprise(BaseModel):
    """Miras extension (return_surprise, docs/surprise.md): each consumed token's surprise per Miras layer."""

    layers: list[int]
    prompt: list[list[float]] | None = None  # a stream sends the prompt's rows once, with its first chunk
    completion: list[list[float] | None] = Field(default_factory=list)  # null: the last token, never fed


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    surprise: Surprise | None = None


class CompletionResponse(BaseModel):
    """A completion, and (with the same object name, as OpenAI sends them) each chunk of its stream."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    surprise: Surprise | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaToolCall(ToolCallOut):
    index: int  # the call's place in the choice's tool_calls


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # sent with the finish_reason
    surprise: Surprise | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "miras-serve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[ToolDefinition] | None = None  # rendered like chat (server/tool_calls.py)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok"]


class VersionResponse(BaseModel):
    version: str
