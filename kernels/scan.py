"""The fused Miras memory scan in Triton: chunked prefill and one-token decode in one kernel.

One program per (sequence, head) walks the sequence chunk by chunk (absolute chunk boundaries,
each sequence with its own start position), exactly as ``models.memory.memory_scan``:

* at a chunk start with a valid token, the rule's boundary step maps the running memory to the
  new anchor (copy; Moneta's lq projection; Memora's lag-token softmax step);
* inside a chunk, every gradient is taken at the anchor and reads use the running memory, all
  through the dual form (a few matmuls per chunk, ``models.memory.memory_segment``);
* padding tokens (index >= the row's length) are read but update nothing.

The state lives in a pool (anchor and running memory per slot, fp32) that the kernel reads and
writes **in place** through ``slots``; a negative slot skips the row and leaves the pool untouched.
The memory is not held in registers across chunks: each (slot, head) is 128 KiB at the 340M shape,
so it is streamed through in hidden-dim slabs from the pool itself, which stays L2-resident while
a program runs. Decode is the same kernel with one-token tiles (``BLOCK_T = 1``): GEMVs on the CUDA
cores instead of ``tl.dot``, the same code and therefore the same chunk semantics. For the MLP
memories it runs only the decode rows whose token starts a chunk (``BOUNDARY_ROWS_ONLY``); the
other rows go through the slab-parallel kernels of ``kernels.decode``, which keep more loads in flight.

The MLP memories' prompts run by default on the slab-parallel prefill of ``kernels.prefill`` (every
(sequence, head) split over hidden slabs, one launch per chunk phase; ``MIRAS_PREFILL=fused`` or
``SPLIT_D=0`` in a launch override keeps them on this kernel, for comparison); this kernel runs the linear
memory's prefill and the decode steps.

An MLP memory's pool may instead hold the factored state (anchor + the chunk's factor rows,
:class:`Factors`): its prefill is this kernel with ``FACTORED`` (the running memory in per-row scratch,
the state's rows written at the end), its decode the kernels of ``kernels.factored``.

Threads of a program read pool entries that other threads of the same program wrote (the boundary
step, the previous chunk), so every such hand-over goes through ``tl.debug_barrier()``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .boundary import copy_boundary, fold_rows, kl_boundary, lq_boundary, square
from .decode import split_decode
from .factored import factored_decode, filled_rows
from .ops import (
    attentional_loss,
    mlp_error_grad,
    mlp_forward,
    mm,
    row_offsets,
)
from .precision import dot_precision
from .prefill import slab_prefill
from .rule import BIAS_CODES, MEMORY_CODES, RETENTION_CODES, MemoryRule
from .segment import (
    finish_factored,
    mlp_read,
    mlp_update_slab,
    row_span,
    segment_gates,
    segment_span,
    store_key_rows,
)


@triton.jit
def _mlp_segment(q, k, v, delta, decay, coeff, last, last_decay, a_in, a_out, m_in, m_out, ln_w, ln_b, ck, cd,
                 ln_eps, p_exp, lp_knee, abs_eps, sharpness, seg_rows, row_store, D: tl.constexpr, DK: tl.constexpr,
                 BLOCK_D: tl.constexpr, BIAS: tl.constexpr, VEC: tl.constexpr, DOT: tl.constexpr,
                 FACTORED: tl.constexpr):
    """The dual form of models.memory.memory_segment for the MLP memory; updates the running memory
    in place and returns the reads [BT, BK] and the errors M_anchor(k) - v [BT, BK]. FACTORED: the tokens
    flagged in ``row_store`` [BT] also write their factor rows (k, gz, a, gu at the anchor), token t at row t
    of ``seg_rows``."""
    col_mask = (ck < DK)[None, :]
    # Pass 1: the chunk's forward at the anchor, to the output gradient gu.
    u = mlp_forward(k, a_in, a_out, ck, cd, D, DK, BLOCK_D, VEC, DOT)
    gu, error = mlp_error_grad(u, k, v, delta, ln_w, ln_b, col_mask, ln_eps, p_exp, lp_knee, abs_eps, sharpness, DK,
                               BIAS)
    if FACTORED:
        store_key_rows(seg_rows, row_store, k, gu, ck, D, DK)
    # Pass 2, slab by slab: gz, the reads' hidden layer, and the memory update.
    coeff_qk = coeff * mm(q, tl.trans(k), VEC, DOT)
    uq = tl.zeros((q.shape[0], ck.shape[0]), dtype=tl.float32)
    scores = tl.zeros((q.shape[0], q.shape[0]), dtype=tl.float32)
    for s0 in range(0, D, BLOCK_D):
        uq_part, scores_part = mlp_update_slab(q, k, gu, coeff_qk, decay, last, last_decay, a_in, a_out, m_in, m_out,
                                               s0, ck, cd, seg_rows, row_store, D, DK, VEC, DOT, FACTORED)
        uq += uq_part
        scores += scores_part
    return mlp_read(q, uq, scores, gu, decay, coeff, ln_w, ln_b, col_mask, ln_eps, DK, VEC, DOT), error


@triton.jit
def _linear_segment(q, k, v, decay, coeff, last, last_decay, a, m, ck, DK: tl.constexpr, VEC: tl.constexpr,
                    DOT: tl.constexpr):
    """The dual form for the linear memory M(x) = W x: the reads and the errors (the l2 bias's gradient)."""
    ptr, mask = square(a, ck, DK)
    g = mm(k, tl.load(ptr, mask=mask, other=0.0), VEC, DOT) - v  # l2 bias: the error itself
    ptr, mask = square(m, ck, DK)
    w_t = tl.load(ptr, mask=mask, other=0.0)
    out = decay * mm(q, w_t, VEC, DOT) - mm(coeff * mm(q, tl.trans(k), VEC, DOT), g, VEC, DOT)
    w_t = last_decay * w_t - mm(tl.trans(k * last), g, VEC, DOT)
    tl.debug_barrier()
    tl.store(ptr, w_t, mask=mask)
    return out, g


@triton.jit(do_not_specialize=["T"])
def miras_scan_kernel(
    Q, K, V, O, ETA, LOG_ALPHA, DELTA, A_IN, A_OUT, M_IN, M_OUT, ROWS, COEF, DECAY, LN_W, LN_B, S, SLOTS, POS, LENGTHS,
    CU_SEQLENS, T, sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, so_b, so_h, so_t, sg_b,
    sg_h, sg_t,
    lq_radius, lq_inv_std_in, lq_inv_std_out, q_exp, p_exp, lp_knee, abs_eps, sharpness, memora_eps, ln_eps,
    H: tl.constexpr, DK: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, MEMORY: tl.constexpr, BIAS: tl.constexpr,
    RETENTION: tl.constexpr, VARLEN: tl.constexpr, DOT: tl.constexpr, BOUNDARY_ROWS_ONLY: tl.constexpr,
    FACTORED: tl.constexpr, BLOCK_C: tl.constexpr, SURPRISE: tl.constexpr,
):
    """Grid (N, H). Row n continues pool slot SLOTS[n] from absolute position POS[n].

    Padded layout (VARLEN false): tensors [N, H, T, ...], row n has LENGTHS[n] valid tokens and
    reads are produced for all T. Varlen: tensors [1, H, total, ...], row n is tokens
    CU_SEQLENS[n]:CU_SEQLENS[n+1], all valid. BOUNDARY_ROWS_ONLY (one-token decode): only rows whose
    token starts a chunk run; kernels.decode takes the others.

    FACTORED (MLP memory): the pool holds the factored state (anchor, ROWS, COEF, DECAY; kernels.factored)
    and M_IN / M_OUT are per-row scratch [N, H, ...] for the running memory, which the program first
    folds from the state; the segment holding the last valid token writes its factor rows, the
    coefficients and the decay, so the state is decode-ready (mid-chunk or at a chunk end).

    SURPRISE: S (laid out as the gates) takes every valid token's loss at its chunk's anchor, from the error
    the segment computes for the gradient (models.memory.memory_segment's ``surprise``).
    """
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    slot, p0, start, rows, n_valid, row = row_span(n, SLOTS, POS, LENGTHS, CU_SEQLENS, T, VARLEN)
    if (slot < 0) | (rows <= 0):
        return
    if BOUNDARY_ROWS_ONLY:  # noqa: SIM102 (a compile-time branch around a runtime one)
        if (p0 % CHUNK != 0) | (n_valid <= 0):
            return
    q_ptr = Q + row * sq_b + h * sq_h + start * sq_t
    k_ptr = K + row * sk_b + h * sk_h + start * sk_t
    v_ptr = V + row * sv_b + h * sv_h + start * sv_t
    o_ptr = O + row * so_b + h * so_h + start * so_t
    g_off = row * sg_b + h * sg_h + start * sg_t
    head = (slot * H + h) * (D * DK)  # W_in, W_out (or the linear W, then D == DK) have D * DK entries
    a_in = A_IN + head
    a_out = A_OUT + head
    m_in = M_IN + head
    m_out = M_OUT + head
    _, _, _, _, RW = row_offsets(D, DK)
    factor_rows = ROWS + (slot * H + h) * (CHUNK * RW)
    ci = tl.arange(0, BLOCK_C)
    ck = tl.arange(0, BLOCK_K)
    cd = tl.arange(0, BLOCK_D)
    col_mask = ck < DK
    ln_w = tl.load(LN_W + h * DK + ck, mask=col_mask, other=0.0)[None, :]
    ln_b = tl.load(LN_B + h * DK + ck, mask=col_mask, other=0.0)[None, :]
    if FACTORED:
        scratch = (n * H + h) * (D * DK)
        m_in = M_IN + scratch
        m_out = M_OUT + scratch
        n_old = filled_rows(p0, CHUNK)
        coef0 = tl.load(COEF + (slot * H + h) * CHUNK + ci, mask=ci < n_old, other=0.0)
        decay0 = tl.load(DECAY + slot * H + h)
        fold_rows(a_in, a_out, m_in, m_out, factor_rows, coef0, decay0, n_old, ck, cd, D, DK, BLOCK_D, BLOCK_C, DOT)
        tl.debug_barrier()

    for c in range(p0 // CHUNK, (p0 + rows - 1) // CHUNK + 1):
        chunk_start, seg_start, seg_len, at_boundary, tok, in_seg, valid = segment_span(c, p0, rows, n_valid, CHUNK,
                                                                                        BLOCK_T)
        decay, coeff, last, last_decay, eta0, log_alpha0 = segment_gates(ETA, LOG_ALPHA, g_off, sg_t, tok, valid,
                                                                          at_boundary, RETENTION)
        if at_boundary:
            if RETENTION == 2:
                k0 = tl.load(k_ptr + chunk_start * sk_t + ck[None, :] * sk_d, mask=col_mask[None, :], other=0.0)
                v0 = tl.load(v_ptr + chunk_start * sv_t + ck[None, :] * sv_d, mask=col_mask[None, :], other=0.0)
                kl_boundary(m_in, m_out, a_in, a_out, k0.to(tl.float32), v0.to(tl.float32), eta0, log_alpha0,
                             ln_w, ln_b, ck, cd, ln_eps, memora_eps, D, DK, BLOCK_D)
            elif RETENTION == 1:
                lq_boundary(m_in, m_out, a_in, a_out, ck, cd, q_exp, lq_radius, lq_inv_std_in, lq_inv_std_out, D, DK,
                             BLOCK_D, MEMORY)
            else:
                copy_boundary(m_in, m_out, a_in, a_out, ck, cd, D, DK, BLOCK_D, MEMORY)
        tl.debug_barrier()
        tile_mask = in_seg[:, None] & col_mask[None, :]
        q = tl.load(q_ptr + tok[:, None] * sq_t + ck[None, :] * sq_d, mask=tile_mask, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + tok[:, None] * sk_t + ck[None, :] * sk_d, mask=tile_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + tok[:, None] * sv_t + ck[None, :] * sv_d, mask=tile_mask, other=0.0).to(tl.float32)
        # The segment holding the last valid token leaves its factor rows (FACTORED), from row j_first on.
        last_seg = (n_valid > seg_start) & (n_valid <= seg_start + seg_len)
        j_first = (p0 + seg_start) % CHUNK
        delta = 0.0
        if BIAS == 2:
            delta = tl.load(DELTA + g_off + tok * sg_t, mask=in_seg, other=1.0).to(tl.float32)[:, None]
        if MEMORY == 1:
            out, error = _linear_segment(q, k, v, decay, coeff, last, last_decay, a_in, m_in, ck, DK, BLOCK_T == 1,
                                         DOT)
        else:
            out, error = _mlp_segment(q, k, v, delta, decay, coeff, last, last_decay, a_in, a_out, m_in, m_out, ln_w,
                               ln_b, ck, cd, ln_eps, p_exp, lp_knee, abs_eps, sharpness, factor_rows + j_first * RW,
                               valid & last_seg, D, DK, BLOCK_D, BIAS, BLOCK_T == 1, DOT, FACTORED)
        tl.store(o_ptr + tok[:, None] * so_t + ck[None, :], out, mask=tile_mask)
        if SURPRISE:
            tl.store(S + g_off + tok[:, None] * sg_t, attentional_loss(error, delta, DK, p_exp, lp_knee, BIAS),
                     mask=valid[:, None])
        if FACTORED:  # noqa: SIM102 (a compile-time branch around a runtime one)
            if last_seg:
                finish_factored(COEF + (slot * H + h) * CHUNK, DECAY + slot * H + h, factor_rows, coef0, decay0,
                                chunk_start, j_first, last, last_decay, n_valid - seg_start, ci, cd, CHUNK, RW)
        tl.debug_barrier()


# The slab-parallel prefill's slab width and warps (launch_config).
PREFILL_SLAB, PREFILL_WARPS = 16, 8


def _pow2(x: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(x))


PREFILL_PATHS = ("slabs", "fused")


def prefill_path() -> str:
    """How an MLP memory's prompt runs on the triton backend: ``MIRAS_PREFILL=slabs|fused``. Default
    ``slabs``: split over hidden slabs, one launch per chunk phase (kernels.prefill); ``fused``: one program
    per (sequence, head) walking its chunks (the scan kernel), kept for the side-by-side comparison."""
    choice = os.environ.get("MIRAS_PREFILL", "").strip().lower() or "slabs"
    if choice not in PREFILL_PATHS:
        raise ValueError(f"MIRAS_PREFILL must be one of {PREFILL_PATHS}, got {choice!r}")
    return choice


def launch_config(rule: MemoryRule, decode: bool, varlen: bool, dot: str) -> dict:
    """The kernel's constexprs and launch options. Hand-picked, never autotuned (the kernels write their
    state in place), from the side-by-side comparisons of benchmarks/gpu_check.py on an H200 (see
    docs/kernels.md). Prefill: 32-wide hidden slabs, 8 warps, no software pipelining (num_stages=1: 13%
    faster, the pipelined buffers only added register pressure). Decode of the MLP memory: the split
    kernels of kernels.decode (``SPLIT_D``-wide slabs, ``SPLIT_WARPS`` warps; ``SPLIT_D=0`` runs every
    row through the fused kernel instead): 64-wide slabs at 8 warps were the fastest of five settings,
    1.5x (Moneta) and 1.9x (Memora) faster than the fused kernel alone at batch 64. The fused kernel
    keeps the rows that take a chunk-boundary step, at 128-wide slabs (whole-model decode 1.2-1.3x
    faster than 32-wide). Prefill of the MLP memory (``MIRAS_PREFILL``, default slabs): the slab-parallel
    kernels of kernels.prefill, ``SPLIT_D``-wide slabs at ``SPLIT_WARPS`` warps (``SPLIT_D=0``: the fused
    scan kernel), picked as the widest spill-free configuration on sm_90 (benchmarks.compile_check; GPU timing
    of the alternatives pending, benchmarks/gpu_check.py's launch-prefill section)."""
    d = rule.head_dim
    D = d if rule.memory == "linear" else rule.memory_hidden
    config = dict(H=rule.n_heads, DK=d, D=D, CHUNK=rule.chunk_size, BLOCK_T=1 if decode else _pow2(rule.chunk_size),
                  BLOCK_C=_pow2(rule.chunk_size), BLOCK_K=_pow2(d), BLOCK_D=min(_pow2(D), 128 if decode else 32),
                  MEMORY=MEMORY_CODES[rule.memory],
                  BIAS=BIAS_CODES[rule.attentional_bias], RETENTION=RETENTION_CODES[rule.retention], VARLEN=varlen,
                  DOT=dot, SURPRISE=False, num_warps=8)
    if not decode:
        config["num_stages"] = 1
        if rule.memory == "mlp" and prefill_path() == "slabs":
            config.update(SPLIT_D=min(_pow2(D), PREFILL_SLAB), SPLIT_WARPS=PREFILL_WARPS)
    elif rule.memory == "mlp":
        config.update(SPLIT_D=min(_pow2(D), 64), SPLIT_WARPS=8)
    return config


def split_launch(config: dict) -> tuple[dict, int, int]:
    """A launch config (possibly overridden) as the fused kernel's arguments (``BOUNDARY_ROWS_ONLY`` set
    when the split decode takes the other rows), the split kernels' slab width (0: none; decode: kernels.decode
    or kernels.factored, prefill: kernels.prefill) and their warps."""
    config = dict(config)
    split_d, split_warps = config.pop("SPLIT_D", 0), config.pop("SPLIT_WARPS", 4)
    config["BOUNDARY_ROWS_ONLY"] = split_d > 0 and config["BLOCK_T"] == 1
    return config, split_d, split_warps


class Factors(NamedTuple):
    """The factored decode state of an MLP memory in a pool (kernels.factored): per slot and head the
    chunk's factor rows [P, H, b, 2(D + d)] as (k, gz, a, gu), their coefficients [P, H, b] and the decay
    [P, H]; it stands for the running memory, next to the anchor."""

    rows: Tensor
    coef: Tensor
    decay: Tensor


def scan_pool(rule: MemoryRule, anchor: tuple[Tensor, ...], memory: tuple[Tensor, ...] | Factors, slots: Tensor,
              pos: Tensor, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, log_alpha: Tensor, delta: Tensor | None,
              ln_weight: Tensor | None, ln_bias: Tensor | None, lengths: Tensor | None = None,
              cu_seqlens: Tensor | None = None, launch: dict | None = None, surprise: Tensor | None = None) -> Tensor:
    """Run the memory over every row, updating the state pool (anchor, memory) **in place**.

    Padded layout: q, k, v [N, H, T, d], eta, log_alpha, delta [N, H, T], ``lengths`` [N] valid
    tokens per row (the rest is right padding; reads are still produced for it). Varlen layout
    (``cu_seqlens`` [N+1]): q, k, v [1, H, total, d], gates [1, H, total]. Row n continues pool
    slot ``slots[n]`` (negative: skipped, nothing written) from absolute position ``pos[n]``; the
    non-negative slots of one launch must be distinct (programs of one slot would race).
    Pool tensors are fp32 and contiguous: the anchor [P, H, D, d] / [P, H, d, D] (linear: [P, H, d, d])
    and either the running memory (same shapes) or, for the MLP memory, its :class:`Factors`.
    q, k, v may be stored in bf16/fp16 (they are up-cast on load). Returns the reads (fp32), shaped like q.
    Never synchronises with the host (CUDA-graph capturable). ``launch`` overrides entries of
    :func:`launch_config` (tile sizes, ``num_warps``, ``num_stages``); the GPU check uses it to compare
    launch configurations side by side. ``surprise`` (shaped like eta, fp32, contiguous), if given, takes every
    valid token's loss at its chunk's anchor (models.memory.memory_scan's ``surprise``; others untouched).
    """
    n_rows = slots.shape[0]
    H, T, d = q.shape[1], q.shape[2], q.shape[3]
    factored = isinstance(memory, Factors)
    for w in (*anchor, *memory):
        if w.dtype != torch.float32 or not w.is_contiguous():
            raise ValueError("the state pool must be fp32 and contiguous")
    linear = rule.memory == "linear"
    if factored and linear:
        raise ValueError("the linear memory keeps the running layout (anchor, memory)")
    varlen = cu_seqlens is not None
    decode = T == 1 and not varlen
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    gates = [g.contiguous() for g in (eta, log_alpha)]
    gates.append(gates[0] if delta is None else delta.contiguous())
    if surprise is not None and (surprise.shape != eta.shape or surprise.dtype != torch.float32
                                 or not surprise.is_contiguous()):
        raise ValueError("surprise must be fp32, contiguous and shaped like eta (the kernels index it as the gates)")
    if ln_weight is None:
        ln_weight = ln_bias = torch.zeros(H, d, device=q.device)
    ln_weight = ln_weight.reshape(H, d).float().contiguous()
    ln_bias = ln_bias.reshape(H, d).float().contiguous()
    index = torch.empty(0, dtype=torch.long, device=q.device)
    if lengths is None:
        lengths = torch.full((n_rows,), T, dtype=torch.long, device=q.device) if not varlen else index
    # Moneta's lq radius is in units of each matrix's initial entry std.
    lq_inv_std = [1.0 / std for std in rule.init_std] * (2 if linear else 1)
    if n_rows == 0:
        return out
    config, split_d, split_warps = split_launch({**launch_config(rule, decode, varlen, dot_precision(q.device)),
                                                 **(launch or {}), "SURPRISE": surprise is not None})
    if surprise is None:
        surprise = index  # never touched
    a_in, a_out = (anchor[0], anchor[0]) if linear else anchor
    if factored and decode:
        factored_decode(rule, config, split_d, split_warps, q, k, v, out, gates, anchor, *memory, ln_weight, ln_bias,
                        slots, pos, lengths, lq_inv_std, surprise)
        return out
    if factored:  # the running memory lives in per-row scratch while the prompt runs
        m_in, m_out = (torch.empty(n_rows, *w.shape[1:], device=q.device, dtype=torch.float32) for w in anchor)
        rows, coef, decay = memory
    else:
        m_in, m_out = (memory[0], memory[0]) if linear else memory
        rows = coef = decay = index
    if split_d > 0 and not decode:
        slab_prefill(rule, config, split_d, split_warps, q, k, v, out, gates, (a_in, a_out), (m_in, m_out),
                     (rows, coef, decay), ln_weight, ln_bias, surprise, slots, pos, lengths,
                     cu_seqlens if varlen else index, lq_inv_std, factored)
        return out
    miras_scan_kernel[(n_rows, H)](
        q, k, v, out, *gates, a_in, a_out, m_in, m_out, rows, coef, decay, ln_weight, ln_bias, surprise, slots, pos,
        lengths,
        cu_seqlens if varlen else index, T,
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3], *gates[0].stride(),
        rule.lq_radius, *lq_inv_std, rule.q, rule.p, rule.lp_knee, rule.abs_eps, rule.sign_sharpness, rule.memora_eps,
        rule.memory_ln_eps,
        FACTORED=factored, **config,
    )
    if split_d > 0:
        split_decode(rule, config, split_d, split_warps, q, k, v, out, gates, anchor, memory, ln_weight, ln_bias,
                     slots, pos, lengths, surprise)
    return out
