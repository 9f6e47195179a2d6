"""Sizing the state pool from device memory (--gpu-memory-utilization), with the device's free and total
memory injected: the arithmetic, the engine's sized pool, and the start-up refusal of a pool that does not fit."""

from __future__ import annotations

from functools import partial

import pytest
from conftest import small_model

from miras_serve.server import cli
from miras_serve.server.engine import EngineConfig, LLMEngine
from miras_serve.server.pool_sizing import CPU_MAX_NUM_SEQS, SAMPLER_BYTES_PER_TOKEN, PoolSizeError, plan_pool

GIB, MIB = 1 << 30, 1 << 20


def test_unrequested_pool_takes_what_is_left_after_weights_cache_and_activations():
    # 140 GiB device, 0.9 of it allowed = 126 GiB; 6 GiB in use; 2 GiB reserved -> 118 GiB for the pool
    per_sequence = 100 * MIB + SAMPLER_BYTES_PER_TOKEN * 32000
    plan = plan_pool(100 * MIB, 32000, free=134 * GIB, total=140 * GIB, utilization=0.9, reserved=2 * GIB,
                     requested=None, extra_slots=1, limit=10_000)
    available = int(0.9 * 140 * GIB) - 6 * GIB - 2 * GIB
    assert plan.available == available and plan.bytes_per_sequence == per_sequence
    assert plan.max_num_seqs == available // per_sequence - 1  # the graphs' padding row needs a slot too
    assert (plan.max_num_seqs + 1) * per_sequence <= available < (plan.max_num_seqs + 2) * per_sequence
    capped = plan_pool(100 * MIB, 32000, 134 * GIB, 140 * GIB, 0.9, 2 * GIB, None, 1, limit=256)
    assert capped.max_num_seqs == 256
    assert "256 sequences x 101.0 MiB" in capped.describe(1)


def test_requested_pool_is_checked_and_refused_with_the_numbers():
    args = dict(state_bytes=100 * MIB, vocab_size=32000, free=134 * GIB, total=140 * GIB, utilization=0.9,
                reserved=2 * GIB, extra_slots=1)
    assert plan_pool(**args, requested=1000).max_num_seqs == 1000
    with pytest.raises(PoolSizeError) as info:
        plan_pool(**args, requested=2000)
    message = str(info.value)
    assert "--max-num-seqs 2000 needs 197.32 GiB" in message and "118.00 GiB is available" in message
    assert "--gpu-memory-utilization 0.9 of 140.0 GiB" in message
    with pytest.raises(PoolSizeError, match="no room for the state of one sequence"):
        plan_pool(**{**args, "free": 15 * GIB}, requested=None)  # 125 GiB already used by others


def test_engine_sizes_its_pool_from_device_memory(tokenizer):
    model = small_model("moneta")
    state_bytes = model.init_state(1).nbytes_per_sequence()
    per_sequence = state_bytes + SAMPLER_BYTES_PER_TOKEN * tokenizer.vocab_size
    total = 1000 * per_sequence
    config = EngineConfig(max_num_batched_tokens=64, state_cache_bytes=10 * per_sequence, cuda_graphs=False)
    engine = LLMEngine(model, tokenizer, config, device_memory=(total, total))
    assert engine.config.max_num_seqs == 64 - model.config.chunk_size  # the step budget caps it
    config.max_num_batched_tokens = 4096
    engine = LLMEngine(model, tokenizer, config, device_memory=(total, total))
    assert engine.config.max_num_seqs == int(0.9 * total) // per_sequence - 10
    assert engine.pool.batch_size == engine.config.max_num_seqs
    assert LLMEngine(model, tokenizer, EngineConfig(cuda_graphs=False)).config.max_num_seqs == CPU_MAX_NUM_SEQS
    with pytest.raises(PoolSizeError, match="--max-num-seqs 2000 needs"):
        LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2000, max_num_batched_tokens=4096),
                  device_memory=(total, total))


def test_cli_refuses_at_startup_a_pool_that_does_not_fit(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(cli, "LLMEngine", partial(LLMEngine, device_memory=(1 << 20, 1 << 20)))
    with pytest.raises(SystemExit) as info:
        cli.main(["--model", str(tiny_checkpoint), "--max-num-seqs", "8", "--log-level", "warning"])
    assert "miras-serve: --max-num-seqs 8 needs" in str(info.value)


@pytest.mark.parametrize("value", ["0", "1.5", "nan"])
def test_gpu_memory_utilization_must_be_a_fraction(value, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--gpu-memory-utilization", value])
    assert "--gpu-memory-utilization must be in (0, 1]" in capsys.readouterr().err
    assert cli.parse_args([]).max_num_seqs is None and cli.parse_args([]).gpu_memory_utilization == 0.9
