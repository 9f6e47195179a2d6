"""One streamed OpenAI request, timed chunk by chunk, ending in exactly one outcome: success or an error kind."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from miras_serve.loadtest.stats import RequestResult
from miras_serve.loadtest.workload import RequestSpec

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
CLEAN_REJECTIONS = (429, 503)  # overload and draining: the client may retry, nothing was lost


@dataclass(frozen=True)
class ApiConfig:
    base_url: str
    model: str
    endpoint: str = "completions"
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    extra_body: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + ENDPOINTS[self.endpoint]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def payload(self, spec: RequestSpec) -> dict:
        body: dict = {"model": self.model, "max_tokens": spec.max_tokens, "temperature": self.temperature,
                      "stream": True, "stream_options": {"include_usage": True}}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": spec.prompt}]
        else:
            body["prompt"] = spec.prompt
        if self.ignore_eos:  # a vLLM extension; only sent when asked, so strict OpenAI servers still work
            body["ignore_eos"] = True
        return {**body, **self.extra_body}


def new_client(timeout: float) -> httpx.AsyncClient:
    """One client per worker: a shared client serialises on its pool and caps the load it can offer."""
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                             limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))


def error_message(body: bytes) -> tuple[str, bool]:
    """The message of an error body, and whether it is OpenAI-shaped ({"error": {"message": ...}})."""
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body[:200].decode("utf-8", "replace"), False
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"], True
    return str(parsed)[:200], False


def content_of(choice: dict, endpoint: str) -> str:
    if endpoint == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def send_request(client: httpx.AsyncClient, api: ApiConfig, spec: RequestSpec, scheduled_at: float,
                       t0: float) -> RequestResult:
    """Send ``spec`` and time it; ``t0`` is the run's perf_counter origin. Never raises for a failed request."""
    result = RequestResult(spec.index, spec.prompt_len, spec.max_tokens, scheduled_at)
    result.sent_at = time.perf_counter() - t0
    chunks, last_chunk_at, done = 0, None, False
    try:
        async with client.stream("POST", api.url, json=api.payload(spec), headers=api.headers) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error_detail, clean = error_message(await response.aread())
                result.error = f"http_{response.status_code}"
                result.clean_rejection = clean and response.status_code in CLEAN_REJECTIONS
                return result
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                result.error, result.error_detail = "not_a_stream", response.headers.get("content-type", "")
                await response.aread()
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, ": ping" comments, event:/id: fields
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:  # an error after the 200 header: keep reading to [DONE]
                    error = event["error"]
                    result.error = "stream_error"
                    result.error_detail = str(error.get("message", error) if isinstance(error, dict) else error)
                    continue
                if event.get("usage"):
                    result.usage_reported = True
                    result.output_tokens = event["usage"].get("completion_tokens", 0)
                    result.prompt_tokens = event["usage"].get("prompt_tokens")
                for choice in event.get("choices") or []:
                    if content_of(choice, api.endpoint):
                        now = time.perf_counter() - t0
                        if last_chunk_at is None:
                            result.ttft = now - result.sent_at
                        else:
                            result.itl.append(now - last_chunk_at)
                        last_chunk_at = now
                        chunks += 1
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
    except httpx.TimeoutException as exc:
        result.error, result.error_detail = "timeout", type(exc).__name__
    except httpx.ConnectError as exc:
        result.error, result.error_detail = "connect_error", str(exc)
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        result.error, result.error_detail = "stream_cut", str(exc) or type(exc).__name__
    except httpx.HTTPError as exc:
        result.error, result.error_detail = "http_error", f"{type(exc).__name__}: {exc}"
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:  # not an OpenAI chunk
        result.error, result.error_detail = "bad_event", str(exc)
    finally:
        result.finished_at = time.perf_counter() - t0
    if result.error is None and not done:
        result.error = "no_done"  # the stream closed cleanly but without data: [DONE]
    if not result.usage_reported:
        result.output_tokens = chunks
    return result


def check_tokens(result: RequestResult) -> None:
    """Correctness mode: a success must carry exactly the tokens asked for (ignore_eos + max_tokens)."""
    if not result.ok:
        return
    if not result.usage_reported:
        result.error, result.error_detail = "no_usage", "no usage chunk: cannot verify the token count"
    elif result.output_tokens != result.max_tokens or result.finish_reason != "length":
        result.error = "wrong_token_count"
        result.error_detail = (f"asked {result.max_tokens}, got {result.output_tokens} "
                               f"(finish_reason {result.finish_reason})")
