"""What one decode step must move and compute, per state layout, and what one prefill chunk must compute:
the yardsticks every decode and prefill measurement is reported against (the GPU check, ``benchmarks.runtime``).

Pure arithmetic on the model's shape (it imports nothing of the project). All state is fp32. Per Miras
layer and head, with head dim ``d``, memory hidden ``D`` and chunk size ``b``, the memory has ``M``
entries (``2 D d`` for the MLP memory, ``d d`` for the linear one) and the two layouts hold:

* ``running``: the chunk anchor and the running memory (``2 M``). A step reads both (the gradient at
  the anchor, the read at the running memory) and writes the running memory; the token that starts a
  chunk also writes the new anchor.
* ``factored``: the anchor, ``b`` factor rows of ``R`` entries (``2 (D + d)`` for the MLP memory:
  ``k, gz, a, gu``; ``2 d`` for the linear one: ``k, g``), ``b`` row coefficients and one decay. A step
  reads the anchor once and the ``f`` rows filled so far, and writes one row and the ``f + 1``
  coefficients; the token that starts a chunk first folds the ``b`` rows of the finished chunk into the
  new anchor (reads them, writes the anchor and clears the rows: unwritten rows hold 0).

The FLOPs are the memory's only (the dense layers' ``2 x parameters x batch`` are the caller's to add):
the gradient of the new token at the anchor, the read of its query, and the update (``running``: both
matrices rewritten; ``factored``: the rows' dot products, and the fold once per chunk).

A prefill chunk is counted by its matrix products (``prefill_chunk_flops``, 2 m k n FLOPs for an
[m, k] x [k, n] product), as the dual form of models.memory.memory_segment writes them: the useful work,
not what a kernel recomputes, and not the elementwise work (activations, LayerNorms, gates).
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("running", "factored")
MEMORIES = ("mlp", "linear")
FP32 = 4


@dataclass(frozen=True)
class StepCost:
    """One decode step of a batch: bytes of state and weights it must move, and the memory's FLOPs.

    ``state_bytes_read`` / ``state_bytes_written`` cover the whole batch (all Miras layers and heads);
    ``weight_bytes`` is read once per step whatever the batch; ``state_bytes_per_sequence`` is the size
    of one sequence's memory state in this layout (what a state pool holds per slot, short-convolution
    cache and attention ring buffers excluded)."""

    state_bytes_read: float
    state_bytes_written: float
    weight_bytes: float
    flops: float
    state_bytes_per_sequence: float

    @property
    def total_bytes(self) -> float:
        return self.state_bytes_read + self.state_bytes_written + self.weight_bytes


def _head_step(layout: str, memory: str, d: int, D: int, b: int, f: float) -> tuple[float, float, float, float]:
    """(entries read, entries written, FLOPs, entries held) of one head of one sequence in one step that
    finds ``f`` rows filled (``f == b``: the chunk is complete and this token folds it)."""
    fold = f >= b
    if memory == "mlp":
        m, row = 2 * D * d, 2 * (D + d)
        grad_flops = 3 * 2 * D * d  # z = A_in k, u = A_out a, gz = A_out^T gu
        read_flops = 2 * 2 * D * d  # q through W_in, gelu(.) through W_out
        row_read_flops = 4 * (D + d)  # per row: q.k_i, aq.a_i and the two combinations
    else:
        m, row = d * d, 2 * d
        grad_flops = 2 * d * d
        read_flops = 2 * d * d
        row_read_flops = 4 * d
    if layout == "running":
        read = 2 * m
        written = m + (m if fold else 0)
        flops = grad_flops + read_flops + 2 * m  # decay * W - outer product, every entry
        return read, written, flops, 2 * m
    rows_read = 0 if fold else f  # after a fold the new token is row 0: it reads no earlier row
    read = m + (b * row if fold else 0) + rows_read * row + rows_read + 1
    # the row, coefficients, decay; a fold also writes the anchor and clears the other rows and coefficients
    written = row + rows_read + 1 + 1 + ((m + (b - 1) * (row + 1)) if fold else 0)
    flops = grad_flops + read_flops + row_read_flops * (rows_read + 1) + (2 * m * b if fold else 0)
    return read, written, flops, m + b * row + b + 1


def decode_step_cost(layout: str, memory: str, *, head_dim: int, hidden: int, chunk_size: int, n_heads: int,
                     n_miras_layers: int, batch: int, weight_bytes: float,
                     filled_rows: float | None = None) -> StepCost:
    """The cost of one decode step of ``batch`` sequences in ``layout`` ("running" | "factored").

    ``filled_rows`` is the number of factor rows filled before the step, in ``[0, chunk_size]`` (the
    token's position in its chunk; ``chunk_size`` means the previous chunk is complete and this token
    folds it); None averages over the ``chunk_size`` steps of a chunk (one of which folds).
    ``hidden`` is the MLP memory's hidden width ``D`` (ignored for the linear memory).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if memory not in MEMORIES:
        raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}")
    b = chunk_size
    if filled_rows is not None and not 0 <= filled_rows <= b:
        raise ValueError(f"filled_rows must be in [0, chunk_size={b}], got {filled_rows}")
    steps = [float(filled_rows)] if filled_rows is not None else [float(b)] + [float(j) for j in range(1, b)]
    per_step = [_head_step(layout, memory, head_dim, hidden, b, f) for f in steps]
    read, written, flops, held = (sum(c[i] for c in per_step) / len(per_step) for i in range(4))
    heads = n_heads * n_miras_layers
    return StepCost(state_bytes_read=FP32 * read * heads * batch, state_bytes_written=FP32 * written * heads * batch,
                    weight_bytes=float(weight_bytes), flops=flops * heads * batch,
                    state_bytes_per_sequence=FP32 * held * heads)


def prefill_chunk_flops(memory: str, *, head_dim: int, hidden: int, tokens: int, retention: str = "l2") -> float:
    """FLOPs of the matrix products of one head over one prefill chunk of ``tokens`` tokens (the chunk size,
    or fewer for a partial chunk), with head dim ``d``, MLP hidden width ``D`` (ignored for the linear
    memory) and ``n = tokens``:

    * MLP memory: at the anchor, the keys' forward ``z = k A_in^T`` and ``u = gelu(z) A_out^T`` and the
      backward ``gz = gu A_out`` (3 x 2 n d D); the reads ``q W_in^T`` and ``gelu(.) W_out^T`` (2 x 2 n d D);
      the intra-chunk terms ``q k^T`` [n, n] (2 n^2 d), ``(C o qk) gz`` (2 n^2 D), the scores
      ``xq a^T`` (2 n^2 D) and ``(C o scores) gu`` (2 n^2 d); the update of both matrices (2 x 2 n d D):
      ``14 n d D + 4 n^2 (D + d)``.
    * Linear memory: the error ``k A^T``, the read ``q W^T`` and the update (3 x 2 n d^2), ``q k^T`` and
      ``(C o qk) g`` (2 x 2 n^2 d): ``6 n d^2 + 4 n^2 d``.
    * Memora (``retention="kl"``) adds its lag step at the chunk start, one token through the anchor:
      ``z``, ``u``, ``gz`` and the two gradient outer products (5 x 2 d D).
    """
    if memory not in MEMORIES:
        raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}")
    n, d = tokens, head_dim
    if memory == "linear":
        return float(6 * n * d * d + 4 * n * n * d)
    D = hidden
    lag_step = 10 * d * D if retention == "kl" else 0
    return float(14 * n * d * D + 4 * n * n * (D + d) + lag_step)


def prefill_flops(memory: str, *, head_dim: int, hidden: int, chunk_size: int, tokens: int, n_heads: int,
                  batch: int = 1, retention: str = "l2") -> float:
    """FLOPs of the memory's matrix products in a prefill of ``tokens`` tokens from position 0, for ``batch``
    sequences of ``n_heads`` heads: full chunks, then the partial last one (:func:`prefill_chunk_flops`)."""
    full, rest = divmod(tokens, chunk_size)
    shape = dict(head_dim=head_dim, hidden=hidden, retention=retention)
    per_head = full * prefill_chunk_flops(memory, tokens=chunk_size, **shape)
    if rest:
        per_head += prefill_chunk_flops(memory, tokens=rest, **shape)
    return batch * n_heads * per_head
