"""Every argument of the engine and the server, each stated once: its default, help text and allowed values.

``miras-serve``'s command line is generated from :class:`EngineArgs` (same flag names: ``--max-num-seqs``
for ``max_num_seqs``), the offline ``LLM(...)`` takes its keyword arguments through it, and the engine's
``EngineConfig`` and the HTTP layer's ``ServerSettings`` are built from it and take their defaults from
it. A test holds the Helm chart's ``server.*`` values to these defaults (tests/test_deploy_chart.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miras_serve.kernels import DOT_PRECISIONS

from .bounds import Bound
from .loader import DEFAULT_MODEL

TOOL_CALL_PARSERS = ("miras_json",)  # server/tool_calls.py
GiB, MiB = 1 << 30, 1 << 20

AT_LEAST_ONE = Bound(1)
NON_NEGATIVE = Bound(0)  # NaN fails too
POSITIVE = Bound(0, inclusive=False)
FRACTION = Bound(0, inclusive=False, high=1)


def arg(default: Any = None, help: str | None = None, *, group: str = "server", bound: Bound | None = None,
        choices: tuple[str, ...] | None = None, **argparse_options: Any) -> Any:
    """A field of EngineArgs. ``group``: "model" and "engine" arguments are also the offline LLM's keyword
    arguments, "server" ones belong to the HTTP server only. ``argparse_options``: how the flag is parsed when
    the field's type does not say (``action="append"``, ``nargs="*"``)."""
    metadata = dict(help=help, group=group, bound=bound, choices=choices, argparse=argparse_options)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class EngineArgs:
    model: str | Path = arg(DEFAULT_MODEL, "model directory or shipped model name (default: %(default)s)",
                            group="model")
    host: str = arg("127.0.0.1")
    port: int = arg(8000)
    served_model_name: str | None = arg(None, "name clients use in 'model' (default: from --model)")
    dtype: str = arg("auto", group="model", choices=("auto", "float32", "bfloat16", "float16"))
    device: str = arg("auto", group="model", choices=("auto", "cpu", "cuda"))
    api_key: list[str] = arg([], "require 'Authorization: Bearer KEY'; repeat for several keys, each a tenant of its "
                             "own (env MIRAS_API_KEY adds one more)", action="append")
    api_key_file: Path | None = arg(None, "file of API keys, one a line (blank lines and lines starting with # are "
                                    "skipped)")
    state_cache_scope: str = arg("api-key", "api-key: cached states are only restored for requests with the same API "
                                 "key (and cache_salt); shared: across keys (default: %(default)s)",
                                 choices=("api-key", "shared"))
    metrics_require_key: bool = arg(False, "/metrics requires an API key too")
    allowed_origins: list[str] = arg([], "CORS origins ('*' for any; default: no CORS)", nargs="*")
    max_num_seqs: int | None = arg(None, "state slots = most sequences decoding at once (default: as many as fit in "
                                   "--gpu-memory-utilization on a GPU, up to 1024; 64 on a CPU)", group="engine",
                                   bound=AT_LEAST_ONE)
    gpu_memory_utilization: float = arg(0.9, "fraction of the GPU's memory this server may use (weights, state pool, "
                                        "state cache, activations): sizes the state pool, or refuses a --max-num-seqs "
                                        "that does not fit", group="engine", bound=FRACTION)
    max_num_batched_tokens: int = arg(2048, "token budget of one engine step", group="engine", bound=AT_LEAST_ONE)
    # a guard only: state memory does not grow with the prompt
    max_prompt_tokens: int = arg(1_000_000, "prompt length guard (400 beyond)", group="engine", bound=AT_LEAST_ONE)
    seed: int = arg(0, "seed of the sampling of requests that give none (default: %(default)s)", group="engine")
    dot_precision: str | None = arg(None, "input precision of the GPU kernels' fp32 tensor-core products in prefill "
                                    "(default: MIRAS_DOT_PRECISION, else the evidence-based default of "
                                    "docs/precision.md; ieee is exact)", group="engine", choices=DOT_PRECISIONS)
    enforce_eager: bool = arg(False, "decode eagerly: without CUDA graphs on a GPU (default: replay the decode step "
                              "from graphs), without compiled steps on a CPU (default: torch.compile the decode step)",
                              group="engine")
    # a server argument: the offline LLM never compiles its decode step
    compile_backend: str = arg("inductor", "torch.compile backend of the CPU's compiled decode steps: inductor "
                               "generates C++ code; aot_eager traces the same graphs and runs them eagerly (tests, "
                               "debugging: compiles in seconds)", choices=("inductor", "aot_eager"))
    state_cache_gb: float = arg(1.0, "memory for recurrent states of earlier prompts and replies, restored when a "
                                "prompt repeats or extends one (the next turn of a chat): prefix caching; 0 disables",
                                group="engine", bound=NON_NEGATIVE)
    state_disk_dir: str | None = arg(None, "directory for saved states and stored responses on local disk, behind the "
                                     "in-memory cache: they survive a restart (default: none, memory only)",
                                     group="engine")
    state_disk_gb: float = arg(10.0, "disk for saved states (least recently used go first)", group="engine",
                               bound=NON_NEGATIVE)
    state_disk_ttl: float = arg(0.0, "seconds after its last use that a saved state on disk expires; 0: never",
                                group="engine", bound=NON_NEGATIVE)
    state_redis_url: str | None = arg(None, "shared store for saved states and stored responses, read and written by "
                                      "every replica (redis://host:port/db), below the local tiers: a conversation "
                                      "continues on any replica (default: none)", group="engine")
    state_redis_gb: float = arg(4.0, "bytes of saved states in the shared store, for all replicas (least recently "
                                "used go first)", group="engine", bound=NON_NEGATIVE)
    state_redis_ttl: float = arg(0.0, "seconds after its last use that a saved state in the shared store expires; 0: "
                                 "never", group="engine", bound=NON_NEGATIVE)
    responses_max_count: int = arg(10_000, "stored responses (Responses API) kept per tenant; the oldest go first",
                                   bound=AT_LEAST_ONE)
    responses_max_mb: float = arg(256.0, "memory for stored responses per tenant", bound=NON_NEGATIVE)
    responses_ttl: float = arg(30 * 24 * 3600.0, "seconds a stored response is kept after its creation; 0: no limit",
                               bound=NON_NEGATIVE)
    sse_ping_interval: float = arg(30.0, "seconds a stream may stay silent (long prefill, full queue) before it gets "
                                   "an SSE comment ping; 0 disables", bound=NON_NEGATIVE)
    max_queued_requests: int = arg(256, "waiting requests before 429", bound=AT_LEAST_ONE)
    max_request_bytes: int | None = arg(None, "largest request body, refused with 413 before it is read (default: 16 "
                                        "bytes per --max-prompt-tokens + 1 MiB)", bound=AT_LEAST_ONE)
    max_prompt_chars: int | None = arg(None, "longest text prompt or chat, refused before tokenizing (default: the "
                                       "longest text that could fit --max-prompt-tokens: that times the longest "
                                       "token's bytes)", bound=AT_LEAST_ONE)
    request_read_timeout: float = arg(30.0, "seconds a client has to send a request's headers, and again its body "
                                      "(408, or the connection closed, beyond)", bound=POSITIVE)
    timeout_keep_alive: float = arg(5.0, "seconds an idle keep-alive connection stays open", bound=POSITIVE)
    limit_concurrency: int = arg(1024, "open connections (streams included) beyond which new requests get 503",
                                 bound=AT_LEAST_ONE)
    shutdown_timeout: float = arg(30.0, "seconds in-flight requests get on SIGTERM", bound=NON_NEGATIVE)
    enable_auto_tool_choice: bool = arg(False, 'allow tool_choice "auto": the model decides whether to call tools, '
                                        "and --tool-call-parser finds the calls in its output")
    tool_call_parser: str | None = arg(None, "how tool calls are read from a model's output under \"auto\" "
                                       "(miras_json: the shipped chat format's JSON array of {name, arguments}; "
                                       "docs/serving.md#tool-calls)", choices=TOOL_CALL_PARSERS)
    disable_playground: bool = arg(False, "do not serve the playground page at / (then / is 404)")
    log_level: str = arg("info", choices=("critical", "error", "warning", "info", "debug"))

    def __post_init__(self) -> None:
        """Raise ValueError naming the flag for a value out of its range or choices (the CLI turns it into
        argparse's usage error, exit status 2)."""
        for f in dataclasses.fields(self):
            value, bound, choices = getattr(self, f.name), f.metadata["bound"], f.metadata["choices"]
            if value is None:
                continue
            if bound is not None and not bound.holds(value):
                raise ValueError(f"{flag(f.name)} must be {bound.describe()}")
            if choices is not None and value not in choices:
                raise ValueError(f"{flag(f.name)} must be one of {', '.join(choices)}, got {value!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")

    @property
    def api_keys(self) -> list[str]:
        """The keys of --api-key, --api-key-file and env MIRAS_API_KEY, each once (reads the file: OSError)."""
        keys = list(self.api_key)
        if self.api_key_file is not None:
            lines = (line.strip() for line in Path(self.api_key_file).read_text(encoding="utf-8").splitlines())
            keys += [line for line in lines if line and not line.startswith("#")]
        if os.environ.get("MIRAS_API_KEY"):
            keys.append(os.environ["MIRAS_API_KEY"])
        return list(dict.fromkeys(keys))

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field: ``--field-name``, its default, help and choices; the type from the annotation."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            options: dict[str, Any] = {"default": f.default_factory() if f.default is dataclasses.MISSING
                                       else f.default, **f.metadata["argparse"]}
            if f.metadata["help"] is not None:
                options["help"] = f.metadata["help"]
            if f.metadata["choices"] is not None:
                options["choices"] = f.metadata["choices"]
            kind = _value_type(hints[f.name])
            if kind is bool:
                options["action"] = "store_true"
            elif "action" not in options and kind is not list:
                options["type"] = kind
            parser.add_argument(flag(f.name), **options)

    @classmethod
    def names(cls, *groups: str) -> set[str]:
        """The fields of the given groups ("model", "engine", "server")."""
        return {f.name for f in dataclasses.fields(cls) if f.metadata["group"] in groups}


def flag(name: str) -> str:
    """``max_num_seqs`` -> ``--max-num-seqs``."""
    return "--" + name.replace("_", "-")


def _value_type(hint: Any) -> type:
    """The type a flag parses to: ``int | None`` -> int, ``str | Path`` -> str, ``list[str]`` -> list."""
    if isinstance(hint, types.UnionType):
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    return typing.get_origin(hint) or hint


DEFAULTS = EngineArgs()  # what EngineConfig, ServerSettings and the async engine default to
