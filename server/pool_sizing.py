"""Sizing the state pool from device memory, like vLLM's ``--gpu-memory-utilization``.

A recurrent model's "KV cache" is its pool of fixed-size states, one slot per running sequence, so the
memory left after the weights, the state cache and the activations decides how many sequences can decode
at once. The process may use ``utilization`` x the device's total memory; what other processes and this
one already hold (the weights) is subtracted, as are the state cache budget and the activation peak of a
prefill step. Without ``--max-num-seqs`` the pool takes what is left (up to ``MAX_AUTO_SEQS``); with it,
a pool that does not fit is refused at start-up, before anything is allocated.

On a CPU there is nothing to size: states live in host memory, which is rarely the limit, while a CPU's
throughput stops growing after a few dozen sequences, so ``--max-num-seqs`` defaults to 64 there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger("miras.engine")

CPU_MAX_NUM_SEQS = 64
MAX_AUTO_SEQS = 1024  # vLLM's default max_num_seqs for an online server on a GPU
# Per sequence beyond its state: the sampler's [slots, vocab] tables and one step's [batch, vocab]
# temporaries (logits, probabilities, CDF, ...), in bytes per vocabulary entry.
SAMPLER_BYTES_PER_TOKEN = 32
GIB = 1 << 30


class PoolSizeError(ValueError):
    """The state pool asked for (or the smallest one) does not fit in the device's memory."""


@dataclass
class PoolPlan:
    max_num_seqs: int
    bytes_per_sequence: int  # state + sampler share
    available: int  # bytes the pool may use

    def describe(self, extra_slots: int) -> str:
        used = (self.max_num_seqs + extra_slots) * self.bytes_per_sequence
        return (f"state pool: {self.max_num_seqs} sequences x {self.bytes_per_sequence / 2**20:.1f} MiB = "
                f"{used / GIB:.2f} GiB of {self.available / GIB:.2f} GiB available")


def plan_pool(state_bytes: int, vocab_size: int, free: int, total: int, utilization: float, reserved: int,
              requested: int | None, extra_slots: int, limit: int = MAX_AUTO_SEQS) -> PoolPlan:
    """How many sequences the pool holds. ``free``/``total``: device memory now (the weights are already
    loaded); ``reserved``: bytes the pool must leave (state cache, activations); ``extra_slots``: pool
    rows no request owns (the CUDA-graph padding row); ``limit``: the most an unrequested pool takes."""
    per_sequence = state_bytes + SAMPLER_BYTES_PER_TOKEN * vocab_size
    in_use = total - free
    available = int(utilization * total) - in_use - reserved
    why = (f"--gpu-memory-utilization {utilization:g} of {total / GIB:.1f} GiB, minus {in_use / GIB:.2f} GiB "
           f"already in use (weights, other processes) and {reserved / GIB:.2f} GiB for the state cache and "
           "activations")
    if requested is not None:
        needed = (requested + extra_slots) * per_sequence
        if needed > available:
            raise PoolSizeError(
                f"--max-num-seqs {requested} needs {needed / GIB:.2f} GiB of state ({per_sequence / 2**20:.1f} MiB "
                f"per sequence) but only {max(available, 0) / GIB:.2f} GiB is available ({why}); lower "
                "--max-num-seqs or --state-cache-gb, or raise --gpu-memory-utilization")
        return PoolPlan(requested, per_sequence, available)
    fits = available // per_sequence - extra_slots
    if fits < 1:
        raise PoolSizeError(
            f"no room for the state of one sequence ({per_sequence / 2**20:.1f} MiB): "
            f"{max(available, 0) / GIB:.2f} GiB available ({why}); lower --state-cache-gb or raise "
            "--gpu-memory-utilization")
    return PoolPlan(min(fits, limit), per_sequence, available)
