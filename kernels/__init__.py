"""Backends for the Miras memory scan. ``MIRAS_KERNELS=torch|triton`` forces one; the default is
triton on CUDA tensors and the PyTorch reference (models.memory) elsewhere."""

from __future__ import annotations

import os

from torch import Tensor

from models.config import MirasConfig
from models.memory import Memory
from models.memory import memory_scan as torch_memory_scan

BACKENDS = ("torch", "triton")


def backend_for(device_type: str) -> str:
    forced = os.environ.get("MIRAS_KERNELS", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"MIRAS_KERNELS must be one of {BACKENDS}, got {forced!r}")
        return forced
    return "torch"


def memory_scan(cfg: MirasConfig, anchor: Memory, memory: Memory, pos: Tensor, q: Tensor, k: Tensor, v: Tensor,
                eta: Tensor, log_alpha: Tensor, delta: Tensor | None, valid: Tensor, ln_weight: Tensor | None,
                ln_bias: Tensor | None) -> tuple[Tensor, Memory, Memory]:
    """Same contract as :func:`models.memory.memory_scan`, on the selected backend."""
    backend = backend_for(q.device.type)
    if backend == "torch":
        return torch_memory_scan(cfg, anchor, memory, pos, q, k, v, eta, log_alpha, delta, valid,
                                 ln_weight, ln_bias)
    raise NotImplementedError("the triton backend is not built yet")
