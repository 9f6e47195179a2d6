"""Miras Serve: a continuous-batching engine and an OpenAI-compatible HTTP server for Miras models."""

from .engine import EngineConfig, LLMEngine
from .engine_args import EngineArgs
from .llm import LLM
from .outputs import CompletionOutput, RequestOutput, TokenLogprob
from .sampling_params import ParamError, SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineArgs", "EngineConfig", "LLMEngine", "ParamError", "RequestOutput",
           "SamplingParams", "TokenLogprob"]
