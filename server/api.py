"""The FastAPI app: OpenAI-compatible routes over an AsyncEngine, plus health, version, tokenizer and
metrics endpoints. ``build_app`` wires middleware and error handlers; the CLI runs it with uvicorn."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .engine_args import DEFAULTS, EngineArgs, MiB
from .engine_client import EngineClient
from .errors import APIError, ErrorResponse, error_body, install_error_handlers, json_response
from .limits import BodyLimitMiddleware, TextLimits, default_max_prompt_chars, default_max_request_bytes
from .middleware import PLAYGROUND_STATIC, APIKeyMiddleware, RequestIdMiddleware
from .protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from .protocol_responses import ResponseDeleted, ResponseObject, ResponsesRequest, ResponseStreamEvent
from .response_store import ResponseStore
from .response_store_redis import RedisResponses
from .serving_chat import OpenAIServingChat, render_chat
from .serving_completions import OpenAIServingCompletion
from .serving_responses import OpenAIServingResponses

try:
    VERSION = version("miras-serve")
except PackageNotFoundError:  # running from a source tree
    VERSION = "0.0.0"

PLAYGROUND_DIR = Path(__file__).parent / "static"  # the playground page: plain files, no build step
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 429, 503)}
STREAM_EVENTS = (CompletionResponse, ChatCompletionChunk, ResponseStreamEvent)  # the data of each SSE event


def streams(event: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The responses of a route that streams when asked: its JSON body, or server-sent events whose data are
    ``event``s (and the errors)."""
    schema = {"$ref": f"#/components/schemas/{event.__name__}"}
    return {200: {"content": {"text/event-stream": {"schema": schema}}}, **ERRORS}


def openapi_with_stream_events(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document, with the models of the stream events among its components (FastAPI adds
    only the models of JSON bodies)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema([(m, "serialization") for m in STREAM_EVENTS],
                                     ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in defs["$defs"].items():
            components.setdefault(name, definition)
        app.openapi_schema = schema
    return app.openapi_schema


class ServerStatus(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


@dataclass
class ServerSettings:
    """What the HTTP layer runs with; defaults and meanings are EngineArgs' (server/engine_args.py)."""

    served_model_name: str
    model_root: str
    api_keys: list[str] = field(default_factory=list)  # each one a tenant; none: no auth
    allowed_origins: list[str] = field(default_factory=list)
    shutdown_timeout: float = DEFAULTS.shutdown_timeout
    sse_ping_interval: float = DEFAULTS.sse_ping_interval
    # stored responses of the Responses API, per tenant (server/response_store.py)
    responses_max_count: int = DEFAULTS.responses_max_count
    responses_max_bytes: int = int(DEFAULTS.responses_max_mb * MiB)
    responses_ttl: float = DEFAULTS.responses_ttl
    state_cache_scope: str = DEFAULTS.state_cache_scope
    metrics_require_key: bool = DEFAULTS.metrics_require_key
    max_request_bytes: int | None = DEFAULTS.max_request_bytes  # None: derived from --max-prompt-tokens
    max_prompt_chars: int | None = DEFAULTS.max_prompt_chars  # None: from --max-prompt-tokens and the vocabulary
    request_read_timeout: float = DEFAULTS.request_read_timeout
    tool_call_parser: str | None = None  # "auto" tool choice's parser (--enable-auto-tool-choice); None: refused
    playground: bool = not DEFAULTS.disable_playground

    @classmethod
    def from_args(cls, args: EngineArgs, served_model_name: str) -> ServerSettings:
        return cls(served_model_name, str(args.model), args.api_keys, args.allowed_origins, args.shutdown_timeout,
                   args.sse_ping_interval, responses_max_count=args.responses_max_count,
                   responses_max_bytes=int(args.responses_max_mb * MiB), responses_ttl=args.responses_ttl,
                   state_cache_scope=args.state_cache_scope, metrics_require_key=args.metrics_require_key,
                   max_request_bytes=args.max_request_bytes, max_prompt_chars=args.max_prompt_chars,
                   request_read_timeout=args.request_read_timeout,
                   tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
                   playground=not args.disable_playground)


class ServerState:
    def __init__(self, engine: EngineClient, settings: ServerSettings, responses_dir: str | None = None,
                 shared_responses: RedisResponses | None = None):
        """``responses_dir``: where stored responses persist across restarts (None: in memory only);
        ``shared_responses``: the store every replica shares (None: this replica's only)."""
        self.engine = engine
        self.settings = settings
        self.status = ServerStatus.STARTING
        tokenizer = engine.tokenizer
        max_prompt_tokens = engine.model_info.max_prompt_tokens
        self.max_request_bytes = settings.max_request_bytes or default_max_request_bytes(max_prompt_tokens)
        self.text = TextLimits(tokenizer, settings.max_prompt_chars or default_max_prompt_chars(tokenizer,
                                                                                                max_prompt_tokens))
        self.completions = OpenAIServingCompletion(engine, settings.served_model_name, settings.sse_ping_interval,
                                                   self.text)
        self.chat = OpenAIServingChat(engine, settings.served_model_name, settings.sse_ping_interval, self.text,
                                      tool_call_parser=settings.tool_call_parser)
        store = ResponseStore(settings.responses_max_count, settings.responses_max_bytes, settings.responses_ttl,
                              responses_dir, on_forget=lambda r: engine.forget_states([r.prompt_key, r.finish_key]),
                              shared=shared_responses)
        self.responses = OpenAIServingResponses(engine, settings.served_model_name, settings.sse_ping_interval,
                                                self.text, store=store)

    async def drain(self) -> None:
        """SIGTERM: /health goes 503, new requests get 503, in-flight ones get --shutdown-timeout to
        finish and the rest end with finish_reason "abort"."""
        self.status = ServerStatus.DRAINING
        await self.engine.drain(self.settings.shutdown_timeout)


async def require_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}", None,
                       "unsupported_media_type")


def build_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        state.status = ServerStatus.READY
        try:
            yield
        finally:
            state.engine.stop()
            state.engine.flush_saved_states()
            state.responses.store.flush()

    app = FastAPI(title="Miras Serve", version=VERSION, lifespan=lifespan,
                  description="OpenAI-compatible serving of recurrent Miras language models.")
    app.state.server = state
    app.openapi = lambda: openapi_with_stream_events(app)
    install_error_handlers(app)
    tokenizer = state.engine.tokenizer
    max_prompt_tokens = state.engine.model_info.max_prompt_tokens
    json_body = [Depends(require_json)]

    def model_check(model: str | None) -> None:
        state.completions.check_request(model, stream=None, stream_options=None)

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        if state.status is ServerStatus.READY and state.engine.running:
            return json_response(HealthResponse(status="ok"))
        status = state.status.value if state.engine.dead is None else "dead"
        return json_response(error_body(503, f"server is {status}", None, status), 503)

    @app.get("/version")
    async def show_version() -> VersionResponse:
        return VersionResponse(version=VERSION)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        card = ModelCard(id=state.settings.served_model_name, root=state.settings.model_root,
                         max_model_len=max_prompt_tokens)
        return ModelList(data=[card])

    @app.post("/v1/completions", dependencies=json_body, response_model=CompletionResponse,
              responses=streams(CompletionResponse))
    async def create_completion(request: CompletionRequest, raw: Request) -> Response:
        return await state.completions.create(request, raw)

    @app.post("/v1/chat/completions", dependencies=json_body, response_model=ChatCompletionResponse,
              responses=streams(ChatCompletionChunk))
    async def create_chat_completion(request: ChatCompletionRequest, raw: Request) -> Response:
        return await state.chat.create(request, raw)

    @app.post("/v1/responses", dependencies=json_body, response_model=ResponseObject,
              responses=streams(ResponseStreamEvent))
    async def create_response(request: ResponsesRequest, raw: Request) -> Response:
        return await state.responses.create(request, raw)

    @app.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=ERRORS)
    async def retrieve_response(response_id: str, raw: Request) -> Response:
        return state.responses.retrieve(raw, response_id)

    @app.delete("/v1/responses/{response_id}", response_model=ResponseDeleted, responses=ERRORS)
    async def delete_response(response_id: str, raw: Request) -> Response:
        return state.responses.delete(raw, response_id)

    @app.post("/tokenize", dependencies=json_body, response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        model_check(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt", "invalid_value")
        text = request.prompt if request.prompt is not None else render_chat(
            tokenizer, request.messages, request.add_generation_prompt, request.tools)
        ids = await state.text.encode(text, request.add_special_tokens,
                                      "prompt" if request.prompt is not None else "messages")
        strs = [state.completions.token_str(t) for t in ids] if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=max_prompt_tokens, tokens=ids, token_strs=strs)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, object]:
        """The tokenizer's configuration (tokenizer_config.json, as vLLM serves it): lm-eval's remote tokenizer
        reads its special tokens and Jinja chat template here, then tokenizes through /tokenize."""
        return {**tokenizer.hf_config(), "model_max_length": max_prompt_tokens, "vocab_size": tokenizer.vocab_size}

    @app.post("/detokenize", dependencies=json_body, response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        model_check(request.model)
        if len(request.tokens) > max_prompt_tokens:
            raise APIError(400, f"{len(request.tokens)} tokens is more than the server's limit of {max_prompt_tokens} "
                           "(--max-prompt-tokens)", "tokens", "invalid_value")
        vocab = state.engine.model_info.vocab_size
        bad = next((t for t in request.tokens if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is out of vocabulary (size {vocab})", "tokens", "invalid_value")
        return DetokenizeResponse(prompt=await state.text.decode(request.tokens))

    @app.get("/metrics")
    @app.head("/metrics", include_in_schema=False)  # what uptime checks and promtool's probes send
    async def metrics() -> Response:
        return Response(generate_latest(state.engine.metrics_registry), media_type=CONTENT_TYPE_LATEST)

    settings = state.settings
    if settings.playground:
        @app.get("/", include_in_schema=False)
        async def playground() -> FileResponse:
            return FileResponse(PLAYGROUND_DIR / "index.html")

        app.mount(PLAYGROUND_STATIC, StaticFiles(directory=PLAYGROUND_DIR), name="playground")

    # innermost first: the body is read only for requests the key check let through
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.max_request_bytes, timeout=settings.request_read_timeout)
    if settings.api_keys:
        app.add_middleware(APIKeyMiddleware, api_keys=settings.api_keys,
                           cache_per_key=settings.state_cache_scope == "api-key",
                           metrics_need_key=settings.metrics_require_key)
    app.add_middleware(RequestIdMiddleware)  # outside the key check, so a 401 carries the id too
    if settings.allowed_origins:  # outermost, so preflights and 401s carry CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"])
    return app
