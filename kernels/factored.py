"""Decode of the MLP memories on the factored state: the chunk's anchor plus one factor row per token of the
chunk so far, instead of a second copy of the memory (models/SPEC.md, "the factored decode state").

Per pool slot and head the state is the anchor ``A_in`` [D, d], ``A_out`` [d, D], the factor rows
[b, 2(D + d)] laid out as ``(k_i, gz_i, a_i, gu_i)`` (the gradients of token i at the anchor are
``gz_i k_i^T`` and ``gu_i a_i^T``), their coefficients ``C_i`` [b] and the decay [1]. The running memory
it stands for is never stored:

    W_in = decay A_in - sum_i C_i gz_i k_i^T,    W_out = decay A_out - sum_i C_i gu_i a_i^T.

The number of filled rows comes from the position: j = pos % b rows, or all b when j == 0 and pos > 0
(the chunk is complete and the next token folds it). A decode step of a token that does not start a
chunk reads the anchor (``A_in`` once for the key's forward and the query's read, ``A_out`` for the
forward, then again for the backward and the read) and the filled rows, and writes one row, the
coefficients and the decay: nothing of the memory's size. A token that starts a chunk first folds the
rows into the anchor and applies the rule's boundary map in place (kernels.boundary), once per chunk.

Two ways to run it, as for the running layout (kernels.decode): the fused kernel, one program per
(sequence, head), which also takes the boundary rows; and for the other rows three slab-parallel
launches (forward, update, output) that keep more loads in flight. In place through ``slots`` (a
negative slot is skipped), every branch decided on the device: no host syncs, CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .boundary import fold_rows, kl_boundary, lq_boundary
from .decode import decode_forward_kernel, program_row
from .ops import (
    attentional_loss,
    clear_rows,
    gelu,
    gelu_grad,
    in_slab,
    layer_norm_rows,
    load_rows,
    mlp_error_grad,
    mm,
    out_slab,
    row_offsets,
    store_row,
)
from .rule import MemoryRule


@triton.jit
def filled_rows(pos, CHUNK: tl.constexpr):
    """Factor rows filled before the token at ``pos``: pos % b, or b if the chunk before it is complete."""
    j = pos % CHUNK
    return tl.where(j > 0, j, tl.where(pos > 0, CHUNK, 0))


@triton.jit
def _load_token(Q, K, V, ETA, LOG_ALPHA, DELTA, n, h, valid, boundary, ck, sq_b, sq_h, sq_d, sk_b, sk_h, sk_d,
                sv_b, sv_h, sv_d, sg_b, sg_h, DK: tl.constexpr, BIAS: tl.constexpr, RETENTION: tl.constexpr):
    """q, k, v [1, BK] and the token's in-chunk eta, log alpha and delta. A padding token (length 0)
    changes nothing (eta 0, alpha 1); Memora's retention lives in its boundary step, whose token's
    in-chunk eta is 0 (the lag step is its update). Also returns the raw eta, log alpha for that step."""
    col_mask = (ck < DK)[None, :]
    q = tl.load(Q + n * sq_b + h * sq_h + ck[None, :] * sq_d, mask=col_mask, other=0.0).to(tl.float32)
    k = tl.load(K + n * sk_b + h * sk_h + ck[None, :] * sk_d, mask=col_mask, other=0.0).to(tl.float32)
    v = tl.load(V + n * sv_b + h * sv_h + ck[None, :] * sv_d, mask=col_mask, other=0.0).to(tl.float32)
    raw_eta = tl.load(ETA + n * sg_b + h * sg_h).to(tl.float32)
    raw_log_alpha = tl.load(LOG_ALPHA + n * sg_b + h * sg_h).to(tl.float32)
    eta = tl.where(valid, raw_eta, 0.0)
    log_alpha = tl.where(valid, raw_log_alpha, 0.0)
    if RETENTION == 2:
        eta = tl.where(boundary, 0.0, eta)
        log_alpha = 0.0
    delta = 0.0
    if BIAS == 2:
        delta = tl.load(DELTA + n * sg_b + h * sg_h).to(tl.float32)
    return q, k, v, eta, log_alpha, delta, raw_eta, raw_log_alpha


@triton.jit
def _read_slab(z, zq0, w_out_t, gu, rows, ci, n_old, cq, eta, kq, decay, s0, cd, D: tl.constexpr,
               DK: tl.constexpr):
    """Hidden slab ``s0`` of the new token's factors gz, a = gelu(z) (at the anchor), and of the read of q
    at the updated memory: its hidden layer xq = gelu(W_in q), its share of decay A_out xq [1, BK] and of
    the scores a_i . xq [BC] of the old rows and (at index ``n_old``) of the new one. ``zq0`` = A_in q,
    ``cq`` [BC] = C_i (k_i . q) of the old rows, ``kq`` = k . q."""
    _, GZ_OFF, A_OFF, _, RW = row_offsets(D, DK)
    filled = ci < n_old
    gz = mm(gu, tl.trans(w_out_t), True, "ieee") * gelu_grad(z)
    a = gelu(z)
    gz_rows = load_rows(rows, ci, filled, GZ_OFF + s0, cd, D - s0, RW)  # [BC, BD]
    zq = decay * zq0 - tl.sum(cq[:, None] * gz_rows, axis=0, keep_dims=True) - eta * kq * gz
    xq = gelu(zq)
    uq = decay * mm(xq, w_out_t, True, "ieee")
    scores = tl.sum(load_rows(rows, ci, filled, A_OFF + s0, cd, D - s0, RW) * xq, axis=1)
    scores = tl.where(ci == n_old, tl.sum(a * xq), scores)
    return gz, a, uq, scores


@triton.jit
def _old_row_scores(rows, ci, n_old, coef, q, ck, D: tl.constexpr, DK: tl.constexpr):
    """C_i (k_i . q) for the old rows [BC]."""
    K_OFF, _, _, _, RW = row_offsets(D, DK)
    return coef * tl.sum(load_rows(rows, ci, ci < n_old, K_OFF, ck, DK, RW) * q, axis=1)


@triton.jit
def _finish(q, uq, scores, coef, rows, ci, n_gu, ck, ln_w, ln_b, ln_eps, D: tl.constexpr, DK: tl.constexpr):
    """The read q + LN(uq - sum_i C_i (a_i . xq) gu_i) over the first ``n_gu`` rows' stored gu."""
    _, _, _, GU_OFF, RW = row_offsets(D, DK)
    gu_rows = load_rows(rows, ci, ci < n_gu, GU_OFF, ck, DK, RW)  # [BC, BK]
    uq = uq - tl.sum((coef * scores)[:, None] * gu_rows, axis=0, keep_dims=True)
    return q + layer_norm_rows(uq, ln_w, ln_b, (ck < DK)[None, :], DK, ln_eps)[0]


@triton.jit
def factored_decode_kernel(
    Q, K, V, O, ETA, LOG_ALPHA, DELTA, A_IN, A_OUT, ROWS, COEF, DECAY, LN_W, LN_B, Z, S, SLOTS, POS, LENGTHS,
    sq_b, sq_h, sq_d, sk_b, sk_h, sk_d, sv_b, sv_h, sv_d, so_b, so_h, sg_b, sg_h,
    lq_radius, lq_inv_std_in, lq_inv_std_out, q_exp, p_exp, lp_knee, abs_eps, sharpness, memora_eps, ln_eps,
    H: tl.constexpr, DK: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BIAS: tl.constexpr, RETENTION: tl.constexpr,
    DOT: tl.constexpr, BOUNDARY_ROWS_ONLY: tl.constexpr, SURPRISE: tl.constexpr,
):
    """Grid (N, H): one decode token of row n (q, k, v [N, H, 1, d]) on pool slot SLOTS[n] at POS[n].
    Z [N, H, 2, D] is scratch. BOUNDARY_ROWS_ONLY: only rows whose token starts a chunk run (the split
    kernels take the others). SURPRISE: S (laid out as the gates) takes the token's loss at the anchor."""
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    slot = tl.load(SLOTS + n).to(tl.int64)
    if slot < 0:
        return
    valid = tl.load(LENGTHS + n) > 0
    p = tl.load(POS + n).to(tl.int64)
    boundary = valid & (p % CHUNK == 0)
    if BOUNDARY_ROWS_ONLY:  # noqa: SIM102 (a compile-time branch around a runtime one)
        if (p % CHUNK != 0) | (tl.load(LENGTHS + n) <= 0):
            return
    K_OFF, GZ_OFF, A_OFF, GU_OFF, RW = row_offsets(D, DK)
    head = slot * H + h
    a_in = A_IN + head * (D * DK)
    a_out = A_OUT + head * (D * DK)
    rows = ROWS + head * (CHUNK * RW)
    ck = tl.arange(0, BLOCK_K)
    cd = tl.arange(0, BLOCK_D)
    ci = tl.arange(0, BLOCK_C)
    col_mask = (ck < DK)[None, :]
    ln_w = tl.load(LN_W + h * DK + ck, mask=ck < DK, other=0.0)[None, :]
    ln_b = tl.load(LN_B + h * DK + ck, mask=ck < DK, other=0.0)[None, :]
    q, k, v, eta, log_alpha, delta, raw_eta, raw_log_alpha = _load_token(
        Q, K, V, ETA, LOG_ALPHA, DELTA, n, h, valid, boundary, ck, sq_b, sq_h, sq_d, sk_b, sk_h, sk_d, sv_b, sv_h,
        sv_d, sg_b, sg_h, DK, BIAS, RETENTION)
    n_old = filled_rows(p, CHUNK)
    coef = tl.load(COEF + head * CHUNK + ci, mask=ci < n_old, other=0.0)
    decay = tl.load(DECAY + head)
    if boundary:
        # The chunk is complete (or the state is fresh, no rows): its running memory becomes the anchor.
        fold_rows(a_in, a_out, a_in, a_out, rows, coef, decay, n_old, ck, cd, D, DK, BLOCK_D, BLOCK_C, DOT)
        tl.debug_barrier()
        if RETENTION == 2:
            kl_boundary(a_in, a_out, a_in, a_out, k, v, raw_eta, raw_log_alpha, ln_w, ln_b, ck, cd, ln_eps,
                        memora_eps, D, DK, BLOCK_D)
        elif RETENTION == 1:
            lq_boundary(a_in, a_out, a_in, a_out, ck, cd, q_exp, lq_radius, lq_inv_std_in, lq_inv_std_out, D, DK,
                        BLOCK_D, 0)
        tl.debug_barrier()
        clear_rows(rows, 1, ci, cd, CHUNK, RW)  # the new chunk's rows start at 0; row 0 is this token's
    n_old = tl.where(boundary, 0, n_old)
    alpha = tl.exp(log_alpha)
    coef = tl.where(boundary, 0.0, coef) * alpha
    decay = tl.where(boundary, 1.0, decay) * alpha

    # Pass 1 over the anchor: the key's forward (z, u) and the query's first layer at the anchor.
    z_row = Z + (n * H + h) * (2 * D)
    u = tl.zeros((1, BLOCK_K), dtype=tl.float32)
    for s0 in range(0, D, BLOCK_D):
        ptr, mask = in_slab(a_in, s0, ck, cd, D, DK)
        w_in_t = tl.load(ptr, mask=mask, other=0.0)
        z = mm(k, w_in_t, True, "ieee")
        ptr, mask = out_slab(a_out, s0, ck, cd, D, DK)
        u += mm(gelu(z), tl.load(ptr, mask=mask, other=0.0), True, "ieee")
        in_d = (s0 + cd < D)[None, :]
        tl.store(z_row + s0 + cd[None, :], z, mask=in_d)
        tl.store(z_row + D + s0 + cd[None, :], mm(q, w_in_t, True, "ieee"), mask=in_d)
    gu, error = mlp_error_grad(u, k, v, delta, ln_w, ln_b, col_mask, ln_eps, p_exp, lp_knee, abs_eps, sharpness, DK,
                               BIAS)
    if SURPRISE:
        tl.store(S + n * sg_b + h * sg_h, tl.sum(attentional_loss(error, delta, DK, p_exp, lp_knee, BIAS)),
                 mask=valid)
    tl.debug_barrier()

    # Pass 2: the key's backward (the new row) and the query's read through the anchor and the rows.
    cq = _old_row_scores(rows, ci, n_old, coef, q, ck, D, DK)
    kq = tl.sum(k * q)
    new_row = rows + n_old * RW
    uq = tl.zeros((1, BLOCK_K), dtype=tl.float32)
    scores = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, D, BLOCK_D):
        in_d = (s0 + cd < D)[None, :]
        z = tl.load(z_row + s0 + cd[None, :], mask=in_d, other=0.0)
        zq0 = tl.load(z_row + D + s0 + cd[None, :], mask=in_d, other=0.0)
        ptr, mask = out_slab(a_out, s0, ck, cd, D, DK)
        gz, a, uq_part, score_part = _read_slab(z, zq0, tl.load(ptr, mask=mask, other=0.0), gu, rows, ci, n_old, cq,
                                                eta, kq, decay, s0, cd, D, DK)
        uq += uq_part
        scores += score_part
        store_row(new_row, GZ_OFF + s0, cd, D - s0, gz, valid)
        store_row(new_row, A_OFF + s0, cd, D - s0, a, valid)
    coef = tl.where(ci == n_old, eta, coef)
    uq -= eta * tl.sum(tl.where(ci == n_old, scores, 0.0)) * gu  # the new row: its gu is not stored yet
    out = _finish(q, uq, scores, coef, rows, ci, n_old, ck, ln_w, ln_b, ln_eps, D, DK)
    tl.store(O + n * so_b + h * so_h + ck[None, :], out, mask=col_mask)
    store_row(new_row, K_OFF, ck, DK, k, valid)
    store_row(new_row, GU_OFF, ck, DK, gu, valid)
    tl.store(COEF + head * CHUNK + ci, coef, mask=(ci < CHUNK) & valid)
    tl.store(DECAY + head, decay, mask=valid)


@triton.jit
def factored_update_kernel(
    Q, K, V, ETA, LOG_ALPHA, DELTA, A_OUT, ROWS, COEF, DECAY, LN_W, LN_B, Z, U_PART, UQ_PART, SCORE_PART, S,
    SLOTS, POS, LENGTHS, sq_b, sq_h, sq_d, sk_b, sk_h, sk_d, sv_b, sv_h, sv_d, sg_b, sg_h,
    p_exp, lp_knee, abs_eps, sharpness, ln_eps,
    H: tl.constexpr, DK: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BIAS: tl.constexpr, RETENTION: tl.constexpr,
    SURPRISE: tl.constexpr,
):
    """Grid (N, H, slabs), rows that take no boundary step: sums the forward's shares of u into the output
    gradient gu, writes the slab's part of the new row (slab 0 also its k and gu) and the slab's shares of
    the read (UQ_PART) and of the rows' scores (SCORE_PART)."""
    n, h, slot, valid, skip = program_row(SLOTS, POS, LENGTHS, CHUNK)
    if skip:
        return
    s = tl.program_id(2)
    n_slabs = tl.num_programs(2)
    K_OFF, GZ_OFF, A_OFF, GU_OFF, RW = row_offsets(D, DK)
    ck = tl.arange(0, BLOCK_K)
    cd = tl.arange(0, BLOCK_D)
    ci = tl.arange(0, BLOCK_C)
    s0 = s * BLOCK_D
    row = n * H + h
    head = slot * H + h
    rows = ROWS + head * (CHUNK * RW)
    q, k, v, eta, log_alpha, delta, _, _ = _load_token(
        Q, K, V, ETA, LOG_ALPHA, DELTA, n, h, valid, False, ck, sq_b, sq_h, sq_d, sk_b, sk_h, sk_d, sv_b, sv_h, sv_d,
        sg_b, sg_h, DK, BIAS, RETENTION)
    ln_w = tl.load(LN_W + h * DK + ck, mask=ck < DK, other=0.0)[None, :]
    ln_b = tl.load(LN_B + h * DK + ck, mask=ck < DK, other=0.0)[None, :]
    u = tl.zeros((1, BLOCK_K), dtype=tl.float32)
    for i in range(n_slabs):
        u += tl.load(U_PART + (row * n_slabs + i) * BLOCK_K + ck[None, :])
    gu, error = mlp_error_grad(u, k, v, delta, ln_w, ln_b, (ck < DK)[None, :], ln_eps, p_exp, lp_knee, abs_eps,
                               sharpness, DK, BIAS)
    if SURPRISE:  # slab 0 writes the token's loss
        tl.store(S + n * sg_b + h * sg_h, tl.sum(attentional_loss(error, delta, DK, p_exp, lp_knee, BIAS)),
                 mask=valid & (s == 0))

    n_old = filled_rows(tl.load(POS + n).to(tl.int64), CHUNK)
    alpha = tl.exp(log_alpha)
    coef = tl.load(COEF + head * CHUNK + ci, mask=ci < n_old, other=0.0) * alpha
    decay = tl.load(DECAY + head) * alpha
    cq = _old_row_scores(rows, ci, n_old, coef, q, ck, D, DK)
    in_d = (s0 + cd < D)[None, :]
    z = tl.load(Z + row * (2 * D) + s0 + cd[None, :], mask=in_d, other=0.0)
    zq0 = tl.load(Z + row * (2 * D) + D + s0 + cd[None, :], mask=in_d, other=0.0)
    ptr, mask = out_slab(A_OUT + head * (D * DK), s0, ck, cd, D, DK)
    gz, a, uq, scores = _read_slab(z, zq0, tl.load(ptr, mask=mask, other=0.0), gu, rows, ci, n_old, cq, eta,
                                   tl.sum(k * q), decay, s0, cd, D, DK)
    new_row = rows + n_old * RW
    store_row(new_row, GZ_OFF + s0, cd, D - s0, gz, valid)
    store_row(new_row, A_OFF + s0, cd, D - s0, a, valid)
    store_row(new_row, K_OFF, ck, DK, k, valid & (s == 0))
    store_row(new_row, GU_OFF, ck, DK, gu, valid & (s == 0))
    tl.store(UQ_PART + (row * n_slabs + s) * BLOCK_K + ck[None, :], uq)
    tl.store(SCORE_PART + (row * n_slabs + s) * BLOCK_C + ci, scores)


@triton.jit
def factored_output_kernel(
    Q, O, ETA, LOG_ALPHA, ROWS, COEF, DECAY, LN_W, LN_B, UQ_PART, SCORE_PART, SLOTS, POS, LENGTHS,
    sq_b, sq_h, sq_d, so_b, so_h, sg_b, sg_h, ln_eps,
    H: tl.constexpr, DK: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr, N_SLABS: tl.constexpr, RETENTION: tl.constexpr,
):
    """Grid (N, H): sums the read's and the scores' shares, subtracts the rows' terms (the new row's gu is
    stored by now), LayerNorm, residual; writes the coefficients and the decay."""
    n, h, slot, valid, skip = program_row(SLOTS, POS, LENGTHS, CHUNK)
    if skip:
        return
    ck = tl.arange(0, BLOCK_K)
    ci = tl.arange(0, BLOCK_C)
    row = n * H + h
    head = slot * H + h
    uq = tl.zeros((1, BLOCK_K), dtype=tl.float32)
    scores = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(N_SLABS):
        uq += tl.load(UQ_PART + (row * N_SLABS + i) * BLOCK_K + ck[None, :])
        scores += tl.load(SCORE_PART + (row * N_SLABS + i) * BLOCK_C + ci)
    q = tl.load(Q + n * sq_b + h * sq_h + ck[None, :] * sq_d, mask=(ck < DK)[None, :], other=0.0).to(tl.float32)
    eta = tl.where(valid, tl.load(ETA + n * sg_b + h * sg_h).to(tl.float32), 0.0)
    log_alpha = tl.where(valid, tl.load(LOG_ALPHA + n * sg_b + h * sg_h).to(tl.float32), 0.0)
    if RETENTION == 2:
        log_alpha = 0.0
    alpha = tl.exp(log_alpha)
    n_old = filled_rows(tl.load(POS + n).to(tl.int64), CHUNK)
    coef = tl.load(COEF + head * CHUNK + ci, mask=ci < n_old, other=0.0) * alpha
    coef = tl.where(ci == n_old, eta, coef)
    ln_w = tl.load(LN_W + h * DK + ck, mask=ck < DK, other=0.0)[None, :]
    ln_b = tl.load(LN_B + h * DK + ck, mask=ck < DK, other=0.0)[None, :]
    _, _, _, _, RW = row_offsets(D, DK)
    out = _finish(q, uq, scores, coef, ROWS + head * (CHUNK * RW), ci, n_old + valid.to(tl.int64), ck, ln_w, ln_b,
                  ln_eps, D, DK)
    tl.store(O + n * so_b + h * so_h + ck[None, :], out, mask=(ck < DK)[None, :])
    tl.store(COEF + head * CHUNK + ci, coef, mask=(ci < CHUNK) & valid)
    tl.store(DECAY + head, tl.load(DECAY + head) * alpha, mask=valid)


def factored_kernels(config: dict, slab: int, warps: int) -> dict[str, tuple]:
    """(kernel, compile-time arguments, launch options) of the factored decode: the fused kernel (every row,
    or with ``slab`` > 0 only the rows that start a chunk) and the three split kernels; from the scan's
    launch config, shared by the launcher and benchmarks.compile_check."""
    shape = dict(H=config["H"], DK=config["DK"], CHUNK=config["CHUNK"], BLOCK_K=config["BLOCK_K"])
    rule = dict(BIAS=config["BIAS"], RETENTION=config["RETENTION"])
    block_c = config["BLOCK_C"]
    fused = dict(shape, D=config["D"], BLOCK_D=config["BLOCK_D"], BLOCK_C=block_c, **rule, DOT=config["DOT"],
                 BOUNDARY_ROWS_ONLY=slab > 0, SURPRISE=config["SURPRISE"])
    kernels = {"fused": (factored_decode_kernel, fused, {"num_warps": config["num_warps"]})}
    if slab > 0:
        slabs = dict(shape, D=config["D"], BLOCK_D=slab)
        kernels.update({
            "forward": (decode_forward_kernel, dict(slabs, FACTORED=True), {"num_warps": warps}),
            "update": (factored_update_kernel, dict(slabs, BLOCK_C=block_c, **rule, SURPRISE=config["SURPRISE"]),
                       {"num_warps": warps}),
            "output": (factored_output_kernel, dict(shape, D=config["D"], BLOCK_C=block_c,
                                                    N_SLABS=triton.cdiv(config["D"], slab),
                                                    RETENTION=config["RETENTION"]), {"num_warps": 1}),
        })
    return kernels


def factored_decode(rule: MemoryRule, config: dict, slab: int, warps: int, q: Tensor, k: Tensor, v: Tensor,
                    out: Tensor, gates: list[Tensor], anchor: tuple[Tensor, Tensor], rows: Tensor, coef: Tensor,
                    decay: Tensor, ln_weight: Tensor, ln_bias: Tensor, slots: Tensor, pos: Tensor, lengths: Tensor,
                    lq_inv_std: list[float], surprise: Tensor) -> None:
    """One decode token per row (q, k, v [N, H, 1, d]; gates [N, H, 1]) on the factored pool, in place:
    the fused kernel for every row (``slab`` 0) or for the rows that start a chunk, and the split kernels
    over ``slab``-wide hidden slabs of ``warps`` warps for the others. ``config`` is the scan's launch
    config (shapes, rule codes, the fused kernel's slab width and warps); with its ``SURPRISE``, ``surprise``
    (laid out as the gates) takes each token's loss at the anchor."""
    n_rows, H = q.shape[0], q.shape[1]
    D, block_k, block_c = config["D"], config["BLOCK_K"], config["BLOCK_C"]
    kernels = factored_kernels(config, slab, warps)
    z = torch.empty(n_rows, H, 2, D, device=q.device, dtype=torch.float32)
    sq, sk, sv, so, sg = q.stride(), k.stride(), v.stride(), out.stride(), gates[0].stride()
    kernel, constexprs, options = kernels["fused"]
    kernel[(n_rows, H)](q, k, v, out, *gates, *anchor, rows, coef, decay, ln_weight, ln_bias, z, surprise, slots, pos,
                        lengths,
                        sq[0], sq[1], sq[3], sk[0], sk[1], sk[3], sv[0], sv[1], sv[3], so[0], so[1], sg[0], sg[1],
                        rule.lq_radius, *lq_inv_std, rule.q, rule.p, rule.lp_knee, rule.abs_eps, rule.sign_sharpness,
                        rule.memora_eps, rule.memory_ln_eps, **constexprs, **options)
    if slab == 0:
        return
    n_slabs = kernels["output"][1]["N_SLABS"]
    u_part = torch.empty(n_rows, H, n_slabs, block_k, device=q.device, dtype=torch.float32)
    uq_part = torch.empty_like(u_part)
    score_part = torch.empty(n_rows, H, n_slabs, block_c, device=q.device, dtype=torch.float32)
    grid = (n_rows, H, n_slabs)
    kernel, constexprs, options = kernels["forward"]
    kernel[grid](q, k, anchor[0], anchor[1], z, u_part, slots, pos, lengths, sq[0], sq[1], sq[3], sk[0], sk[1], sk[3],
                 **constexprs, **options)
    kernel, constexprs, options = kernels["update"]
    kernel[grid](q, k, v, *gates, anchor[1], rows, coef, decay, ln_weight, ln_bias, z, u_part, uq_part, score_part,
                 surprise, slots, pos, lengths, sq[0], sq[1], sq[3], sk[0], sk[1], sk[3], sv[0], sv[1], sv[3], sg[0],
                 sg[1], rule.p, rule.lp_knee, rule.abs_eps, rule.sign_sharpness, rule.memory_ln_eps, **constexprs,
                 **options)
    kernel, constexprs, options = kernels["output"]
    kernel[(n_rows, H)](q, out, gates[0], gates[1], rows, coef, decay, ln_weight, ln_bias, uq_part, score_part, slots,
                        pos, lengths, sq[0], sq[1], sq[3], so[0], so[1], sg[0], sg[1], rule.memory_ln_eps, **constexprs,
                        **options)
