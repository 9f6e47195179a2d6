"""The Miras memory in Triton: ops on plain tensors and a :class:`MemoryRule` (kernels.rule), nothing of the
model; models/backend.py decides when they run.

Entry points (kernels.scan, imported on first use: triton is an optional dependency): ``scan_pool`` (prefill
and decode on a state pool, in place; the running layout or the factored one, :class:`kernels.scan.Factors`)
and ``launch_config``. :func:`load_scan` imports them for tensors on a device type: on CPU
tensors the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` is set if triton is not loaded
yet). Kernel-level knobs: the fp32 dot precision (kernels.precision: ``MIRAS_DOT_PRECISION``,
:func:`set_dot_precision`) and the prefill path (``MIRAS_PREFILL``, kernels.scan.prefill_path)."""

from __future__ import annotations

import os
import sys
from types import ModuleType

from .precision import DOT_PRECISIONS, dot_precision, set_dot_precision
from .rule import MemoryRule


def load_scan(device_type: str) -> ModuleType:
    """kernels.scan, imported on first use, for tensors on ``device_type``: anything but CUDA runs under the
    Triton interpreter, which must be chosen before triton is first imported."""
    if device_type != "cuda" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from . import scan

    if device_type != "cuda" and type(scan.miras_scan_kernel).__name__ != "InterpretedFunction":
        raise RuntimeError("the triton backend on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                           "before triton is first imported (or use MIRAS_KERNELS=torch)")
    return scan


__all__ = ["DOT_PRECISIONS", "MemoryRule", "dot_precision", "load_scan", "set_dot_precision"]
