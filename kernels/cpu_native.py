"""The native CPU kernels of the memory and of a one-token decode step, built together as one torch extension:

- ``miras_serve::factored_decode`` (kernels/cpu/factored_decode.cpp), the factored memory's step, the CPU
  counterpart of kernels/factored.py: in place on the pool through ``slots``, reading the anchor and the factor
  rows where they lie, parallel over (row, head). It takes the tokens that continue a chunk, and the token that
  starts one once its chunk has been started (the rows folded into the anchor and the rule's boundary map
  applied, which the caller does first, once per chunk: 1 token in ``b``; models/backend.py runs the PyTorch
  reference's ``start_chunk`` for it). That keeps the C++ to the step every token takes, for every attentional
  bias (l2, lp, huber) and retention (the decay; Memora's in-chunk updates without decay and its first token
  entering through the boundary step).
- ``miras_serve::mlp_segment`` (kernels/cpu/mlp_segment.cpp), ``models.memory.memory_segment`` for the MLP
  memory: a prompt's tokens of one chunk, their reads and the memory after them, the products through ATen's
  batched matrix products and every elementwise chain fused into one pass (the prefill's memory); and
  ``miras_serve::mlp_factors``, its first half, ``models.memory.mlp_factors`` (a factored state's last rows).
- ``miras_serve::lq_normalise`` (kernels/cpu/lq_normalise.cpp), Moneta's boundary map
  (``models.memory.lq_normalise``) in two passes over each matrix, for a prompt's chunk boundaries.
- ``miras_serve::row_linear`` (kernels/cpu/row_linear.cpp), ``x W^T + b`` for one row of x, streaming the
  linear's own weight along its rows, the outputs split over the threads.

Built at first use with ``torch.utils.cpp_extension.load`` (g++ and ninja; ``-O3 -march=native -fopenmp``) into a
directory the caller names (the dispatcher passes one under the project's cache dir), so later processes
load it in well under a second (the first build takes ~16 s on 2 cores); the build time is logged. ``-fopenmp`` is what
makes ``at::parallel_for`` parallel (ATen's OpenMP loop is in its header: without the flag it compiled to a
serial loop); the library does not link an OpenMP runtime of its own, its calls bind to the one torch loaded,
so its threads are torch's (``torch.set_num_threads``). If the build fails, :func:`load` warns and returns
False and the caller keeps the PyTorch path. The C++ registers the torch operators (``TORCH_LIBRARY``; the
schemas mark what they write), and fake implementations are registered here, so a compiled decode step
(server/decode_graphs.py, ``fullgraph=True``) stays one graph and calls them as extern kernels."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .rule import BIAS_CODES, MemoryRule

_CPU_DIR = Path(__file__).resolve().parent / "cpu"
SOURCES = tuple(_CPU_DIR / name for name in ("factored_decode.cpp", "mlp_segment.cpp", "lq_normalise.cpp",
                                             "row_linear.cpp"))
# included by the sources: part of what a build depends on
HEADERS = (_CPU_DIR / "memory_math.h", _CPU_DIR / "vec_products.h")
EXTENSION = "miras_cpu_kernels"
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
STALE_LOCK_S = 600.0  # a build takes ~16 s on 2 cores

logger = logging.getLogger("miras.kernels")
_loaded: dict[str, bool] = {}  # EXTENSION -> whether it built and loaded


def build_key() -> str:
    """What the built library depends on: torch's ABI, the architecture, (``-march=native``) this CPU, so a
    cache dir shared by different machines (a volume, an image built elsewhere) never loads code for another CPU,
    and the sources and flags, so a build of another revision (an older op schema) is never loaded."""
    cpu = hashlib.sha256(_cpu_identity().encode()).hexdigest()[:12]
    sources = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    source = hashlib.sha256(sources + " ".join(CFLAGS).encode()).hexdigest()[:12]
    return f"torch-{torch.__version__}-{platform.machine()}-{cpu}-src-{source}"


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags (Linux), else what ``platform`` knows of it."""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    return platform.processor()


def load(cache_root: Path) -> bool:
    """Build (on first use, into ``cache_root`` / :func:`build_key`) and load the extension, once per process;
    False if it cannot be built (with a warning)."""
    if EXTENSION not in _loaded:
        start = time.monotonic()
        try:
            from torch.utils import cpp_extension

            build_dir = cache_root / build_key()  # (reads the sources: a missing one is a failed build too)
            _ninja_on_path()
            build_dir.mkdir(parents=True, exist_ok=True)
            _drop_stale_lock(build_dir / "lock")
            # registers the ops with torch (TORCH_LIBRARY)
            cpp_extension.load(EXTENSION, [str(path) for path in SOURCES], extra_cflags=CFLAGS,
                               build_directory=str(build_dir), is_python_module=False)
            torch.library.register_fake("miras_serve::factored_decode")(_fake_decode)
            torch.library.register_fake("miras_serve::row_linear")(_fake_row_linear)
            _loaded[EXTENSION] = True
            logger.info("native CPU decode kernels ready in %.1f s (%s)", time.monotonic() - start, build_dir)
        except Exception as error:  # no compiler, no ninja, a failed build: the PyTorch path decodes instead
            _loaded[EXTENSION] = False
            warnings.warn(f"the native CPU decode kernels could not be built ({type(error).__name__}: {error}); "
                          "decoding with the PyTorch path", RuntimeWarning, stacklevel=2)
    return _loaded[EXTENSION]


def _drop_stale_lock(lock: Path) -> None:
    """torch's loader waits, without end, while another process's build holds ``lock``: one left behind by a
    process killed mid-build would hang every later load, so a lock older than any build is removed."""
    with contextlib.suppress(FileNotFoundError):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            logger.warning("removed a stale build lock %s", lock)


def _ninja_on_path() -> None:
    """torch's loader runs ``ninja`` from PATH: if there is none, the PyPI package's (a dependency), which sits
    in the environment's bin directory, off PATH when the environment is not activated."""
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError):
            import ninja

            if ninja.BIN_DIR:
                os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _fake_decode(q: Tensor, *args) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _fake_row_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def row_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` for fp32 ``x`` [..., K] of few rows (one, in a decode step; every row
    re-reads the weight), computed by the native kernel: the dot products along ``weight``'s rows [N, K], split
    over torch's threads. Call :func:`load` first."""
    out = torch.ops.miras_serve.row_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(),
                                           None if bias is None else bias.contiguous())
    return out.view(*x.shape[:-1], weight.shape[0])


def mlp_segment(rule: MemoryRule, anchor: tuple[Tensor, Tensor], memory: tuple[Tensor, Tensor], q: Tensor, k: Tensor,
                v: Tensor, eta: Tensor, log_alpha: Tensor, delta: Tensor | None, ln_weight: Tensor, ln_bias: Tensor,
                want_surprise: bool) -> tuple[Tensor, tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor],
                                              Tensor | None]:
    """``models.memory.memory_segment`` for the MLP memory on fp32 CPU tensors (anchor and memory: ([B, H, D, d],
    [B, H, d, D]); q, k, v [B, H, n, d]; gates [B, H, n]; ln_weight, ln_bias [H, 1, d]): the reads [B, H, n, d],
    the memory after the segment, the tokens' factors (a, gz, gu) at the anchor, and each token's loss at the
    anchor [B, H, n] if ``want_surprise`` (else None). Every tensor fp32 (views of any strides). Call :func:`load`
    first."""
    out, new_in, new_out, loss, a, gz, gu = torch.ops.miras_serve.mlp_segment(
        *anchor, *memory, q, k, v, eta, log_alpha, delta, ln_weight, ln_bias, want_surprise,
        BIAS_CODES[rule.attentional_bias], rule.p, rule.lp_knee, rule.abs_eps, rule.sign_sharpness, rule.memory_ln_eps)
    return out, (new_in, new_out), (a, gz, gu), loss if want_surprise else None


def mlp_factors(rule: MemoryRule, anchor: tuple[Tensor, Tensor], k: Tensor, v: Tensor, delta: Tensor | None,
                ln_weight: Tensor, ln_bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``models.memory.mlp_factors`` for fp32 CPU tensors (anchor ([B, H, D, d], [B, H, d, D]); k, v [B, H, n, d];
    delta [B, H, n]; ln_weight, ln_bias [H, 1, d]): the factors (a, gz, gu) of each token's gradient at the
    anchor. Call :func:`load` first."""
    return torch.ops.miras_serve.mlp_factors(*anchor, k, v, delta, ln_weight, ln_bias,
                                             BIAS_CODES[rule.attentional_bias], rule.p, rule.lp_knee, rule.abs_eps,
                                             rule.sign_sharpness, rule.memory_ln_eps)


def lq_normalise(w: Tensor, q: float, radius: float, init_std: float) -> Tensor:
    """``models.memory.lq_normalise`` for fp32 CPU matrices ``w`` [..., R, C] (each mapped on its own; any
    strides), with the rule's ``q``, ``radius`` and the matrix's ``init_std``. Call :func:`load` first."""
    return torch.ops.miras_serve.lq_normalise(w, q, radius, init_std)


def factored_decode(rule: MemoryRule, anchor: tuple[Tensor, Tensor], rows: Tensor, coef: Tensor, decay: Tensor,
                    slots: Tensor, pos: Tensor, lengths: Tensor, q: Tensor, k: Tensor, v: Tensor, eta: Tensor,
                    log_alpha: Tensor, delta: Tensor | None, ln_weight: Tensor, ln_bias: Tensor,
                    surprise: Tensor | None = None) -> Tensor:
    """One decode token per row (q, k, v [N, H, 1, d]; gates [N, H, 1]) of pool slot ``slots[n]`` at
    position ``pos[n]``, in place on the factored pool (fp32, contiguous: anchor [P, H, D, d] and [P, H, d, D],
    rows [P, H, b, 2(D + d)], coef [P, H, b], decay [P, H]); a negative slot or a row of length 0 is skipped
    (read 0). A row whose token starts a chunk must have had its chunk started (see the module docstring).
    Returns the reads [N, H, 1, d] (fp32); ``surprise`` [N, H, 1] (fp32, contiguous), if given, takes each
    token's loss at the anchor. Call :func:`load` first."""
    def f32(t: Tensor) -> Tensor:
        return t.to(torch.float32).contiguous()

    return torch.ops.miras_serve.factored_decode(
        f32(q), f32(k), f32(v), f32(eta), f32(log_alpha), None if delta is None else f32(delta), *anchor, rows, coef,
        decay, f32(ln_weight), f32(ln_bias), slots.contiguous(), pos.contiguous(), lengths.to(torch.long).contiguous(),
        surprise, BIAS_CODES[rule.attentional_bias], rule.retention == "kl", rule.p, rule.lp_knee, rule.abs_eps,
        rule.sign_sharpness, rule.memory_ln_eps)
