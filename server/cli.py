"""``miras-serve``: load a model and serve the OpenAI-compatible API with uvicorn.

SIGTERM (or Ctrl-C) drains: /health turns 503 and new requests are refused while in-flight ones get
``--shutdown-timeout`` seconds to finish; the rest end with finish_reason "abort", then the server exits.
A second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import logging
import sys
from dataclasses import replace
from types import FrameType

import uvicorn

from miras_serve import models

from .api import ServerSettings, ServerState, build_app
from .async_engine import AsyncEngine, reserve_intra_op_threads
from .engine import EngineConfig, LLMEngine
from .engine_args import EngineArgs
from .limits import h11_protocol
from .loader import DEFAULT_MODEL, default_served_name, load_model
from .metrics import EngineMetrics
from .response_store_redis import RedisResponses
from .state_tier_redis import RedisStateTier
from .state_tiers import DiskStateTier, StackedTiers

logger = logging.getLogger("miras.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("miras-serve", description="Serve a Miras model over an OpenAI-compatible API.")
    EngineArgs.add_cli_args(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> EngineArgs:
    parser = build_parser()
    try:
        args = EngineArgs(**vars(parser.parse_args(argv)))
    except ValueError as exc:  # a value out of its flag's range
        parser.error(str(exc))
    try:
        keys = args.api_keys
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"--api-key-file: {exc}")
    if args.metrics_require_key and not keys:
        parser.error("--metrics-require-key needs an API key (--api-key, --api-key-file or MIRAS_API_KEY)")
    return args


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


def freeze_startup_heap() -> int:
    """Make every object alive at start-up (torch, the model, dynamo's compiled steps, the app) permanent for
    Python's garbage collector, as vLLM does, and return how many it froze. Why: a full collection walks every
    tracked object, ~600,000 here (moneta-tiny), and took 290-440 ms, holding the GIL: every stream stalls for
    it. One comes once enough new objects have survived younger collections (saved responses, cached states'
    records): rarely, but in the middle of someone's stream. With the start-up heap frozen it took under 0.1 ms
    (one process, three collections each; docs/serving.md, "Host work per step"). Objects frozen still go when
    their last reference does; only a reference cycle among them would stay."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_threads = reserve_intra_op_threads()  # before any torch work here: the engine thread runs them
    try:
        net, tokenizer = load_model(args.model, args.device, args.dtype)
    except (models.CheckpointError, models.ConfigError, ValueError, OSError) as exc:
        hint = ""
        if args.model == DEFAULT_MODEL and DEFAULT_MODEL not in models.shipped_models():
            hint = f"\n(the default model {DEFAULT_MODEL!r} is not shipped in this build; pass --model DIR)"
        sys.exit(f"miras-serve: cannot load model: {exc}{hint}")
    name = args.served_model_name or default_served_name(args.model)
    try:
        config = replace(EngineConfig.from_args(args), step_threads=engine_threads)
        engine = LLMEngine(net, tokenizer, config, name, EngineMetrics(name))
    except (ValueError, OSError) as exc:
        sys.exit(f"miras-serve: {exc}")
    settings = ServerSettings.from_args(args, name)
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
    logger.info("froze %d start-up objects (the garbage collector skips them)", freeze_startup_heap())
    logger.info("serving %s (%s) on http://%s:%d", name, args.model, args.host, args.port)
    DrainingServer(config, state).run()


if __name__ == "__main__":
    main()
