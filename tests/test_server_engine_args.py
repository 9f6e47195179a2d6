"""EngineArgs: one statement of every engine and server argument, shared by the CLI, LLM, EngineConfig and
ServerSettings."""

from __future__ import annotations

import dataclasses
import re

import pytest

from miras_serve.server import LLM
from miras_serve.server.api import ServerSettings
from miras_serve.server.async_engine import AsyncEngine
from miras_serve.server.cli import build_parser, parse_args
from miras_serve.server.engine import EngineConfig
from miras_serve.server.engine_args import DEFAULTS, EngineArgs, GiB, flag


def test_every_field_is_a_flag_with_the_field_default():
    parsed = vars(build_parser().parse_args([]))
    assert parsed == {f.name: getattr(DEFAULTS, f.name) for f in dataclasses.fields(EngineArgs)}
    assert parse_args([]) == DEFAULTS


def test_engine_config_and_server_settings_default_to_engine_args():
    built, plain = EngineConfig.from_args(DEFAULTS), EngineConfig()
    # the CLI compiles the CPU decode step unless --enforce-eager; an embedded engine stays eager
    assert dataclasses.replace(built, compiled_steps=False) == plain
    assert plain.state_cache_bytes == int(DEFAULTS.state_cache_gb * GiB)
    assert ServerSettings.from_args(DEFAULTS, "m") == ServerSettings("m", str(DEFAULTS.model))
    assert AsyncEngine.__init__.__defaults__ == (DEFAULTS.max_queued_requests,)
    assert plain.step_threads is None  # the steps run on the constructing thread's torch threads


@pytest.mark.parametrize(("name", "value", "message"), [
    ("max_num_seqs", 0, "--max-num-seqs must be >= 1"),
    ("gpu_memory_utilization", float("nan"), "--gpu-memory-utilization must be in (0, 1]"),
    ("state_cache_gb", -1.0, "--state-cache-gb must be >= 0"),
    ("request_read_timeout", 0.0, "--request-read-timeout must be > 0"),
    ("dtype", "float64", "--dtype must be one of auto, float32, bfloat16, float16, got 'float64'"),
])
def test_bad_values_name_their_flag(name, value, message):
    with pytest.raises(ValueError) as info:
        EngineArgs(**{name: value})
    assert str(info.value) == message
    assert flag(name) in message


def test_llm_takes_engine_arguments_only_and_checks_them():
    with pytest.raises(TypeError, match="'port'"):
        LLM(port=8001)
    with pytest.raises(ValueError, match="--max-num-batched-tokens must be >= 1"):
        LLM(max_num_batched_tokens=0)
    assert {"max_num_seqs", "seed", "state_cache_gb", "device", "dtype"} <= EngineArgs.names("model", "engine")
    assert not {"port", "api_key", "sse_ping_interval"} & EngineArgs.names("model", "engine")


def test_auto_tool_choice_needs_a_parser():
    with pytest.raises(ValueError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        EngineArgs(enable_auto_tool_choice=True)


def test_sampling_ranges_are_stated_once():
    from miras_serve.server.protocol import ChatCompletionRequest, CompletionRequest
    from miras_serve.server.sampling_params import RANGES, ParamError, SamplingParams

    schema = CompletionRequest.model_json_schema()["properties"]
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "max_tokens", "logprobs"):
        (number,) = [s for s in schema[name]["anyOf"] if s["type"] != "null"]
        limits = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum"}
        assert {limits[k]: v for k, v in RANGES[name].field_limits().items()} == \
            {k: number[k] for k in limits.values() if k in number}, name
        assert schema[name]["default"] == getattr(SamplingParams(), name), name
        with pytest.raises(ParamError, match=re.escape(f"{name} must be {RANGES[name].describe()}")):
            SamplingParams(**{name: RANGES[name].low - 1})
    assert ChatCompletionRequest.model_json_schema()["properties"]["presence_penalty"] == schema["presence_penalty"]
