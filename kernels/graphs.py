"""CUDA-graph capture of a step whose tensors stay put (the decode step through the state pool)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def capture(step: Callable[[], object], device: torch.device, pool: tuple | None = None) -> Callable[[], object]:
    """A CUDA graph of ``step``, returned as its replay (on CPU: the step itself).

    ``step`` runs twice on a side stream first (Triton compiles and torch's allocator settles there),
    then once under capture; whatever those runs write is written again by every replay. ``pool``
    (``torch.cuda.graph_pool_handle()``) lets several graphs share one memory pool.
    """
    if device.type != "cuda":
        return step
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    return graph.replay
