"""The offline API for batch jobs and tests: ``LLM(model=...).generate(prompts, params)``, like vLLM's."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from .engine import EngineConfig, LLMEngine
from .loader import DEFAULT_MODEL, default_served_name, load_model
from .outputs import RequestOutput
from .sampling_params import SamplingParams

PromptInput = str | list[int]


class LLM:
    """Loads a model and runs every given prompt to completion through the continuous-batching engine."""

    def __init__(self, model: str | Path = DEFAULT_MODEL, *, device: str = "auto", dtype: str = "auto",
                 max_num_seqs: int | None = None, max_num_batched_tokens: int = 2048,
                 max_prompt_tokens: int = 1_000_000, seed: int = 0, enforce_eager: bool = False,
                 state_cache_gb: float = 1.0, gpu_memory_utilization: float = 0.9):
        net, tokenizer = load_model(model, device, dtype)
        config = EngineConfig(max_num_seqs, max_num_batched_tokens, max_prompt_tokens, seed,
                              cuda_graphs=False if enforce_eager else None,
                              state_cache_bytes=int(state_cache_gb * (1 << 30)),
                              gpu_memory_utilization=gpu_memory_utilization)
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
