"""Which implementation runs the Miras memory: the PyTorch reference (models.memory) or the Triton kernels
(kernels.scan, taking the config's :class:`kernels.rule.MemoryRule` and plain tensors). ``MIRAS_KERNELS=torch|triton``
forces one; the default is triton on CUDA tensors (when triton is installed) and the reference elsewhere. Forcing
triton on CPU tensors runs the kernels under the Triton interpreter (kernels.load_scan).

Two state layouts (models/SPEC.md §7; ``models.layers.state_layout`` picks one per backend):
``memory_scan`` / ``memory_scan_pool`` take the anchor and the running memory, ``factored_scan`` /
``factored_scan_pool`` the anchor and the chunk's factor rows (on triton: kernels.factored, and the
scan kernel's FACTORED prefill).

On CPU tensors the torch backend runs a factored pool's one-token decode step, and a prompt's segments of the
MLP memory (:func:`prompt_kernels`), through native kernels (kernels.cpu_native, built at first use under the
project's cache dir) unless ``MIRAS_CPU_NATIVE=0`` (:func:`native_kernels_enabled`); the chunk starts still take
the reference's ``start_chunk`` first."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from miras_serve.kernels import cpu_native, load_scan

from . import memory as spec
from .config import MirasConfig
from .corpus import cache_dir
from .memory import FactoredMemory, KnownStep, Memory

BACKENDS = ("torch", "triton")


def backend_for(device_type: str) -> str:
    forced = os.environ.get("MIRAS_KERNELS", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"MIRAS_KERNELS must be one of {BACKENDS}, got {forced!r}")
        return forced
    if device_type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch"


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """Run a block with environment variable ``name`` set to ``value``, restored afterwards."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def forced_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """Run a block with ``MIRAS_KERNELS=name`` (e.g. to compare backends on the same model)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return environment("MIRAS_KERNELS", name)


def native_kernels_enabled(device_type: str) -> bool:
    """Whether the native CPU kernels run on ``device_type`` (a factored pool's one-token step, a prompt's
    segments of the MLP memory): on CPU tensors, unless ``MIRAS_CPU_NATIVE=0``, once the kernels have been built
    (the first call builds them)."""
    return device_type == "cpu" and os.environ.get("MIRAS_CPU_NATIVE", "1").strip() != "0" and _native_built()


@torch.compiler.assume_constant_result  # a compiled step asks once, while tracing, and keeps the answer
def _native_built() -> bool:
    return cpu_native.load(cache_dir() / "torch_extensions")


def prompt_kernels(cfg: MirasConfig, *inputs: Tensor | None) -> spec.PromptKernels:
    """What runs a prompt's chunks on the torch backend (``inputs``: the memory and the tokens' tensors): the
    native kernels (kernels/cpu/mlp_segment.cpp, lq_normalise.cpp) for the MLP memory on fp32 CPU tensors with
    exact products and nothing to differentiate, when the native kernels are enabled; else the reference's
    (``memory_segment``, ``mlp_factors``, ``lq_normalise``)."""
    tensors = [t for t in inputs if t is not None]
    if (cfg.memory == "mlp" and all(t.dtype == torch.float32 for t in tensors) and spec.dot_emulation() == "ieee"
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and native_kernels_enabled(tensors[0].device.type)):
        return NATIVE_PROMPT_KERNELS
    return spec.REFERENCE


def _native_segment(cfg: MirasConfig, anchor: Memory, memory: Memory, q: Tensor, k: Tensor, v: Tensor, eta: Tensor,
                    log_alpha: Tensor, delta: Tensor | None, ln_weight: Tensor, ln_bias: Tensor,
                    surprise: Tensor | None = None) -> tuple[Tensor, Memory, spec.TokenFactors]:
    """:func:`models.memory.memory_segment` through the native kernel."""
    out, new_memory, factors, loss = cpu_native.mlp_segment(cfg.memory_rule(), anchor, memory, q, k, v, eta,
                                                            log_alpha, delta, ln_weight, ln_bias, surprise is not None)
    if surprise is not None:
        surprise.copy_(loss)
    return out, new_memory, factors


def _native_factors(cfg: MirasConfig, w_in: Tensor, w_out: Tensor, k: Tensor, v: Tensor, ln_weight: Tensor,
                    ln_bias: Tensor, delta: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`models.memory.mlp_factors` (without the surprise) through the native kernel."""
    return cpu_native.mlp_factors(cfg.memory_rule(), (w_in, w_out), k, v, delta, ln_weight, ln_bias)


def _native_lq_map(cfg: MirasConfig, w: Tensor, init_std: float) -> Tensor:
    """:func:`models.memory.lq_normalise` through the native kernel."""
    return cpu_native.lq_normalise(w, cfg.q, cfg.lq_radius, init_std)


NATIVE_PROMPT_KERNELS = spec.PromptKernels(_native_segment, _native_factors, _native_lq_map)


def memory_scan(cfg: MirasConfig, anchor: Memory, memory: Memory, pos: Tensor, q: Tensor, k: Tensor, v: Tensor,
                eta: Tensor, log_alpha: Tensor, delta: Tensor | None, valid: Tensor, ln_weight: Tensor | None,
                ln_bias: Tensor | None, surprise: Tensor | None = None) -> tuple[Tensor, Memory, Memory]:
    """Same contract as :func:`models.memory.memory_scan`, on the selected backend (inputs untouched)."""
    if backend_for(q.device.type) == "torch":
        return spec.memory_scan(cfg, anchor, memory, pos, q, k, v, eta, log_alpha, delta, valid, ln_weight, ln_bias,
                                surprise, kernels=prompt_kernels(cfg, *anchor, *memory, q, k, v, eta, log_alpha, delta,
                                                                 ln_weight))
    anchor = tuple(w.to(torch.float32).clone(memory_format=torch.contiguous_format) for w in anchor)
    memory = tuple(w.to(torch.float32).clone(memory_format=torch.contiguous_format) for w in memory)
    rows = torch.arange(q.shape[0], device=q.device)
    # valid is a prefix mask (right padding), so the row lengths say everything.
    out = load_scan(q.device.type).scan_pool(cfg.memory_rule(), anchor, memory, rows, pos, q, k, v, eta, log_alpha,
                                             delta, ln_weight, ln_bias, lengths=valid.sum(1), surprise=surprise)
    return out.to(q.dtype), anchor, memory


def memory_scan_pool(cfg: MirasConfig, anchor: Memory, memory: Memory, slots: Tensor, pos: Tensor, q: Tensor,
                     k: Tensor, v: Tensor, eta: Tensor, log_alpha: Tensor, delta: Tensor | None, lengths: Tensor,
                     ln_weight: Tensor | None, ln_bias: Tensor | None, surprise: Tensor | None = None,
                     known: KnownStep | None = None) -> Tensor:
    """In place on a state pool: row b of q/k/v ([B, H, T, d], right-padded to ``lengths``) continues
    pool slot ``slots[b]`` from position ``pos[b]``; a negative slot is skipped. Returns the reads.
    ``surprise`` [B, H, T] (fp32, contiguous), if given, takes every token's loss at its chunk's anchor (skipped
    rows and padding: unspecified).

    The triton backend is one in-place launch without host syncs (CUDA-graph capturable); the torch
    backend gathers the rows, runs the reference and scatters them back. ``known`` (a one-token step, every
    slot live, :class:`models.memory.KnownStep`): the torch backend then reads no device value on the host,
    so that the step compiles into one graph (a slot may repeat only where nothing reads it: the engine's
    padding slot).
    """
    if backend_for(q.device.type) == "triton":
        return load_scan(q.device.type).scan_pool(cfg.memory_rule(), anchor, memory, slots, pos, q, k, v, eta,
                                                  log_alpha, delta, ln_weight, ln_bias, lengths=lengths,
                                                  surprise=surprise)
    if known is not None:
        valid = torch.ones(q.shape[0], 1, dtype=torch.bool, device=q.device)
        o, new_anchor, new_memory = spec.memory_scan(
            cfg, tuple(w.index_select(0, slots) for w in anchor), tuple(w.index_select(0, slots) for w in memory),
            pos, q, k, v, eta, log_alpha, delta, valid, ln_weight, ln_bias, surprise, known)
        written = zip((*anchor, *memory), (*new_anchor, *new_memory), strict=True) if known.first is not None \
            else zip(memory, new_memory, strict=True)
        for pool, new in written:
            pool.index_copy_(0, slots, new)
        return o

    access = _slot_access(slots, slots >= 0)
    if access is None:
        return _zero_reads(q, surprise)
    rows, picked, read, write, pick = access
    valid = torch.arange(q.shape[2], device=q.device).view(1, -1) < lengths.view(-1, 1)
    part = _surprise_part(surprise, rows)
    o, new_anchor, new_memory = spec.memory_scan(
        cfg, tuple(read(w) for w in anchor), tuple(read(w) for w in memory), pick(pos), pick(q), pick(k), pick(v),
        pick(eta), pick(log_alpha), pick(delta), pick(valid), ln_weight, ln_bias, part,
        kernels=prompt_kernels(cfg, *anchor, *memory, q, k, v, eta, log_alpha, delta, ln_weight))
    # The anchor changes only where a chunk starts inside the processed tokens; most decode steps
    # cross no boundary, so skip that copy (half the state traffic of the write-back).
    first_boundary = torch.remainder(-pick(pos), cfg.chunk_size)
    written = (*anchor, *memory) if bool((first_boundary < pick(lengths)).any()) else memory
    for pool, new in zip(written, (*new_anchor, *new_memory)[-len(written):], strict=True):
        write(pool, new)
    return _scatter_reads(q, rows, o, surprise, part)


def _all_rows(rows: Tensor, batch: int) -> bool:
    return rows.numel() == batch and torch.equal(rows, torch.arange(batch, device=rows.device))


def _zero_reads(q: Tensor, surprise: Tensor | None) -> Tensor:
    """The reads of a batch whose rows are all skipped (and its surprise: 0)."""
    if surprise is not None:
        surprise.zero_()
    return torch.zeros(q.shape, dtype=torch.float32, device=q.device)


def _surprise_part(surprise: Tensor | None, rows: Tensor) -> Tensor | None:
    """A buffer for the surprise of batch rows ``rows`` (the whole buffer when they are all the rows, in order)."""
    if surprise is None or _all_rows(rows, surprise.shape[0]):
        return surprise
    return surprise.new_empty(rows.numel(), *surprise.shape[1:])


def _scatter_reads(q: Tensor, rows: Tensor, o: Tensor, surprise: Tensor | None = None,
                   part: Tensor | None = None) -> Tensor:
    """The reads of the batch ([B, H, T, d], fp32, zero for skipped rows) from those of ``rows``; the surprise
    of ``rows`` (``part``) goes to its rows of ``surprise`` likewise."""
    if _all_rows(rows, q.shape[0]):
        if surprise is not None and part is not surprise:
            surprise.copy_(part)
        return o.float()
    if surprise is not None:
        surprise.zero_().index_copy_(0, rows, part)
    return torch.zeros(q.shape, dtype=torch.float32, device=q.device).index_copy_(0, rows, o.float())


def _slot_access(slots: Tensor, live: Tensor) -> tuple[Tensor, Tensor, Callable, Callable, Callable] | None:
    """For the batch rows where ``live`` holds, in slot order: (batch rows, their pool slots, read, write,
    pick) with ``read(pool)`` their pool rows, ``write(pool, new)`` storing them back and ``pick(t)`` their
    rows of a batch tensor (or None); None if no row is live.

    A batch whose slots form one run reads and writes the pool through views rather than gathered and
    scattered copies: half the state traffic of a decode step (the scheduler hands out the lowest free
    slots, so this is the common case).
    """
    rows = live.nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    picked = slots.index_select(0, rows)
    order = torch.argsort(picked)
    rows, picked = rows.index_select(0, order), picked.index_select(0, order)
    first, count = int(picked[0]), picked.numel()
    if torch.equal(picked, torch.arange(first, first + count, device=picked.device)):
        def read(w: Tensor) -> Tensor:
            return w.narrow(0, first, count)

        def write(pool: Tensor, new: Tensor) -> None:
            pool.narrow(0, first, count).copy_(new)
    else:
        def read(w: Tensor) -> Tensor:
            return w.index_select(0, picked)

        def write(pool: Tensor, new: Tensor) -> None:
            pool.index_copy_(0, picked, new)
    everything = count == live.numel() and torch.equal(rows, torch.arange(count, device=rows.device))

    def pick(t: Tensor | None) -> Tensor | None:
        return t if t is None or everything else t.index_select(0, rows)

    return rows, picked, read, write, pick


def _triton_factored(cfg: MirasConfig, state: FactoredMemory, device_type: str, *args, **kwargs) -> Tensor:
    """kernels.scan.scan_pool on a factored state (its anchor and factor tensors, as the kernels take them)."""
    scan = load_scan(device_type)
    return scan.scan_pool(cfg.memory_rule(), state.anchor, scan.Factors(state.rows, state.row_coef, state.row_decay),
                          *args, **kwargs)


def factored_scan(cfg: MirasConfig, state: FactoredMemory, pos: Tensor, q: Tensor, k: Tensor, v: Tensor, eta: Tensor,
                  log_alpha: Tensor, delta: Tensor | None, valid: Tensor, ln_weight: Tensor,
                  ln_bias: Tensor, surprise: Tensor | None = None) -> tuple[Tensor, FactoredMemory]:
    """Same contract as :func:`models.memory.factored_scan` (inputs untouched), on the selected backend;
    one-token batches take the dual-form decode step."""
    if backend_for(q.device.type) == "triton":
        def owned(t: Tensor) -> Tensor:  # the kernels write in place: fp32, contiguous copies
            return t.to(torch.float32).clone(memory_format=torch.contiguous_format)

        state = FactoredMemory(tuple(owned(w) for w in state.anchor), *(owned(t) for t in state[1:]))
        rows = torch.arange(q.shape[0], device=q.device)
        # valid is a prefix mask (right padding), so the row lengths say everything.
        out = _triton_factored(cfg, state, q.device.type, rows, pos, q, k, v, eta, log_alpha, delta, ln_weight,
                               ln_bias, lengths=valid.sum(1), surprise=surprise)
        return out.to(q.dtype), state
    if q.shape[2] == 1:
        return spec.factored_decode_step(cfg, state, pos, q, k, v, eta, log_alpha, delta, valid, ln_weight, ln_bias,
                                         surprise)
    return spec.factored_scan(cfg, state, pos, q, k, v, eta, log_alpha, delta, valid, ln_weight, ln_bias, surprise,
                              kernels=prompt_kernels(cfg, *state.anchor, q, k, v, eta, log_alpha, delta, ln_weight))


def factored_scan_pool(cfg: MirasConfig, pool: FactoredMemory, slots: Tensor, pos: Tensor, q: Tensor, k: Tensor,
                       v: Tensor, eta: Tensor, log_alpha: Tensor, delta: Tensor | None, lengths: Tensor,
                       ln_weight: Tensor, ln_bias: Tensor, surprise: Tensor | None = None,
                       known: KnownStep | None = None) -> Tensor:
    """:func:`memory_scan_pool` on a factored state pool: in place, row b of q/k/v continues pool slot
    ``slots[b]``; a negative slot or an empty row is skipped. Returns the reads.

    A decode step (one token per row) reads the anchor and the factor rows where they lie and writes
    one row, the coefficients and the decay; a token that starts a chunk first folds its rows into the
    new anchor (once per chunk). The triton backend is in-place kernels without host syncs (CUDA-graph
    capturable, kernels/factored.py); the torch backend gathers a prompt's rows, runs the factored scan
    and writes them back, and runs a decode step on CPU tensors through the native kernel in place
    (:func:`native_kernels_enabled`; else gathers, the reference's ``factored_token`` and scatters).
    ``known``: as in :func:`memory_scan_pool`.
    """
    if backend_for(q.device.type) == "triton":
        return _triton_factored(cfg, pool, q.device.type, slots, pos, q, k, v, eta, log_alpha, delta, ln_weight,
                                ln_bias, lengths=lengths, surprise=surprise)
    if q.shape[2] == 1 and pool.rows.dtype == torch.float32 and native_kernels_enabled(q.device.type):
        return _native_decode(cfg, pool, slots, pos, [q, k, v, eta, log_alpha, delta], lengths, ln_weight, ln_bias,
                              surprise, known)
    if known is not None:  # every row live, none read on the host
        read, write = (lambda w: w.index_select(0, slots)), (lambda pool, new: pool.index_copy_(0, slots, new))
        token, picked, part = [q, k, v, eta, log_alpha, delta], slots, surprise
    else:
        access = _slot_access(slots, (slots >= 0) & (lengths > 0))
        if access is None:
            return _zero_reads(q, surprise)
        rows, picked, read, write, pick = access
        token = [pick(t) for t in (q, k, v, eta, log_alpha, delta)]
        pos = pick(pos)
        part = _surprise_part(surprise, rows)
    if q.shape[2] > 1:
        valid = torch.arange(q.shape[2], device=q.device).view(1, -1) < pick(lengths).view(-1, 1)
        state = FactoredMemory(tuple(read(w) for w in pool.anchor), *(read(t) for t in pool[1:]))
        o, state = spec.factored_scan(cfg, state, pos, *token, valid, ln_weight, ln_bias, part,
                                      kernels=prompt_kernels(cfg, *state.anchor, *token, ln_weight))
        for mine, new in zip((*pool.anchor, *pool[1:]), (*state.anchor, *state[1:]), strict=True):
            write(mine, new)
        return _scatter_reads(q, rows, o, surprise, part)
    row = pos % cfg.chunk_size
    first = (row == 0).nonzero().squeeze(1) if known is None else known.first
    if first is not None and first.numel():  # once per chunk per sequence: fold into the new anchor, start over
        _start_chunks(cfg, pool, picked.index_select(0, first), [t.index_select(0, first) for t in token[1:5]],
                      ln_weight, ln_bias)
    # a known step gathers only the rows it reads (the compiled step copies what it gathers: the rows it
    # reads are overwritten in place later in the same graph)
    factors = pool.rows if known is None else pool.rows[:, :, :known.filled]
    state = FactoredMemory(tuple(read(w) for w in pool.anchor), read(factors), read(pool.row_coef),
                           read(pool.row_decay))
    o, new_row, coef, decay = spec.factored_token(cfg, state, row, *token, ln_weight, ln_bias, part,
                                                  None if known is None else known.filled)
    pool.rows[picked, :, row] = new_row
    write(pool.row_coef, coef)
    write(pool.row_decay, decay)
    return o if known is not None else _scatter_reads(q, rows, o, surprise, part)


def _start_chunks(cfg: MirasConfig, pool: FactoredMemory, at: Tensor, token: list[Tensor], ln_weight: Tensor,
                  ln_bias: Tensor) -> None:
    """Pool slots ``at`` start a chunk with their token's (k, v, eta, log_alpha), in place: the reference's
    ``start_chunk`` on their gathered states, written back."""
    gathered = FactoredMemory(tuple(w.index_select(0, at) for w in pool.anchor),
                              *(t.index_select(0, at) for t in pool[1:]))
    started = spec.start_chunk(cfg, gathered, *token, ln_weight, ln_bias)
    for mine, new in zip((*pool.anchor, *pool[1:]), (*started.anchor, *started[1:]), strict=True):
        mine.index_copy_(0, at, new)


def _native_decode(cfg: MirasConfig, pool: FactoredMemory, slots: Tensor, pos: Tensor, token: list[Tensor | None],
                   lengths: Tensor, ln_weight: Tensor, ln_bias: Tensor, surprise: Tensor | None,
                   known: KnownStep | None) -> Tensor:
    """:func:`factored_scan_pool`'s one-token step through the native CPU kernel (kernels.cpu_native): the rows
    whose token starts a chunk take the reference's chunk start first (1 token in b), then the kernel runs every
    row in place where it lies, no gathers."""
    if known is None:
        first = ((pos % cfg.chunk_size == 0) & (slots >= 0) & (lengths > 0)).nonzero().squeeze(1)
    else:
        first = known.first
    if first is not None and first.numel():
        _start_chunks(cfg, pool, slots.index_select(0, first), [t.index_select(0, first) for t in token[1:5]],
                      ln_weight, ln_bias)
    return cpu_native.factored_decode(cfg.memory_rule(), pool.anchor, pool.rows, pool.row_coef, pool.row_decay, slots,
                                      pos, lengths, *token, ln_weight, ln_bias, surprise)
