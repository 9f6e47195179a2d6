"""The pieces of one chunk's segment shared by the fused scan (kernels.scan) and the slab-parallel prefill
(kernels.prefill): where a row's tokens lie, the segment's in-chunk gate products, one hidden slab of the
MLP memory's dual form, the reads from the slabs' summed shares, and the factored state's bookkeeping at
the segment holding a row's last token.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .ops import clear_rows, gelu, gelu_grad, in_slab, layer_norm_rows, mm, out_slab, row_offsets


@triton.jit
def row_span(n, SLOTS, POS, LENGTHS, CU_SEQLENS, T, VARLEN: tl.constexpr):
    """Row n's (slot, start position p0, first token index, token count, valid tokens, batch row of its tensors)
    in the padded layout (LENGTHS) or the varlen one (CU_SEQLENS, every token valid)."""
    slot = tl.load(SLOTS + n).to(tl.int64)
    p0 = tl.load(POS + n).to(tl.int64)
    if VARLEN:
        start = tl.load(CU_SEQLENS + n).to(tl.int64)
        rows = tl.load(CU_SEQLENS + n + 1).to(tl.int64) - start
        n_valid = rows
        row = 0
    else:
        start = 0
        rows = T
        n_valid = tl.load(LENGTHS + n).to(tl.int64)
        row = n
    return slot, p0, start, rows, n_valid, row


@triton.jit
def segment_span(c, p0, rows, n_valid, CHUNK: tl.constexpr, BLOCK_T: tl.constexpr):
    """The row's segment in absolute chunk c: (chunk_start, the token index of the chunk's first position,
    negative when it lies before the row; seg_start, seg_len; at_boundary: the chunk starts at a valid
    token; the segment's token indices [BT]; in_seg, valid [BT])."""
    chunk_start = c * CHUNK - p0
    seg_start = tl.maximum(chunk_start, 0)
    seg_len = tl.minimum(chunk_start + CHUNK, rows) - seg_start
    at_boundary = (chunk_start >= 0) & (chunk_start < n_valid)
    rt = tl.arange(0, BLOCK_T)
    tok = seg_start + rt
    in_seg = rt < seg_len
    return chunk_start, seg_start, seg_len, at_boundary, tok, in_seg, in_seg & (tok < n_valid)


@triton.jit
def segment_gates(ETA, LOG_ALPHA, g_off, sg_t, tok, valid, at_boundary, RETENTION: tl.constexpr):
    """The segment's in-chunk gate products: decay [BT, 1], coeff [BT, BT], last [BT, 1] (coeff's last row),
    last_decay, and the first token's raw eta and log alpha (Memora's lag step)."""
    rt = tl.arange(0, tok.shape[0])
    # Padding: eta = 0 and alpha = 1, so it changes nothing.
    eta = tl.load(ETA + g_off + tok * sg_t, mask=valid, other=0.0).to(tl.float32)
    log_alpha = tl.load(LOG_ALPHA + g_off + tok * sg_t, mask=valid, other=0.0).to(tl.float32)
    eta0 = tl.sum(tl.where(rt == 0, eta, 0.0))
    log_alpha0 = tl.sum(tl.where(rt == 0, log_alpha, 0.0))
    if RETENTION == 2:
        # Memora's retention lives in the lag step; the lag token's update is the step itself.
        eta = tl.where((rt == 0) & at_boundary, 0.0, eta)
        log_alpha = tl.zeros_like(log_alpha)
    # decay[t] = prod_{j<=t} alpha_j; coeff[t, i] = eta_i prod_{i<j<=t} alpha_j (masked before exp).
    causal = rt[:, None] >= rt[None, :]
    cum = tl.cumsum(log_alpha, axis=0)
    coeff = tl.where(causal, eta[None, :] * tl.exp(tl.where(causal, cum[:, None] - cum[None, :], 0.0)), 0.0)
    cum_last = tl.sum(tl.where(rt == tok.shape[0] - 1, cum, 0.0))  # padded rows add 0: the segment's last
    return tl.exp(cum)[:, None], coeff, (eta * tl.exp(cum_last - cum))[:, None], tl.exp(cum_last), eta0, log_alpha0


@triton.jit
def mlp_update_slab(q, k, gu, coeff_qk, decay, last, last_decay, a_in, a_out, m_in, m_out, s0, ck, cd, seg_rows,
                    row_store, D: tl.constexpr, DK: tl.constexpr, VEC: tl.constexpr, DOT: tl.constexpr,
                    FACTORED: tl.constexpr):
    """Hidden slab ``s0`` of the MLP memory's dual form: gz and a at the anchor, the reads' hidden layer
    xq at the running memory, whose slab it then updates in place. Returns the slab's shares of the reads'
    W_out xq [BT, BK] and of the scores xq . a [BT, BT]. FACTORED: the flagged tokens' gz, a slabs go to
    their factor rows (token t at row t of ``seg_rows``). ``coeff_qk`` = coeff * (q k^T)."""
    _, GZ_OFF, A_OFF, _, RW = row_offsets(D, DK)
    rt = tl.arange(0, q.shape[0])
    ptr, mask = in_slab(a_in, s0, ck, cd, D, DK)
    z = mm(k, tl.load(ptr, mask=mask, other=0.0), VEC, DOT)
    x = gelu(z)
    ptr, mask = out_slab(a_out, s0, ck, cd, D, DK)
    gz = mm(gu, tl.trans(tl.load(ptr, mask=mask, other=0.0)), VEC, DOT) * gelu_grad(z)
    if FACTORED:
        row_mask = row_store[:, None] & (s0 + cd < D)[None, :]
        tl.store(seg_rows + rt[:, None] * RW + GZ_OFF + s0 + cd[None, :], gz, mask=row_mask)
        tl.store(seg_rows + rt[:, None] * RW + A_OFF + s0 + cd[None, :], x, mask=row_mask)
    # Each matrix's slab is read, used and rewritten before the next is loaded (fewer tiles live at once).
    ptr, mask = in_slab(m_in, s0, ck, cd, D, DK)
    w_in_t = tl.load(ptr, mask=mask, other=0.0)
    xq = gelu(decay * mm(q, w_in_t, VEC, DOT) - mm(coeff_qk, gz, VEC, DOT))
    w_in_t = last_decay * w_in_t - mm(tl.trans(k * last), gz, VEC, DOT)
    tl.debug_barrier()
    tl.store(ptr, w_in_t, mask=mask)
    ptr, mask = out_slab(m_out, s0, ck, cd, D, DK)
    w_out_t = tl.load(ptr, mask=mask, other=0.0)
    uq = mm(xq, w_out_t, VEC, DOT)
    w_out_t = last_decay * w_out_t - mm(tl.trans(x * last), gu, VEC, DOT)
    tl.debug_barrier()
    tl.store(ptr, w_out_t, mask=mask)
    return uq, mm(xq, tl.trans(x), VEC, DOT)


@triton.jit
def mlp_read(q, uq, scores, gu, decay, coeff, ln_w, ln_b, col_mask, ln_eps, DK: tl.constexpr, VEC: tl.constexpr,
             DOT: tl.constexpr):
    """The reads q + LN(decay W_out xq - (coeff * scores) gu) from the slabs' summed shares uq, scores."""
    uq = decay * uq - mm(coeff * scores, gu, VEC, DOT)
    return q + layer_norm_rows(uq, ln_w, ln_b, col_mask, DK, ln_eps)[0]


@triton.jit
def store_key_rows(seg_rows, row_store, k, gu, ck, D: tl.constexpr, DK: tl.constexpr):
    """The flagged tokens' k and gu (at the anchor) into their factor rows, token t at row t of ``seg_rows``."""
    K_OFF, _, _, GU_OFF, RW = row_offsets(D, DK)
    rt = tl.arange(0, k.shape[0])
    mask = row_store[:, None] & (ck < DK)[None, :]
    tl.store(seg_rows + rt[:, None] * RW + K_OFF + ck[None, :], k, mask=mask)
    tl.store(seg_rows + rt[:, None] * RW + GU_OFF + ck[None, :], gu, mask=mask)


@triton.jit
def finish_factored(coef_ptr, decay_ptr, factor_rows, coef0, decay0, chunk_start, j_first, last, last_decay,
                    n_new, ci, cw, CHUNK: tl.constexpr, RW: tl.constexpr):
    """The coefficients and the decay of a factored state after the segment holding the row's last token
    (its ``n_new`` tokens from row ``j_first`` on): old rows (the segment continues a chunk) decay with it,
    row j_first + t takes token t's coefficient at the segment's end (``last`` [BT, 1]); rows past the last
    token, and their coefficients, hold 0."""
    rt = tl.arange(0, last.shape[0])
    continued = chunk_start < 0
    kept = tl.where(continued & (ci < j_first), coef0 * last_decay, 0.0)
    new = tl.sum(tl.where(ci[:, None] == j_first + rt[None, :], tl.reshape(last, (last.shape[0],))[None, :], 0.0),
                 axis=1)
    tl.store(coef_ptr + ci, kept + new, mask=ci < CHUNK)
    tl.store(decay_ptr, tl.where(continued, decay0, 1.0) * last_decay)
    clear_rows(factor_rows, j_first + n_new, ci, cw, CHUNK, RW)
