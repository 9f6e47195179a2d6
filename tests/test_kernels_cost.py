"""The byte / FLOP model of one decode step (kernels.cost), against counts written out by hand."""

from __future__ import annotations

import pytest

from kernels.cost import decode_step_cost

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
