"""Surprise (models/SPEC.md §4): each token's attentional-bias loss at its chunk's anchor, computed in the
pass the model makes anyway, equals the loss the per-token reference (kernels/naive.py) computes, for every
rule, in the parallel scan, the factored prefill and decode, the slot pool and batches of any lengths."""

from __future__ import annotations

import pytest
import torch
from conftest import small_model
from torch import Tensor

from benchmarks.kernel_cases import RULES, rule_case, rule_config
from miras_serve import models
from miras_serve.kernels import naive
from miras_serve.kernels.testing import random_inputs
from miras_serve.models.backend import factored_scan, factored_scan_pool, forced_backend, memory_scan, memory_scan_pool
from miras_serve.models.config import MirasConfig
from miras_serve.models.memory import factored_fresh

GATES = ("q", "k", "v", "eta", "log_alpha", "delta")
TOL = 1e-5


def reference_surprise(cfg: MirasConfig, x: dict, memory: tuple, T: int) -> Tensor:
    """Token t's loss at its chunk's anchor, from the per-token reference (kernels/naive.py) started at
    ``memory``."""
    B = x["q"].shape[0]
    surprise = torch.full((B, cfg.n_heads, T), float("nan"))
    naive.memory_scan(cfg.memory_rule(), memory, memory, torch.zeros(B, dtype=torch.long), *(x[n] for n in GATES),
                      torch.ones(B, T, dtype=torch.bool), x["ln_weight"], x["ln_bias"], surprise)
    return surprise


def close(ref: Tensor, got: Tensor) -> bool:
    return bool(torch.isfinite(got).all()) and ((ref - got).norm() / ref.norm()).item() < TOL


@pytest.mark.parametrize("rule", sorted(RULES))
@torch.inference_mode()
def test_scan_surprise_is_the_loss_at_the_anchor(rule):
    cfg = rule_config(rule)
    gen = torch.Generator().manual_seed(17)
    B, T = 2, 11  # crosses two chunk boundaries (chunk 4)
    x = random_inputs(rule_case(cfg), B, T, gen)
    memory = x["memory"]
    ref = reference_surprise(cfg, x, memory, T)
    gates = [x[name] for name in GATES]
    pos = torch.zeros(B, dtype=torch.long)
    valid = torch.ones(B, T, dtype=torch.bool)
    got = torch.full((B, cfg.n_heads, T), float("nan"))
    with forced_backend("torch"):
        memory_scan(cfg, memory, memory, pos, *gates, valid, x["ln_weight"], x["ln_bias"], got)
    assert close(ref, got), (ref, got)
    if cfg.memory != "mlp":
        return
    # The factored layout: one prefill of 6 tokens, then decode steps, one token at a time.
    def tokens(start: int, end: int) -> list[Tensor | None]:
        return [None if g is None else g[:, :, start:end] for g in gates]

    state = factored_fresh(cfg, memory)
    parts = [torch.full((B, cfg.n_heads, 6), float("nan"))]
    with forced_backend("torch"):
        _, state = factored_scan(cfg, state, pos, *tokens(0, 6), valid[:, :6], x["ln_weight"], x["ln_bias"], parts[0])
        for t in range(6, T):
            parts.append(torch.full((B, cfg.n_heads, 1), float("nan")))
            _, state = factored_scan(cfg, state, pos + t, *tokens(t, t + 1), valid[:, :1], x["ln_weight"],
                                     x["ln_bias"], parts[-1])
    assert close(ref, torch.cat(parts, dim=-1))


@pytest.mark.parametrize("rule", ["moneta", "linear"])
@torch.inference_mode()
def test_pool_surprise_for_the_rows_it_runs(rule):
    """In a slot pool, rows in any slot order and skipped rows (negative slot): each row gets its own."""
    cfg = rule_config(rule)
    gen = torch.Generator().manual_seed(3)
    x = random_inputs(rule_case(cfg), 3, 5, gen)
    memory = x["memory"]
    ref = reference_surprise(cfg, x, memory, 5)
    gates = [x[name] for name in GATES]
    slots = torch.tensor([2, -1, 0])
    got = torch.full((3, cfg.n_heads, 5), float("nan"))
    pool_memory = tuple(w[[2, 1, 0]].clone() for w in memory)  # slot s holds row 2 - s
    lengths = torch.full((3,), 5)
    pos = torch.zeros(3, dtype=torch.long)
    with forced_backend("torch"):
        if cfg.memory == "mlp":
            factored_scan_pool(cfg, factored_fresh(cfg, pool_memory), slots, pos, *gates, lengths,
                               x["ln_weight"], x["ln_bias"], got)
        else:
            memory_scan_pool(cfg, tuple(w.clone() for w in pool_memory), pool_memory, slots, pos, *gates, lengths,
                             x["ln_weight"], x["ln_bias"], got)
    assert close(ref[[0, 2]], got[[0, 2]])
    assert not got[1].any()  # a skipped row: 0


def model_surprise(model: models.MirasLM, ids: Tensor, state=None, **kw) -> tuple[Tensor, Tensor, object]:
    out = torch.full((*ids.shape, len(model.miras_layers)), float("nan"))
    logits, state = model(ids, state, surprise=out, **kw)
    return out, logits, state


@pytest.mark.parametrize("preset", sorted(p for p in models.PRESETS if "M" in models.preset_config(p).layer_kinds))
@torch.inference_mode()
def test_model_surprise_parallel_equals_prefill_decode_and_batched(preset):
    model = small_model(preset, seed=5)
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=gen)
    with forced_backend("torch"):
        full, logits, _ = model_surprise(model, ids)
        plain, _ = model(ids)
        assert torch.equal(logits, plain)  # asking for surprise changes nothing else
        first, _, state = model_surprise(model, ids[:, :5])
        steps = [first]
        for t in range(5, 10):
            s, _, state = model_surprise(model, ids[:, t:t + 1], state)
            steps.append(s)
        assert close(full, torch.cat(steps, dim=1))
        # a slot pool: row 1 runs a shorter prompt, in slot 0, beside row 0 in slot 3
        pool = model.init_state(4)
        got, _, _ = model_surprise(model, ids, pool, lengths=torch.tensor([10, 6]), slots=torch.tensor([3, 0]))
        assert close(full[0], got[0]) and close(full[1, :6], got[1, :6])
    assert len(model.miras_layers) == sum(kind == "M" for kind in model.config.layer_kinds)
    assert full.shape[-1] == len(model.miras_layers) and bool((full >= 0).all())
