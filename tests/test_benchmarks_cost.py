"""The byte / FLOP model of one decode step and the FLOP model of a prefill chunk (benchmarks.cost), against
counts written out by hand."""

from __future__ import annotations

import pytest

from benchmarks.cost import decode_step_cost, prefill_chunk_flops, prefill_flops

# The paper's 340M shape: 24 Miras layers, 16 heads x 64, expansion 4, chunk 64.
SHAPE_340M = dict(head_dim=64, hidden=256, chunk_size=64, n_heads=16, n_miras_layers=24)


def test_running_layout_moves_three_memories_per_step():
    """Today's layout: read anchor and running memory, write the running memory (151 MB per sequence at
    the 340M shape, the figure the H200 measurement was reported against); a chunk start also writes
    the anchor."""
    m = 2 * 64 * 256 * 4 * 16 * 24  # bytes of one memory per sequence
    mid = decode_step_cost("running", "mlp", **SHAPE_340M, batch=1, weight_bytes=0, filled_rows=5)
    assert (mid.state_bytes_read, mid.state_bytes_written) == (2 * m, m)
    assert mid.state_bytes_read + mid.state_bytes_written == pytest.approx(151e6, rel=2e-3)
    assert mid.state_bytes_per_sequence == 2 * m
    start = decode_step_cost("running", "mlp", **SHAPE_340M, batch=1, weight_bytes=0, filled_rows=64)
    assert start.state_bytes_written == 2 * m


def test_factored_layout_counts_by_hand():
    """One head, d = 2, D = 3, b = 4: memory 12 entries, rows of 2 (3 + 2) = 10 entries."""
    shape = dict(head_dim=2, hidden=3, chunk_size=4, n_heads=1, n_miras_layers=1)
    two = decode_step_cost("factored", "mlp", **shape, batch=1, weight_bytes=100, filled_rows=2)
    # reads: anchor 12 + 2 rows 20 + 2 coefficients + decay; writes: a row 10 + 3 coefficients + decay
    assert two.state_bytes_read == 4 * (12 + 20 + 2 + 1)
    assert two.state_bytes_written == 4 * (10 + 3 + 1)
    # gradient 3 x 2Dd + read 2 x 2Dd + 3 rows (the new one too) x 4 (D + d)
    assert two.flops == 3 * 12 + 2 * 12 + 3 * 4 * 5
    assert two.state_bytes_per_sequence == 4 * (12 + 4 * 10 + 4 + 1)
    assert two.total_bytes == two.state_bytes_read + two.state_bytes_written + 100
    fold = decode_step_cost("factored", "mlp", **shape, batch=1, weight_bytes=0, filled_rows=4)
    assert fold.state_bytes_read == 4 * (12 + 4 * 10 + 1)  # anchor + every row of the finished chunk
    # the new anchor, row 0 and the 3 others cleared, 4 coefficients, the decay
    assert fold.state_bytes_written == 4 * (12 + 4 * 10 + 4 + 1)
    average = decode_step_cost("factored", "mlp", **shape, batch=3, weight_bytes=0)
    steps = [decode_step_cost("factored", "mlp", **shape, batch=3, weight_bytes=0, filled_rows=f) for f in (4, 1, 2, 3)]
    assert average.state_bytes_read == pytest.approx(sum(s.state_bytes_read for s in steps) / 4)
    assert average.flops == pytest.approx(sum(s.flops for s in steps) / 4)


def test_factored_layout_moves_fewer_bytes_at_the_340m_shape():
    running = decode_step_cost("running", "mlp", **SHAPE_340M, batch=256, weight_bytes=0)
    factored = decode_step_cost("factored", "mlp", **SHAPE_340M, batch=256, weight_bytes=0)
    ratio = running.total_bytes / factored.total_bytes
    assert 1.7 <= ratio < 2.0
    # The state held per sequence grows a little (memory + 64 rows vs two memories) but stays fixed.
    assert 1.0 < factored.state_bytes_per_sequence / running.state_bytes_per_sequence < 1.2


def test_linear_memory_trade_off():
    """The linear memory's d x d matrix is smaller than a chunk of its rows (k, g): factored it would move
    fewer bytes per step but hold 1.5x the state per sequence."""
    shape = dict(SHAPE_340M, hidden=0)
    running = decode_step_cost("running", "linear", **shape, batch=1, weight_bytes=0, filled_rows=5)
    factored = decode_step_cost("factored", "linear", **shape, batch=1, weight_bytes=0, filled_rows=5)
    heads = 16 * 24
    assert running.state_bytes_read + running.state_bytes_written == 4 * 3 * 64 * 64 * heads
    assert factored.state_bytes_read == 4 * (64 * 64 + 5 * 128 + 5 + 1) * heads
    assert factored.state_bytes_per_sequence == 4 * (64 * 64 + 64 * 128 + 64 + 1) * heads
    assert factored.state_bytes_per_sequence > 1.5 * running.state_bytes_per_sequence


@pytest.mark.parametrize("kwargs,match", [(dict(layout="rows"), "layout"), (dict(memory="conv"), "memory"),
                                          (dict(filled_rows=65), "filled_rows")])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(layout="factored", memory="mlp", **SHAPE_340M, batch=1, weight_bytes=0) | kwargs
    layout, memory = args.pop("layout"), args.pop("memory")
    with pytest.raises(ValueError, match=match):
        decode_step_cost(layout, memory, **args)


def matmul(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def test_prefill_chunk_flops_by_hand():
    """One head, d = 2, D = 3, a chunk of n = 2 tokens: every product of memory_segment's dual form."""
    d, D, n = 2, 3, 2
    mlp = [matmul(n, d, D),  # z = k A_in^T
           matmul(n, D, d),  # u = gelu(z) A_out^T
           matmul(n, d, D),  # gz = gu A_out
           matmul(n, d, D),  # q W_in^T
           matmul(n, d, n),  # q k^T
           matmul(n, n, D),  # (C o qk) gz
           matmul(n, D, d),  # gelu(zq) W_out^T
           matmul(n, D, n),  # scores gelu(zq) a^T
           matmul(n, n, d),  # (C o scores) gu
           matmul(D, n, d),  # W_in update gz^T (last o k)
           matmul(d, n, D)]  # W_out update gu^T (last o a)
    assert sum(mlp) == 248
    assert prefill_chunk_flops("mlp", head_dim=d, hidden=D, tokens=n) == 248
    lag_step = matmul(1, d, D) + matmul(1, D, d) + matmul(1, d, D) + matmul(D, 1, d) + matmul(d, 1, D)
    assert prefill_chunk_flops("mlp", head_dim=d, hidden=D, tokens=n, retention="kl") == 248 + lag_step
    linear = [matmul(n, d, d), matmul(n, d, d), matmul(n, d, n), matmul(n, n, d), matmul(d, n, d)]
    assert prefill_chunk_flops("linear", head_dim=d, hidden=D, tokens=n) == sum(linear) == 80
    with pytest.raises(ValueError, match="memory"):
        prefill_chunk_flops("attention", head_dim=d, hidden=D, tokens=n)


def test_prefill_flops_counts_full_chunks_and_the_partial_last_one():
    shape = dict(head_dim=64, hidden=256, chunk_size=64)
    chunk = prefill_chunk_flops("mlp", head_dim=64, hidden=256, tokens=64)
    # 340M shape: 14 d D + 4 b (D + d) = 311,296 FLOPs per token and head (the H200 run's 0.31 MFLOP)
    assert chunk / 64 == 14 * 64 * 256 + 4 * 64 * 320 == 311_296
    total = prefill_flops("mlp", **shape, tokens=8192 + 5, n_heads=16, batch=8)
    assert total == 8 * 16 * (128 * chunk + prefill_chunk_flops("mlp", head_dim=64, hidden=256, tokens=5))
