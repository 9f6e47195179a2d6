"""The input precision of the Triton kernels' fp32 tensor-core products (``tl.dot``): one knob for every kernel,
``MIRAS_DOT_PRECISION`` (the server's ``--dot-precision``)."""

from __future__ import annotations

import os

import torch

DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")


def set_dot_precision(name: str) -> None:
    """For the rest of the process, the Triton kernels' fp32 dots use input precision ``name`` (what
    ``MIRAS_DOT_PRECISION`` sets; the server's ``--dot-precision``). The PyTorch backend is exact fp32 always."""
    if name not in DOT_PRECISIONS:
        raise ValueError(f"dot precision must be one of {DOT_PRECISIONS}, got {name!r}")
    os.environ["MIRAS_DOT_PRECISION"] = name


def dot_precision(device: torch.device) -> str:
    """Input precision of the fp32 ``tl.dot``s: ``MIRAS_DOT_PRECISION=ieee|tf32x3|tf32`` (the server's
    ``--dot-precision``). Default on the GPU: tf32x3 (three TF32 tensor-core products, fp32-level error);
    elsewhere ieee. Chosen on the shipped trained models (docs/precision.md, ``python -m
    benchmarks.precision``): over the held-out prefix on which exact fp32 stays on fp64's trajectory,
    tf32x3 does too, while plain tf32 (10 mantissa bits) and bf16 (7) move moneta-tiny's perplexity and
    top-1 tokens; so tf32 is opt-in and bf16 is not offered."""
    default = "tf32x3" if device.type == "cuda" else "ieee"
    choice = os.environ.get("MIRAS_DOT_PRECISION", "").strip().lower() or default
    if choice not in DOT_PRECISIONS:
        raise ValueError(f"MIRAS_DOT_PRECISION must be one of {DOT_PRECISIONS}, got {choice!r}")
    return choice
