"""Request and response models of ``/v1/responses`` (OpenAI's Responses API, text in and text out).

Every field of the API that is not implemented is refused with a 400 naming it (``unsupported_field``),
never accepted and ignored: tools, reasoning, structured output, background mode and the rest.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError
from .protocol import RequestBody, sampling_field
from .sampling_params import MAX_TOKENS_LIMIT

MESSAGE_ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text")
MAX_METADATA_KEYS = 16


class ResponsesRequest(RequestBody):
    # extras are refused by name in ``check_fields``; strings, nesting and numbers are checked as for chat
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool | None = True
    stream: bool | None = False
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = sampling_field("top_p", None)
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=MAX_METADATA_KEYS)] \
        | None = None
    cache_salt: str | None = None  # states are shared only between requests of one tenant and salt
    # accepted where they ask for what this server does anyway: text out, no tools, no truncation
    text: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    truncation: Literal["disabled"] | None = None

    def check_fields(self) -> None:
        """400 for any field of the API that this server does not implement (null counts as absent)."""
        for name, value in (self.model_extra or {}).items():
            if value is not None:
                raise APIError(400, f"{name} is not supported by this server", name, "unsupported_field")
        if self.tools:
            raise APIError(400, "tools are not supported by this server", "tools", "unsupported_field")
        if self.text is not None and self.text.get("format", {"type": "text"}) != {"type": "text"} \
                or set(self.text or {}) - {"format"}:
            raise APIError(400, "only plain text output (text.format {\"type\": \"text\"}) is supported",
                           "text.format", "unsupported_value")

    def messages(self) -> list[dict[str, str]]:
        """``input`` as chat messages (role, content), with ``instructions`` first as a system message."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        if not self.input:
            raise APIError(400, "input must not be empty", "input", "invalid_value")
        return messages + [_message(item, f"input[{i}]") for i, item in enumerate(self.input)]


# ---- responses: the wire format (sent with ``wire_json``, server/errors.py) ----
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int  # input tokens restored from a saved state instead of prefilled


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """The response object: returned by POST (and GET) /v1/responses, stored, and carried by stream events."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage] = Field(default_factory=list)
    parallel_tool_calls: bool = False
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = True
    temperature: float
    text: dict[str, Any]
    tool_choice: Literal["none"] = "none"
    tools: list[Any] = Field(default_factory=list)
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool


class ResponseStreamEvent(BaseModel):
    """One server-sent event of a streamed response; ``type`` says which of the other fields it has."""

    type: str
    sequence_number: int
    response: ResponseObject | None = None
    output_index: int | None = None
    item: OutputMessage | None = None
    item_id: str | None = None
    content_index: int | None = None
    part: OutputText | None = None
    delta: str | None = None
    text: str | None = None
    logprobs: list[Any] | None = None
    code: str | None = None  # an "error" event
    message: str | None = None
    param: str | None = None


def _message(item: dict[str, Any], where: str) -> dict[str, str]:
    kind = item.get("type", "message")
    if kind != "message":
        raise APIError(400, f"{where}.type: input items of type {kind!r} are not supported (only messages)",
                       f"{where}.type", "unsupported_value")
    unknown = sorted(set(item) - {"type", "role", "content", "id", "status"})
    if unknown:
        raise APIError(400, f"{where}.{unknown[0]} is not supported", f"{where}.{unknown[0]}", "unsupported_field")
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise APIError(400, f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}", f"{where}.role",
                       "invalid_value")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content",
                       "invalid_value")
    texts = []
    for j, part in enumerate(content):
        part_where = f"{where}.content[{j}]"
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise APIError(400, f"{part_where}: content parts of type {kind!r} are not supported (only text)",
                           f"{part_where}.type", "unsupported_value")
        texts.append(part["text"])
    return {"role": role, "content": "".join(texts)}

