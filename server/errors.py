"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status; and
``wire_json``, how every response model goes on the wire.

FastAPI's 422 for invalid bodies becomes a 400 naming the field (as vLLM and SGLang do), so OpenAI
clients raise BadRequestError with a useful message.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from .sampling_params import ParamError

logger = logging.getLogger("miras.api")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable_error"}
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}  # union-member tags in pydantic locs


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server sends, as a body or as an in-band stream event."""

    error: ErrorInfo


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "server_error"), param=param,
                                         code=code))


def wire_json(body: BaseModel) -> str:
    """A response model (server/protocol.py) as JSON: the fields its handler set, and only those."""
    return body.model_dump_json(exclude_unset=True)


def json_response(body: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(wire_json(body), status, headers, media_type="application/json")


def error_response(exc: APIError) -> Response:
    return json_response(error_body(exc.status, exc.message, exc.param, exc.code), exc.status, exc.headers)


def _param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in _TYPE_TAGS:
            continue
        else:
            out += f".{part}" if out else part
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"request body is not valid JSON: {detail}".rstrip(": "), None, "invalid_json")
    param = _param(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        return APIError(400, f"{param}: field required", param, "missing_required_parameter")
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return APIError(400, "request body must be a JSON object", None, "invalid_request")
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return APIError(400, f"{param or 'body'}: {msg}{more}", param, "invalid_value")


def undecodable_body(cause: BaseException | None) -> APIError:
    """The 400 for a body that JSON decoding failed on, saying why."""
    if isinstance(cause, RecursionError):
        message = "request body nests too deeply to decode"
    elif isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        message = "request body holds an integer with too many digits"
    else:
        message = "request body is not valid UTF-8 JSON"
    return APIError(400, message, None, "invalid_json")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(ParamError)
    async def _param_error(_: Request, exc: ParamError) -> Response:
        return error_response(APIError(400, str(exc), exc.param, "invalid_value"))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> Response:
        if exc.status_code == 400:  # FastAPI's only 400: a body it could not decode
            return error_response(undecodable_body(exc.__cause__))
        return error_response(APIError(exc.status_code, str(exc.detail), None, None, exc.headers))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> Response:
        logger.exception("unhandled error")
        return error_response(APIError(500, f"internal server error: {type(exc).__name__}", None, "internal_error"))
