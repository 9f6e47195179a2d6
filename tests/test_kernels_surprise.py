"""Surprise on the Triton backend (under the interpreter without a GPU): the prefill kernel (running and
factored layouts), the factored decode (fused kernel for every row, and fused + split kernels) and the
running layout's split decode give each token's loss at its chunk's anchor, equal to the loss computed
separately from the reference memory (tests/test_models_surprise.py), for every rule; and the model's
surprise on triton equals the torch backend's."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest

pytest.importorskip("triton")

from conftest import small_model  # noqa: E402
from test_models_surprise import GATES, close, reference_surprise  # noqa: E402

from benchmarks.kernel_cases import RULES, rule_case, rule_config  # noqa: E402
from miras_serve.kernels.scan import Factors, scan_pool  # noqa: E402
from miras_serve.kernels.testing import random_inputs  # noqa: E402
from miras_serve.models.backend import factored_scan, forced_backend, memory_scan  # noqa: E402
from miras_serve.models.memory import factored_fresh  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")
B, T, PROMPT = 2, 6, 3  # chunk 4: the prompt ends mid-chunk, decode crosses a boundary


def nan(*shape: int) -> torch.Tensor:
    return torch.full(shape, float("nan"))


@pytest.mark.parametrize("rule", sorted(RULES))
@torch.inference_mode()
def test_triton_surprise_prefill_then_decode(rule):
    cfg = rule_config(rule)
    x = random_inputs(rule_case(cfg), B, T, torch.Generator().manual_seed(5))
    memory = x["memory"]
    ref = reference_surprise(cfg, x, memory, T)
    gates = [x[name] for name in GATES]
    pos = torch.zeros(B, dtype=torch.long)
    valid = torch.ones(B, T, dtype=torch.bool)
    ln = (x["ln_weight"], x["ln_bias"])

    def tokens(start: int, end: int) -> list[torch.Tensor | None]:
        return [None if g is None else g[:, :, start:end].contiguous() for g in gates]

    with forced_backend("triton"):
        whole = nan(B, cfg.n_heads, T)
        memory_scan(cfg, memory, memory, pos, *gates, valid, *ln, whole)
        assert close(ref, whole), "parallel prefill"
        # the running layout: a prompt, then one-token steps (MLP: the split decode for mid-chunk rows)
        parts = [nan(B, cfg.n_heads, PROMPT)]
        _, anchor, running = memory_scan(cfg, memory, memory, pos, *tokens(0, PROMPT), valid[:, :PROMPT], *ln,
                                         parts[0])
        for t in range(PROMPT, T):
            parts.append(nan(B, cfg.n_heads, 1))
            _, anchor, running = memory_scan(cfg, anchor, running, pos + t, *tokens(t, t + 1), valid[:, :1], *ln,
                                             parts[-1])
        assert close(ref, torch.cat(parts, dim=-1)), "running layout: prefill + decode"
        if cfg.memory != "mlp":
            return
        # the factored layout: the FACTORED prefill, then the factored decode (fused + split kernels)
        state = factored_fresh(cfg, memory)
        parts = [nan(B, cfg.n_heads, PROMPT)]
        _, state = factored_scan(cfg, state, pos, *tokens(0, PROMPT), valid[:, :PROMPT], *ln, parts[0])
        after_prompt = state
        for t in range(PROMPT, T):
            parts.append(nan(B, cfg.n_heads, 1))
            _, state = factored_scan(cfg, state, pos + t, *tokens(t, t + 1), valid[:, :1], *ln, parts[-1])
        assert close(ref, torch.cat(parts, dim=-1)), "factored layout: prefill + decode"
        # the fused decode kernel for every row (SPLIT_D=0), straight on a pool
        anchor = tuple(w.clone() for w in after_prompt.anchor)
        factors = Factors(*(t.clone() for t in after_prompt[1:]))
        slots, ones = torch.arange(B), torch.ones(B, dtype=torch.long)
        for t in range(PROMPT, T):
            got = nan(B, cfg.n_heads, 1)
            scan_pool(cfg.memory_rule(), anchor, factors, slots, pos + t, *tokens(t, t + 1), *ln, lengths=ones,
                      launch={"SPLIT_D": 0}, surprise=got)
            assert close(ref[..., t:t + 1], got), f"fused factored decode, token {t}"


@torch.inference_mode()
def test_triton_model_surprise_equals_torch():
    model = small_model("yaad-h", seed=3)
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    surprise = {}
    for backend in ("torch", "triton"):
        with forced_backend(backend):
            full = nan(2, 7, len(model.miras_layers))
            model(ids, surprise=full)
            first = nan(2, 4, len(model.miras_layers))
            _, state = model(ids[:, :4], surprise=first)
            steps = [first]
            for t in range(4, 7):
                steps.append(nan(2, 1, len(model.miras_layers)))
                _, state = model(ids[:, t:t + 1], state, surprise=steps[-1])
            assert close(full, torch.cat(steps, dim=1)), backend
            surprise[backend] = full
    assert close(surprise["torch"], surprise["triton"])
