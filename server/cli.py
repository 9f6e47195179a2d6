"""``miras-serve``: load a model and serve the OpenAI-compatible API with uvicorn.

SIGTERM (or Ctrl-C) drains: /health turns 503 and new requests are refused while in-flight ones get
``--shutdown-timeout`` seconds to finish; the rest end with finish_reason "abort", then the server exits.
A second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import sys
from pathlib import Path
from types import FrameType

import torch
import uvicorn

import models
from kernels import DOT_PRECISIONS

from .api import ServerSettings, ServerState, build_app
from .async_engine import AsyncEngine
from .engine import EngineConfig, LLMEngine
from .limits import h11_protocol
from .loader import DEFAULT_MODEL, default_served_name, load_model
from .metrics import EngineMetrics
from .response_store_redis import RedisResponses
from .state_tier_redis import RedisStateTier
from .state_tiers import DiskStateTier, StackedTiers
from .tool_calls import TOOL_CALL_PARSERS

logger = logging.getLogger("miras.serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser("miras-serve", description="Serve a Miras model over an OpenAI-compatible API.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model directory or shipped model name (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="name clients use in 'model' (default: from --model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--api-key", action="append", default=[],
                   help="require 'Authorization: Bearer KEY'; repeat for several keys, each a tenant of its own "
                        "(env MIRAS_API_KEY adds one more)")
    p.add_argument("--api-key-file", type=Path, default=None,
                   help="file of API keys, one a line (blank lines and lines starting with # are skipped)")
    p.add_argument("--state-cache-scope", default="api-key", choices=["api-key", "shared"],
                   help="api-key: cached states are only restored for requests with the same API key (and "
                        "cache_salt); shared: across keys (default: %(default)s)")
    p.add_argument("--metrics-require-key", action="store_true", help="/metrics requires an API key too")
    p.add_argument("--allowed-origins", nargs="*", default=[], help="CORS origins ('*' for any; default: no CORS)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="state slots = most sequences decoding at once (default: as many as fit in "
                        "--gpu-memory-utilization on a GPU, up to 1024; 64 on a CPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of the GPU's memory this server may use (weights, state pool, state cache, "
                        "activations): sizes the state pool, or refuses a --max-num-seqs that does not fit")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one engine step")
    p.add_argument("--max-prompt-tokens", type=int, default=1_000_000, help="prompt length guard (400 beyond)")
    p.add_argument("--dot-precision", default=None, choices=DOT_PRECISIONS,
                   help="input precision of the GPU kernels' fp32 tensor-core products in prefill (default: "
                        "MIRAS_DOT_PRECISION, else the evidence-based default of docs/precision.md; ieee is exact)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="decode eagerly: without CUDA graphs on a GPU (default: replay the decode step from "
                        "graphs), without compiled steps on a CPU (default: torch.compile the decode step)")
    p.add_argument("--state-cache-gb", type=float, default=1.0,
                   help="memory for recurrent states of earlier prompts and replies, restored when a prompt repeats "
                        "or extends one (the next turn of a chat): prefix caching; 0 disables")
    p.add_argument("--state-disk-dir", default=None,
                   help="directory for saved states and stored responses on local disk, behind the in-memory "
                        "cache: they survive a restart (default: none, memory only)")
    p.add_argument("--state-disk-gb", type=float, default=10.0, help="disk for saved states (least recently "
                   "used go first)")
    p.add_argument("--state-disk-ttl", type=float, default=0.0,
                   help="seconds after its last use that a saved state on disk expires; 0: never")
    p.add_argument("--state-redis-url", default=None,
                   help="shared store for saved states and stored responses, read and written by every replica "
                        "(redis://host:port/db), below the local tiers: a conversation continues on any replica "
                        "(default: none)")
    p.add_argument("--state-redis-gb", type=float, default=4.0,
                   help="bytes of saved states in the shared store, for all replicas (least recently used go first)")
    p.add_argument("--state-redis-ttl", type=float, default=0.0,
                   help="seconds after its last use that a saved state in the shared store expires; 0: never")
    p.add_argument("--responses-max-count", type=int, default=10_000,
                   help="stored responses (Responses API) kept per tenant; the oldest go first")
    p.add_argument("--responses-max-mb", type=float, default=256.0, help="memory for stored responses per tenant")
    p.add_argument("--responses-ttl", type=float, default=30 * 24 * 3600.0,
                   help="seconds a stored response is kept after its creation; 0: no limit")
    p.add_argument("--sse-ping-interval", type=float, default=30.0,
                   help="seconds a stream may stay silent (long prefill, full queue) before it gets an SSE comment "
                        "ping; 0 disables")
    p.add_argument("--max-queued-requests", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="largest request body, refused with 413 before it is read (default: 16 bytes per "
                        "--max-prompt-tokens + 1 MiB)")
    p.add_argument("--max-prompt-chars", type=int, default=None,
                   help="longest text prompt or chat, refused before tokenizing (default: the longest text that "
                        "could fit --max-prompt-tokens: that times the longest token's bytes)")
    p.add_argument("--request-read-timeout", type=float, default=30.0,
                   help="seconds a client has to send a request's headers, and again its body (408, or the "
                        "connection closed, beyond)")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open")
    p.add_argument("--limit-concurrency", type=int, default=1024,
                   help="open connections (streams included) beyond which new requests get 503")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='allow tool_choice "auto": the model decides whether to call tools, and --tool-call-parser '
                        "finds the calls in its output")
    p.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                   help="how tool calls are read from a model's output under \"auto\" (miras_json: the shipped chat "
                        "format's JSON array of {name, arguments}; docs/serving.md#tool-calls)")
    p.add_argument("--disable-playground", action="store_true",
                   help="do not serve the playground page at / (then / is 404)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_prompt_tokens", "max_queued_requests",
                 "responses_max_count", "max_request_bytes", "max_prompt_chars", "limit_concurrency"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.gpu_memory_utilization <= 1:  # NaN too
        p.error("--gpu-memory-utilization must be in (0, 1]")
    for name in ("shutdown_timeout", "state_cache_gb", "sse_ping_interval", "state_disk_gb", "state_disk_ttl",
                 "responses_max_mb", "responses_ttl", "state_redis_gb", "state_redis_ttl"):
        if not getattr(args, name) >= 0:  # NaN too
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("request_read_timeout", "timeout_keep_alive"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    try:
        args.api_keys = api_keys(args)
    except (OSError, UnicodeDecodeError) as exc:
        p.error(f"--api-key-file: {exc}")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        p.error("--enable-auto-tool-choice needs --tool-call-parser")
    if args.metrics_require_key and not args.api_keys:
        p.error("--metrics-require-key needs an API key (--api-key, --api-key-file or MIRAS_API_KEY)")
    return args


def api_keys(args: argparse.Namespace) -> list[str]:
    """The keys of --api-key, --api-key-file and env MIRAS_API_KEY, each once."""
    keys = list(args.api_key)
    if args.api_key_file is not None:
        lines = (line.strip() for line in args.api_key_file.read_text(encoding="utf-8").splitlines())
        keys += [line for line in lines if line and not line.startswith("#")]
    if os.environ.get("MIRAS_API_KEY"):
        keys.append(os.environ["MIRAS_API_KEY"])
    return list(dict.fromkeys(keys))


class DrainingServer(uvicorn.Server):
    """uvicorn stops listening at once on SIGTERM; we first drain (health 503 while in-flight finish)."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.drain_task: concurrent.futures.Future | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_task is not None or self.loop is None:  # second signal, or not started: stop now
            self.should_exit = True
            self.force_exit = self.drain_task is not None
            return
        logger.info("received signal %d: draining for up to %.0f s", sig, self.state.settings.shutdown_timeout)
        self.drain_task = asyncio.run_coroutine_threadsafe(self._drain_then_exit(), self.loop)

    async def _drain_then_exit(self) -> None:
        try:
            await self.state.drain()
            await asyncio.sleep(0.1)  # let the final SSE events flush
        finally:
            self.should_exit = True


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(args.max_num_seqs, args.max_num_batched_tokens, args.max_prompt_tokens,
                        cuda_graphs=False if args.enforce_eager else None, compiled_steps=not args.enforce_eager,
                        state_cache_bytes=int(args.state_cache_gb * (1 << 30)), state_disk_dir=args.state_disk_dir,
                        state_disk_bytes=int(args.state_disk_gb * (1 << 30)), state_disk_ttl=args.state_disk_ttl,
                        gpu_memory_utilization=args.gpu_memory_utilization, state_redis_url=args.state_redis_url,
                        state_redis_bytes=int(args.state_redis_gb * (1 << 30)), state_redis_ttl=args.state_redis_ttl,
                        dot_precision=args.dot_precision)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        net, tokenizer = load_model(args.model, args.device, args.dtype)
    except (models.CheckpointError, models.ConfigError, ValueError, OSError) as exc:
        hint = ""
        if args.model == DEFAULT_MODEL and DEFAULT_MODEL not in models.shipped_models():
            hint = f"\n(the default model {DEFAULT_MODEL!r} is not shipped in this build; pass --model DIR)"
        sys.exit(f"miras-serve: cannot load model: {exc}{hint}")
    if net.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # leave a core to the event loop that streams the tokens: intra-op threads that spin-wait on a
        # busy core make every step far slower than one thread less
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    name = args.served_model_name or default_served_name(args.model)
    config = engine_config(args)
    try:
        engine = LLMEngine(net, tokenizer, config, name, EngineMetrics(name))
    except (ValueError, OSError) as exc:
        sys.exit(f"miras-serve: {exc}")
    settings = ServerSettings(
        name, str(args.model), args.api_keys, args.allowed_origins, args.shutdown_timeout, args.sse_ping_interval,
        responses_max_count=args.responses_max_count, responses_max_bytes=int(args.responses_max_mb * (1 << 20)),
        responses_ttl=args.responses_ttl, state_cache_scope=args.state_cache_scope,
        metrics_require_key=args.metrics_require_key, max_request_bytes=args.max_request_bytes,
        max_prompt_chars=args.max_prompt_chars, request_read_timeout=args.request_read_timeout,
        tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
        playground=not args.disable_playground)
    tier = engine.state_cache.tier if engine.state_cache is not None else None
    tiers = tier.tiers if isinstance(tier, StackedTiers) else [tier]
    # stored responses live beside the saved states, under the same model identity
    disk = next((t for t in tiers if isinstance(t, DiskStateTier)), None)
    redis = next((t for t in tiers if isinstance(t, RedisStateTier)), None)
    responses_dir = str(disk.model_dir / "responses") if disk is not None else None
    shared = RedisResponses(redis.redis, redis.identity, args.responses_max_count, args.responses_ttl) \
        if redis is not None else None
    state = ServerState(AsyncEngine(engine, args.max_queued_requests), settings, responses_dir, shared)
    app = build_app(state)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, http=h11_protocol(args.request_read_timeout),
                            timeout_keep_alive=args.timeout_keep_alive, limit_concurrency=args.limit_concurrency)
    logger.info("serving %s (%s) on http://%s:%d", name, args.model, args.host, args.port)
    DrainingServer(config, state).run()


if __name__ == "__main__":
    main()
