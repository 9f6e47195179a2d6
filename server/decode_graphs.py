"""The engine's decode step, replayed from CUDA graphs captured once per batch size.

A decode step of a recurrent model is many small kernels per layer (projections, conv, gates, the
memory scan) on fixed-size tensors, so on a GPU its cost at small batches is launch overhead: on an
H200 the 24-layer 340M-shape step took 34 ms eager and 3.8 ms replayed at batch 1. Graphs fix every
address, so the step reads its inputs from persistent buffers and a batch is padded up to the next
captured size. Padding rows point at a scratch row of the state pool that no request owns: they
compute garbage there (several padding rows share it and race), and nothing reads it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kernels.graphs import capture
from models import MirasLM
from models.model import ModelState


def capture_sizes(max_batch: int) -> list[int]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return [*sizes, max_batch]


class DecodeGraphs:
    """Decode steps (one token for each of up to ``max_batch`` sequences) through ``pool`` for every
    size of :func:`capture_sizes`. With ``use_graphs`` false (CPU) the same padded steps run eagerly,
    which is how the padding is tested without a GPU."""

    def __init__(self, model: MirasLM, pool: ModelState, scratch_slot: int, max_batch: int, use_graphs: bool):
        if not 0 <= scratch_slot < pool.batch_size:
            raise ValueError(f"scratch slot {scratch_slot} is outside the pool of {pool.batch_size}")
        device = pool.pos.device
        self.sizes = capture_sizes(max_batch)
        self.scratch_slot = scratch_slot
        self.ids = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.slots = torch.full((max_batch,), scratch_slot, dtype=torch.long, device=device)
        self.logits: dict[int, Tensor] = {}
        self.steps: dict[int, Callable[[], object]] = {}
        memory_pool = torch.cuda.graph_pool_handle() if use_graphs else None
        for size in sorted(self.sizes, reverse=True):  # the largest first: the others reuse its memory
            def step(size: int = size) -> None:
                self.logits[size] = model(self.ids[:size], pool, slots=self.slots[:size])[0]

            self.steps[size] = capture(step, device, memory_pool) if use_graphs else step

    def run(self, ids: Tensor, slots: Tensor) -> Tensor:
        """Logits [B, 1, vocab] for ``ids`` [B, 1], row b continuing pool slot ``slots[b]``. The result
        is a view of a graph's output buffer: it is overwritten by the next step."""
        batch = ids.shape[0]
        size = next(s for s in self.sizes if s >= batch)
        self.ids[:batch].copy_(ids)
        self.slots[:batch].copy_(slots)
        self.slots[batch:size].fill_(self.scratch_slot)
        self.steps[size]()
        return self.logits[size][:batch]
