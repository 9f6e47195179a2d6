"""Chunked prefill of the MLP memories split over hidden slabs: every (sequence, head) runs on as many
programs as its memory has slabs, one launch per chunk phase.

The fused scan (kernels.scan) gives each (sequence, head) one program that walks its chunks alone: at the
340M shape and batch 8 that is 128 programs for an H200's 132 SMs, each streaming a 128 KiB memory twice
per chunk through a tile set that spills. Here the hidden width D is cut into ``N_SLABS`` slabs of
``BLOCK_D`` units; slab s owns rows s of W_in and columns s of W_out (anchor and running memory) and every
product of the dual form that touches them, with 64-row token tiles as ``tl.dot`` operands. What couples
the slabs inside a chunk is sums over the hidden width (the boundary step's statistics, the forward u,
the reads), so a chunk is a sequence of launches (phases), each program handing its share to the next
phase through a small scratch buffer:

0. ``FOLD`` (factored state only, once): the slab of the running memory the factored state stands for,
   into per-row scratch (kernels.boundary.fold_slab).
1. ``LAG`` (Moneta, Memora): the boundary step's statistics of the running memory: the slab's shares of
   sum |W|^q (Moneta's lq projection) or of the lag token's forward W_out gelu(W_in k_0) (Memora).
2. ``SOFTMAX`` (Memora): the lag token's gradient from the summed forward, and the slab's softmax
   statistics of W_out's lag-step logits (its rows span every slab).
3. ``FORWARD``: the boundary map on the slab (copy, lq scale, lag step), which becomes the new anchor;
   then the slab's share of the chunk's forward at the anchor, u = W_out gelu(W_in k).
4. ``GRAD`` (one program per (sequence, head)): the output gradient gu from the summed u (LayerNorm
   backward, attentional bias) and coeff * (q k^T), both to scratch (computed once, not once per slab:
   this is what keeps the update spill-free); the surprise; on the factored state, the k, gu factor rows.
5. ``UPDATE``: the slab's gz, a, the reads' hidden layer and the memory update in place
   (kernels.segment.mlp_update_slab); its shares of the reads and of the scores xq . a.
6. ``OUTPUT`` (one program per (sequence, head)): the reads from the summed shares, LayerNorm, residual;
   on the factored state, after the row's last segment, the coefficients and the decay.

Launch index ``SEG`` is the row's segment: chunk ``pos // CHUNK + SEG`` (every row has its own phase);
rows with fewer segments return at once. The host loops over segments and phases without reading any
tensor (the count comes from the shapes), so a prefill is capturable in a CUDA graph
(kernels.graphs.capture), which is how its launch cost is meant to be paid on a GPU (docs/kernels.md).
A device-wide hand-over (one persistent launch, slabs spinning on counters) was not chosen: the Triton
interpreter runs programs one after another, so it could never be tested on a CPU.

Arithmetic is the fused scan's term by term (the same segment helpers), so both compute the reference's
chunk semantics; ``DOT`` is the input precision of every ``tl.dot`` through kernels.ops.mm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .boundary import (
    copy_slab,
    fold_factors,
    fold_slab,
    kl_lag_grad,
    kl_out_stats_slab,
    kl_slab,
    lq_norm_slab,
    lq_scale_slab,
    lq_scales,
    softmax_merge,
)
from .factored import filled_rows
from .ops import attentional_loss, mlp_error_grad, mlp_forward_slab, mm, row_offsets
from .rule import MemoryRule
from .segment import (
    finish_factored,
    mlp_read,
    mlp_update_slab,
    row_span,
    segment_gates,
    segment_span,
    store_key_rows,
)

PHASES = ("fold", "lag", "softmax", "forward", "grad", "update", "output")  # the PHASE codes, in order
FOLD, LAG, SOFTMAX, FORWARD, GRAD, UPDATE, OUTPUT = (tl.constexpr(code) for code in range(len(PHASES)))
STATS_WIDTH = tl.constexpr(3)  # rows per slab: the LAG phase's shares, then the SOFTMAX phase's max and sum


@triton.jit
def _summed(PART, part, rt, ck, N_SLABS: tl.constexpr, WIDTH: tl.constexpr):
    """The sum over the slabs of a (sequence, head)'s shares [BT, WIDTH] (first share at index ``part``)."""
    total = tl.zeros((rt.shape[0], WIDTH), dtype=tl.float32)
    for i in range(N_SLABS):
        total += tl.load(PART + ((part + i) * rt.shape[0] + rt[:, None]) * WIDTH + ck[None, :])
    return total


@triton.jit
def _stats_sum(STATS, part, j, ck, N_SLABS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row ``j`` [1, BK] of the slabs' boundary statistics, summed over the slabs."""
    total = tl.zeros((1, BLOCK_K), dtype=tl.float32)
    for i in range(N_SLABS):
        total += tl.load(STATS + ((part + i) * STATS_WIDTH + j) * BLOCK_K + ck[None, :])
    return total


@triton.jit(do_not_specialize=["T", "SEG"])
def slab_prefill_kernel(
    Q, K, V, O, ETA, LOG_ALPHA, DELTA, A_IN, A_OUT, M_IN, M_OUT, ROWS, COEF, DECAY, LN_W, LN_B, S, SLOTS, POS,
    LENGTHS, CU_SEQLENS, U_PART, GU, CQK, UQ_PART, SC_PART, STATS, T, SEG,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, so_b, so_h, so_t, sg_b, sg_h, sg_t,
    lq_radius, lq_inv_std_in, lq_inv_std_out, q_exp, p_exp, lp_knee, abs_eps, sharpness, memora_eps, ln_eps,
    H: tl.constexpr, DK: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, N_SLABS: tl.constexpr,
    BIAS: tl.constexpr, RETENTION: tl.constexpr, VARLEN: tl.constexpr, DOT: tl.constexpr, FACTORED: tl.constexpr,
    SURPRISE: tl.constexpr, PHASE: tl.constexpr,
):
    """Grid (N_SLABS, H, N) (OUTPUT: (1, H, N)): phase ``PHASE`` of row n's segment ``SEG`` on hidden slab s.

    Layouts, pool, slots and positions as kernels.scan.miras_scan_kernel (MLP memory). Scratch, per
    (row, head, slab): U_PART, UQ_PART [BT, BK] (shares of the forward and of the reads), SC_PART [BT, BT]
    (shares of the scores), STATS [3, BK] (the boundary step's shares); per (row, head): GU [BT, BK], CQK
    [BT, BT] (the GRAD phase's gu and coeff * q k^T). FACTORED: M_IN / M_OUT are per-row
    scratch for the running memory, ROWS / COEF / DECAY the factored state, as in the fused scan.
    """
    s = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    slot, p0, start, rows, n_valid, row = row_span(n, SLOTS, POS, LENGTHS, CU_SEQLENS, T, VARLEN)
    c = p0 // CHUNK + SEG
    if (slot < 0) | (rows <= 0) | (c > (p0 + rows - 1) // CHUNK):
        return
    s0 = s * BLOCK_D
    rt = tl.arange(0, BLOCK_T)
    ck = tl.arange(0, BLOCK_K)
    cd = tl.arange(0, BLOCK_D)
    ci = tl.arange(0, BLOCK_C)
    col_mask = ck < DK
    head = (slot * H + h) * (D * DK)
    a_in = A_IN + head
    a_out = A_OUT + head
    if FACTORED:
        m_in = M_IN + (n * H + h) * (D * DK)
        m_out = M_OUT + (n * H + h) * (D * DK)
    else:
        m_in = M_IN + head
        m_out = M_OUT + head
    _, _, _, _, RW = row_offsets(D, DK)
    factor_rows = ROWS + (slot * H + h) * (CHUNK * RW)
    part = (n * H + h) * N_SLABS  # this (row, head)'s first slab in the scratch buffers
    stats = STATS + (part + s) * (STATS_WIDTH * BLOCK_K)
    if PHASE == FOLD:
        n_old = filled_rows(p0, CHUNK)
        coef0 = tl.load(COEF + (slot * H + h) * CHUNK + ci, mask=ci < n_old, other=0.0)
        kc_t, guc = fold_factors(factor_rows, coef0, n_old, ck, D, DK, BLOCK_C)
        fold_slab(a_in, a_out, m_in, m_out, factor_rows, kc_t, guc, tl.load(DECAY + slot * H + h), n_old, s0, ck, cd,
                  D, DK, BLOCK_C, DOT)
    else:
        chunk_start, seg_start, seg_len, at_boundary, tok, in_seg, valid = segment_span(c, p0, rows, n_valid, CHUNK,
                                                                                        BLOCK_T)
        g_off = row * sg_b + h * sg_h + start * sg_t
        k_ptr = K + row * sk_b + h * sk_h + start * sk_t
        v_ptr = V + row * sv_b + h * sv_h + start * sv_t
        ln_w = tl.load(LN_W + h * DK + ck, mask=col_mask, other=0.0)[None, :]
        ln_b = tl.load(LN_B + h * DK + ck, mask=col_mask, other=0.0)[None, :]
        tile_mask = in_seg[:, None] & col_mask[None, :]
        gu_ptr = GU + ((n * H + h) * BLOCK_T + rt[:, None]) * BLOCK_K + ck[None, :]
        cqk_ptr = CQK + ((n * H + h) * BLOCK_T + rt[:, None]) * BLOCK_T + rt[None, :]
        # The segment holding the last valid token leaves its factor rows (FACTORED), from row j_first on.
        last_seg = (n_valid > seg_start) & (n_valid <= seg_start + seg_len)
        j_first = (p0 + seg_start) % CHUNK
        seg_rows = factor_rows + j_first * RW
        if PHASE < GRAD:  # the boundary step's phases, then the forward
            if at_boundary:
                # The chunk's first token (Memora's lag token) is the row's token chunk_start >= 0.
                k0 = tl.load(k_ptr + chunk_start * sk_t + ck[None, :] * sk_d, mask=col_mask[None, :],
                             other=0.0).to(tl.float32)
                v0 = tl.load(v_ptr + chunk_start * sv_t + ck[None, :] * sv_d, mask=col_mask[None, :],
                             other=0.0).to(tl.float32)
                eta0 = tl.load(ETA + g_off + chunk_start * sg_t).to(tl.float32)
                log_alpha0 = tl.load(LOG_ALPHA + g_off + chunk_start * sg_t).to(tl.float32)
                if PHASE == LAG:
                    if RETENTION == 1:
                        share_in, share_out = lq_norm_slab(m_in, m_out, s0, ck, cd, q_exp, D, DK)
                        tl.store(stats + ck, tl.where(ck == 0, share_in, tl.where(ck == 1, share_out, 0.0)))
                    else:
                        tl.store(stats + ck[None, :], mlp_forward_slab(k0, m_in, m_out, s0, ck, cd, D, DK, True,
                                                                       "ieee"))
                elif PHASE == SOFTMAX:
                    gu0 = kl_lag_grad(_stats_sum(STATS, part, 0, ck, N_SLABS, BLOCK_K), k0, v0, ln_w, ln_b, ck,
                                      ln_eps, DK)
                    slab_max, slab_sum = kl_out_stats_slab(m_in, m_out, s0, k0, gu0, eta0, log_alpha0, ck, cd,
                                                           memora_eps, D, DK)
                    tl.store(stats + BLOCK_K + ck[None, :], slab_max)
                    tl.store(stats + 2 * BLOCK_K + ck[None, :], slab_sum)
                elif RETENTION == 2:
                    gu0 = kl_lag_grad(_stats_sum(STATS, part, 0, ck, N_SLABS, BLOCK_K), k0, v0, ln_w, ln_b, ck,
                                      ln_eps, DK)
                    row_max = tl.full((1, BLOCK_K), float("-inf"), dtype=tl.float32)
                    row_sum = tl.zeros((1, BLOCK_K), dtype=tl.float32)
                    for i in range(N_SLABS):
                        share = STATS + (part + i) * (STATS_WIDTH * BLOCK_K)
                        row_max, row_sum = softmax_merge(row_max, row_sum, tl.load(share + BLOCK_K + ck[None, :]),
                                                         tl.load(share + 2 * BLOCK_K + ck[None, :]))
                    kl_slab(m_in, m_out, a_in, a_out, s0, k0, gu0, eta0, log_alpha0, row_max, row_sum, ck, cd,
                            memora_eps, D, DK)
                elif RETENTION == 1:
                    sums = _stats_sum(STATS, part, 0, ck, N_SLABS, BLOCK_K)
                    scale_in, scale_out = lq_scales(tl.sum(tl.where(ck == 0, sums, 0.0)),
                                                    tl.sum(tl.where(ck == 1, sums, 0.0)), q_exp, lq_radius,
                                                    lq_inv_std_in, lq_inv_std_out, D, DK)
                    lq_scale_slab(m_in, m_out, a_in, a_out, s0, ck, cd, scale_in, scale_out, D, DK)
                else:
                    copy_slab(m_in, m_out, a_in, a_out, s0, ck, cd, D, DK)
            if PHASE == FORWARD:
                tl.debug_barrier()
                k = tl.load(k_ptr + tok[:, None] * sk_t + ck[None, :] * sk_d, mask=tile_mask, other=0.0).to(
                    tl.float32)
                u_share = mlp_forward_slab(k, a_in, a_out, s0, ck, cd, D, DK, False, DOT)
                tl.store(U_PART + ((part + s) * BLOCK_T + rt[:, None]) * BLOCK_K + ck[None, :], u_share)
        else:
            decay, coeff, last, last_decay, _, _ = segment_gates(ETA, LOG_ALPHA, g_off, sg_t, tok, valid,
                                                                  at_boundary, RETENTION)
            q = tl.load(Q + row * sq_b + h * sq_h + (start + tok[:, None]) * sq_t + ck[None, :] * sq_d,
                        mask=tile_mask, other=0.0).to(tl.float32)
            if PHASE == OUTPUT:
                out = mlp_read(q, _summed(UQ_PART, part, rt, ck, N_SLABS, BLOCK_K),
                               _summed(SC_PART, part, rt, rt, N_SLABS, BLOCK_T), tl.load(gu_ptr), decay, coeff,
                               ln_w, ln_b, col_mask[None, :], ln_eps, DK, False, DOT)
                tl.store(O + row * so_b + h * so_h + (start + tok[:, None]) * so_t + ck[None, :], out, mask=tile_mask)
                if FACTORED:  # noqa: SIM102 (a compile-time branch around a runtime one)
                    if last_seg:
                        coef0 = tl.load(COEF + (slot * H + h) * CHUNK + ci, mask=ci < filled_rows(p0, CHUNK),
                                        other=0.0)
                        finish_factored(COEF + (slot * H + h) * CHUNK, DECAY + slot * H + h, factor_rows, coef0,
                                        tl.load(DECAY + slot * H + h), chunk_start, j_first, last, last_decay,
                                        n_valid - seg_start, ci, cd, CHUNK, RW)
            else:
                k = tl.load(k_ptr + tok[:, None] * sk_t + ck[None, :] * sk_d, mask=tile_mask, other=0.0).to(
                    tl.float32)
                if PHASE == UPDATE:
                    uq, scores = mlp_update_slab(q, k, tl.load(gu_ptr), tl.load(cqk_ptr), decay, last, last_decay,
                                                 a_in, a_out, m_in, m_out, s0, ck, cd, seg_rows, valid & last_seg, D,
                                                 DK, False, DOT, FACTORED)
                    tl.store(UQ_PART + ((part + s) * BLOCK_T + rt[:, None]) * BLOCK_K + ck[None, :], uq)
                    tl.store(SC_PART + ((part + s) * BLOCK_T + rt[:, None]) * BLOCK_T + rt[None, :], scores)
                else:  # GRAD
                    # coeff * (q k^T), which every slab's update needs: once here rather than once per slab.
                    tl.store(cqk_ptr, coeff * mm(q, tl.trans(k), False, DOT))
                    v = tl.load(v_ptr + tok[:, None] * sv_t + ck[None, :] * sv_d, mask=tile_mask, other=0.0).to(
                        tl.float32)
                    delta = 0.0
                    if BIAS == 2:
                        delta = tl.load(DELTA + g_off + tok * sg_t, mask=in_seg, other=1.0).to(tl.float32)[:, None]
                    gu, error = mlp_error_grad(_summed(U_PART, part, rt, ck, N_SLABS, BLOCK_K), k, v, delta, ln_w,
                                               ln_b, col_mask[None, :], ln_eps, p_exp, lp_knee, abs_eps, sharpness,
                                               DK, BIAS)
                    tl.store(gu_ptr, gu)
                    if SURPRISE:
                        tl.store(S + g_off + tok[:, None] * sg_t,
                                 attentional_loss(error, delta, DK, p_exp, lp_knee, BIAS), mask=valid[:, None])
                    if FACTORED:
                        store_key_rows(seg_rows, valid & last_seg, k, gu, ck, D, DK)


SLAB_PHASES = ("fold", "lag", "softmax", "forward", "update")  # grid (slabs, H, N); the others (1, H, N)


def chunk_phases(retention: int) -> list[str]:
    """The launches of one chunk for a rule's retention code (kernels.rule.RETENTION_CODES): the boundary
    step's statistics (lq: one phase; Memora's lag step: two), then forward, update, output."""
    return ["lag"] * (retention in (1, 2)) + ["softmax"] * (retention == 2) + ["forward", "grad", "update", "output"]


def prefill_kernels(config: dict, slab: int, warps: int, factored: bool) -> dict[str, tuple]:
    """(kernel, compile-time arguments, launch options) of every phase the rule runs, from the scan's launch
    config, ``slab``-wide hidden slabs and ``warps`` warps (the per-(sequence, head) phases GRAD and OUTPUT:
    8 warps); shared by the launcher and benchmarks.compile_check."""
    constexprs = {name: config[name] for name in ("H", "DK", "D", "CHUNK", "BLOCK_T", "BLOCK_K", "BLOCK_C", "BIAS",
                                                  "RETENTION", "VARLEN", "DOT", "SURPRISE")}
    constexprs.update(BLOCK_D=slab, N_SLABS=triton.cdiv(config["D"], slab), FACTORED=factored)
    phases = ["fold"] * factored + chunk_phases(config["RETENTION"])
    return {phase: (slab_prefill_kernel, dict(constexprs, PHASE=PHASES.index(phase)),
                    {"num_warps": warps if phase in SLAB_PHASES else 8, "num_stages": 1}) for phase in phases}


def slab_prefill(rule: MemoryRule, config: dict, slab: int, warps: int, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                 gates: list[Tensor], anchor: tuple[Tensor, Tensor], memory: tuple[Tensor, Tensor], factors: tuple,
                 ln_weight: Tensor, ln_bias: Tensor, surprise: Tensor, slots: Tensor, pos: Tensor, lengths: Tensor,
                 cu_seqlens: Tensor, lq_inv_std: list[float], factored: bool) -> None:
    """The prefill of kernels.scan.scan_pool for an MLP memory, split over ``slab``-wide hidden slabs: launches
    (chunk segments x phases) that never read a tensor on the host. ``memory`` is the running memory (pool,
    or per-row scratch when ``factored``; ``factors`` = (rows, coef, decay) then)."""
    n_rows, H, T = slots.shape[0], q.shape[1], q.shape[2]
    kernels = prefill_kernels(config, slab, warps, factored)
    n_slabs, block_t, block_k = triton.cdiv(config["D"], slab), config["BLOCK_T"], config["BLOCK_K"]
    u_part = torch.empty(n_rows, H, n_slabs, block_t, block_k, device=q.device, dtype=torch.float32)
    uq_part = torch.empty_like(u_part)
    gu = torch.empty(n_rows, H, block_t, block_k, device=q.device, dtype=torch.float32)
    cqk = torch.empty(n_rows, H, block_t, block_t, device=q.device, dtype=torch.float32)
    sc_part = torch.empty(n_rows, H, n_slabs, block_t, block_t, device=q.device, dtype=torch.float32)
    stats = torch.empty(n_rows, H, n_slabs, STATS_WIDTH.value, block_k, device=q.device, dtype=torch.float32)
    args = (q, k, v, out, *gates, *anchor, *memory, *factors, ln_weight, ln_bias, surprise, slots, pos, lengths,
            cu_seqlens, u_part, gu, cqk, uq_part, sc_part, stats, T)
    strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride()[:3], *gates[0].stride(), rule.lq_radius,
               *lq_inv_std, rule.q, rule.p, rule.lp_knee, rule.abs_eps, rule.sign_sharpness, rule.memora_eps,
               rule.memory_ln_eps)

    def launch(name: str, segment: int) -> None:
        kernel, constexprs, options = kernels[name]
        grid = (n_slabs if name in SLAB_PHASES else 1, H, n_rows)
        kernel[grid](*args, segment, *strides, **constexprs, **options)

    if factored:
        launch("fold", 0)
    chunk = config["CHUNK"]
    # The most chunks a row of T tokens touches, whatever its phase; rows with fewer return at once.
    for segment in range((T + chunk - 2) // chunk + 1):
        for phase in chunk_phases(config["RETENTION"]):
            launch(phase, segment)
