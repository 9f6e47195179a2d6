"""The offline API for batch jobs and tests: ``LLM(model=...).generate(prompts, params)``, like vLLM's."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .engine import EngineConfig, LLMEngine
from .engine_args import EngineArgs
from .loader import DEFAULT_MODEL, default_served_name, load_model
from .outputs import RequestOutput
from .sampling_params import SamplingParams

PromptInput = str | list[int]


class LLM:
    """Loads a model and runs every given prompt to completion through the continuous-batching engine."""

    def __init__(self, model: str | Path = DEFAULT_MODEL, **engine_args: Any):
        """``engine_args``: the engine's arguments of EngineArgs (server/engine_args.py: ``device``, ``dtype``,
        ``max_num_seqs``, ``state_cache_gb``, ``seed``, ...), with the server's defaults and checks (ValueError
        naming the flag for a bad value; TypeError for a name that is not an engine argument)."""
        unknown = sorted(set(engine_args) - EngineArgs.names("model", "engine"))
        if unknown:
            raise TypeError(f"LLM() got an unexpected keyword argument {unknown[0]!r}")
        args = EngineArgs(model=model, **engine_args)
        net, tokenizer = load_model(args.model, args.device, args.dtype)
        # an embedded engine does not compile the CPU decode step (tens of seconds at start-up) as the server does
        config = replace(EngineConfig.from_args(args), compiled_steps=False)
        self.engine = LLMEngine(net, tokenizer, config, default_served_name(model))
        self.tokenizer = tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 add_bos: bool = True) -> list[RequestOutput]:
        """Text prompts are tokenized (with BOS unless ``add_bos=False``); token-id lists are used as given.
        Returns one finished RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        results: dict[str, RequestOutput] = {}
        order = []
        for prompt, p in zip(prompts, params, strict=True):
            ids = self.tokenizer.encode(prompt, add_bos=add_bos) if isinstance(prompt, str) else list(prompt)
            request_id = str(next(self._ids))
            self.engine.add_request(request_id, ids, p, prompt if isinstance(prompt, str) else None)
            results[request_id] = RequestOutput(request_id, ids, [], prompt=prompt if isinstance(prompt, str) else None)
            order.append(request_id)
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                results[delta.request_id].merge(delta)
        return [results[r] for r in order]

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """One conversation or a list of them, rendered with the tokenizer's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        return self.generate(prompts, sampling_params)
