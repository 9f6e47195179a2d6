"""The rules' chunk-boundary maps in Triton, in place on a memory streamed slab by slab: the running memory
becomes the new anchor after a copy, Moneta's lq projection or Memora's lag-token softmax step
(models.memory.boundary_step). And the fold of the factored state (anchor + the chunk's factor rows) into
the running memory it stands for, which precedes the boundary map when the state is factored.

Each map reads the source memory ``m`` and writes both ``m`` and the anchor ``a``; they may be the same
tensor (the factored decode folds into the anchor, then maps it in place): every slab is read before it is
overwritten, behind a barrier.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .ops import (
    gelu,
    gelu_grad,
    in_slab,
    load_rows,
    mlp_error_grad,
    mlp_forward,
    mm,
    out_slab,
    pow_pos,
    row_offsets,
)


@triton.jit
def square(base, ck, DK: tl.constexpr):
    """Pointers and mask of W^T for the linear memory (W is [DK, DK]): element (j, i) is W[i, j]."""
    ci = tl.arange(0, ck.shape[0])
    return base + ci[None, :] * DK + ck[:, None], (ck < DK)[:, None] & (ci < DK)[None, :]


@triton.jit
def copy_boundary(src_a, src_b, dst_a, dst_b, ck, cd, D: tl.constexpr, DK: tl.constexpr,
                   BLOCK_D: tl.constexpr, MEMORY: tl.constexpr):
    """The plain boundary step: the anchor becomes the running memory."""
    if MEMORY == 1:
        ptr, mask = square(src_a, ck, DK)
        w = tl.load(ptr, mask=mask)
        ptr, mask = square(dst_a, ck, DK)
        tl.store(ptr, w, mask=mask)
    else:
        for s0 in range(0, D, BLOCK_D):
            copy_slab(src_a, src_b, dst_a, dst_b, s0, ck, cd, D, DK)


@triton.jit
def copy_slab(src_a, src_b, dst_a, dst_b, s0, ck, cd, D: tl.constexpr, DK: tl.constexpr):
    """Hidden slab ``s0`` of the plain boundary step (MLP memory)."""
    ptr, mask = in_slab(src_a, s0, ck, cd, D, DK)
    w = tl.load(ptr, mask=mask)
    ptr, mask = in_slab(dst_a, s0, ck, cd, D, DK)
    tl.store(ptr, w, mask=mask)
    ptr, mask = out_slab(src_b, s0, ck, cd, D, DK)
    w = tl.load(ptr, mask=mask)
    ptr, mask = out_slab(dst_b, s0, ck, cd, D, DK)
    tl.store(ptr, w, mask=mask)


@triton.jit
def _lq_scale(total, numel, inv_std, q_exp, radius):
    nu = pow_pos(total / numel, 1.0 / q_exp) * inv_std
    return tl.minimum(radius / nu, 1.0)


@triton.jit
def lq_boundary(m_a, m_b, a_a, a_b, ck, cd, q_exp, radius, inv_std_a, inv_std_b, D: tl.constexpr,
                 DK: tl.constexpr, BLOCK_D: tl.constexpr, MEMORY: tl.constexpr):
    """Moneta: W <- W * min(1, radius / nu(W)), nu = (mean |W|^q)^(1/q) / init_std, per matrix."""
    if MEMORY == 1:
        ptr, mask = square(m_a, ck, DK)
        w = tl.load(ptr, mask=mask, other=0.0)
        w = w * _lq_scale(tl.sum(pow_pos(tl.abs(w), q_exp)), DK * DK, inv_std_a, q_exp, radius)
        tl.debug_barrier()
        tl.store(ptr, w, mask=mask)
        ptr, mask = square(a_a, ck, DK)
        tl.store(ptr, w, mask=mask)
    else:
        sum_in = 0.0
        sum_out = 0.0
        for s0 in range(0, D, BLOCK_D):
            part_in, part_out = lq_norm_slab(m_a, m_b, s0, ck, cd, q_exp, D, DK)
            sum_in += part_in
            sum_out += part_out
        scale_in, scale_out = lq_scales(sum_in, sum_out, q_exp, radius, inv_std_a, inv_std_b, D, DK)
        for s0 in range(0, D, BLOCK_D):
            lq_scale_slab(m_a, m_b, a_a, a_b, s0, ck, cd, scale_in, scale_out, D, DK)


@triton.jit
def lq_norm_slab(m_a, m_b, s0, ck, cd, q_exp, D: tl.constexpr, DK: tl.constexpr):
    """Hidden slab ``s0``'s shares of sum |W|^q for W_in and W_out (MLP memory)."""
    ptr, mask = in_slab(m_a, s0, ck, cd, D, DK)
    part_in = tl.sum(pow_pos(tl.abs(tl.load(ptr, mask=mask, other=0.0)), q_exp))
    ptr, mask = out_slab(m_b, s0, ck, cd, D, DK)
    part_out = tl.sum(pow_pos(tl.abs(tl.load(ptr, mask=mask, other=0.0)), q_exp))
    return part_in, part_out


@triton.jit
def lq_scales(sum_in, sum_out, q_exp, radius, inv_std_a, inv_std_b, D: tl.constexpr, DK: tl.constexpr):
    """The lq projection's scale of W_in and W_out from their sums of |W|^q (MLP memory)."""
    return (_lq_scale(sum_in, D * DK, inv_std_a, q_exp, radius),
            _lq_scale(sum_out, D * DK, inv_std_b, q_exp, radius))


@triton.jit
def lq_scale_slab(m_a, m_b, a_a, a_b, s0, ck, cd, scale_in, scale_out, D: tl.constexpr, DK: tl.constexpr):
    """Hidden slab ``s0`` of Moneta's boundary step, its scales known: written as memory and anchor."""
    ptr, mask = in_slab(m_a, s0, ck, cd, D, DK)
    w_in = tl.load(ptr, mask=mask) * scale_in
    ptr_out, mask_out = out_slab(m_b, s0, ck, cd, D, DK)
    w_out = tl.load(ptr_out, mask=mask_out) * scale_out
    _store_boundary_slab(m_a, m_b, a_a, a_b, s0, ck, cd, w_in, w_out, D, DK)


@triton.jit
def _store_boundary_slab(m_in, m_out, a_in, a_out, s0, ck, cd, w_in, w_out, D: tl.constexpr, DK: tl.constexpr):
    """Write one slab of the memory after a chunk-boundary step: it is both the running memory and the
    new anchor. The barrier keeps every thread's reads of the old slab before the overwrite."""
    tl.debug_barrier()
    ptr, mask = in_slab(m_in, s0, ck, cd, D, DK)
    tl.store(ptr, w_in, mask=mask)
    ptr, mask = out_slab(m_out, s0, ck, cd, D, DK)
    tl.store(ptr, w_out, mask=mask)
    ptr, mask = in_slab(a_in, s0, ck, cd, D, DK)
    tl.store(ptr, w_in, mask=mask)
    ptr, mask = out_slab(a_out, s0, ck, cd, D, DK)
    tl.store(ptr, w_out, mask=mask)


@triton.jit
def _kl_out_logits(w_out_t, x, gu, alpha, eta, memora_eps, D: tl.constexpr):
    """Memora's W_out^T logits alpha * log(max(W / D, eps)) - eta * grad, grad^T = x^T gu ([BD, BK])."""
    return alpha * tl.log(tl.maximum(w_out_t / D, memora_eps)) - eta * mm(tl.trans(x), gu, True, "ieee")


@triton.jit
def kl_boundary(m_in, m_out, a_in, a_out, k0, v0, eta0, log_alpha0, ln_w, ln_b, ck, cd, ln_eps, memora_eps,
                 D: tl.constexpr, DK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Memora's lag step on the chunk's first token (models.memory.memora_lag_step):
    W <- fan_in * softmax_rows(alpha_0 log(max(W / fan_in, eps)) - eta_0 grad l(W; k_0, v_0)).

    W_in's rows (over DK) lie inside one slab; W_out's rows (over D) span all slabs, so their
    softmax statistics are gathered online in a first pass and applied in a second.
    """
    gu = kl_lag_grad(mlp_forward(k0, m_in, m_out, ck, cd, D, DK, BLOCK_D, True, "ieee"), k0, v0, ln_w, ln_b, ck,
                     ln_eps, DK)
    row_max = tl.full((1, ck.shape[0]), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((1, ck.shape[0]), dtype=tl.float32)
    for s0 in range(0, D, BLOCK_D):
        slab_max, slab_sum = kl_out_stats_slab(m_in, m_out, s0, k0, gu, eta0, log_alpha0, ck, cd, memora_eps, D, DK)
        row_max, row_sum = softmax_merge(row_max, row_sum, slab_max, slab_sum)
    for s0 in range(0, D, BLOCK_D):
        kl_slab(m_in, m_out, a_in, a_out, s0, k0, gu, eta0, log_alpha0, row_max, row_sum, ck, cd, memora_eps, D, DK)


@triton.jit
def kl_lag_grad(u, k0, v0, ln_w, ln_b, ck, ln_eps, DK: tl.constexpr):
    """The lag token's output gradient gu (l2 bias) from its forward u = W_out gelu(W_in k0) at the old memory."""
    return mlp_error_grad(u, k0, v0, 0.0, ln_w, ln_b, (ck < DK)[None, :], ln_eps, 0.0, 0.0, 0.0, 0.0, DK, 0)[0]


@triton.jit
def softmax_merge(row_max, row_sum, part_max, part_sum):
    """Online softmax statistics (max, sum of exp(logit - max)) of two parts of the same rows, merged."""
    new_max = tl.maximum(row_max, part_max)
    return new_max, row_sum * tl.exp(row_max - new_max) + part_sum * tl.exp(part_max - new_max)


@triton.jit
def kl_out_stats_slab(m_in, m_out, s0, k0, gu, eta0, log_alpha0, ck, cd, memora_eps, D: tl.constexpr,
                      DK: tl.constexpr):
    """Softmax statistics [1, BK] (max, sum of exp(logit - max)) of hidden slab ``s0`` of W_out's lag-step
    logits, whose rows span every slab."""
    ptr, mask = in_slab(m_in, s0, ck, cd, D, DK)
    x = gelu(mm(k0, tl.load(ptr, mask=mask, other=0.0), True, "ieee"))
    ptr, mask = out_slab(m_out, s0, ck, cd, D, DK)
    logits = _kl_out_logits(tl.load(ptr, mask=mask, other=0.0), x, gu, tl.exp(log_alpha0), eta0, memora_eps, D)
    logits = tl.where((s0 + cd < D)[:, None], logits, float("-inf"))
    slab_max = tl.max(logits, axis=0, keep_dims=True)
    return slab_max, tl.sum(tl.exp(logits - slab_max), axis=0, keep_dims=True)


@triton.jit
def kl_slab(m_in, m_out, a_in, a_out, s0, k0, gu, eta0, log_alpha0, row_max, row_sum, ck, cd, memora_eps,
            D: tl.constexpr, DK: tl.constexpr):
    """Hidden slab ``s0`` of Memora's lag step, W_out's softmax statistics known: written as memory and anchor."""
    alpha = tl.exp(log_alpha0)
    ptr_in, mask_in = in_slab(m_in, s0, ck, cd, D, DK)
    w_in_t = tl.load(ptr_in, mask=mask_in, other=0.0)
    ptr_out, mask_out = out_slab(m_out, s0, ck, cd, D, DK)
    w_out_t = tl.load(ptr_out, mask=mask_out, other=0.0)
    z = mm(k0, w_in_t, True, "ieee")
    x = gelu(z)
    gz = mm(gu, tl.trans(w_out_t), True, "ieee") * gelu_grad(z)
    # W_in^T logits [BK, BD]: its softmax runs over the head dim (axis 0), inside the slab.
    logits = alpha * tl.log(tl.maximum(w_in_t / DK, memora_eps)) - eta0 * mm(tl.trans(k0), gz, True, "ieee")
    logits = tl.where((ck < DK)[:, None], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=0, keep_dims=True))
    new_in = DK * (e / tl.sum(e, axis=0, keep_dims=True))
    logits = _kl_out_logits(w_out_t, x, gu, alpha, eta0, memora_eps, D)
    new_out = D * (tl.exp(logits - row_max) / row_sum)
    _store_boundary_slab(m_in, m_out, a_in, a_out, s0, ck, cd, new_in, new_out, D, DK)


@triton.jit
def fold_rows(a_in, a_out, dst_in, dst_out, rows, coef, decay, n_rows, ck, cd, D: tl.constexpr, DK: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, DOT: tl.constexpr):
    """The running memory of a factored state, written slab by slab to ``dst`` (which may be the anchor):
    W_in = decay A_in - sum_i coef_i gz_i k_i^T and W_out = decay A_out - sum_i coef_i gu_i a_i^T over the
    first ``n_rows`` factor rows (``coef`` [BLOCK_C], zero past them)."""
    kc_t, guc = fold_factors(rows, coef, n_rows, ck, D, DK, BLOCK_C)
    for s0 in range(0, D, BLOCK_D):
        fold_slab(a_in, a_out, dst_in, dst_out, rows, kc_t, guc, decay, n_rows, s0, ck, cd, D, DK, BLOCK_C, DOT)


@triton.jit
def fold_factors(rows, coef, n_rows, ck, D: tl.constexpr, DK: tl.constexpr, BLOCK_C: tl.constexpr):
    """The fold's slab-independent factors: (k_i C_i)^T [BK, BC] and C_i gu_i [BC, BK] of the filled rows."""
    K_OFF, _, _, GU_OFF, RW = row_offsets(D, DK)
    ci = tl.arange(0, BLOCK_C)
    filled = ci < n_rows
    c = tl.where(filled, coef, 0.0)[:, None]
    return tl.trans(load_rows(rows, ci, filled, K_OFF, ck, DK, RW) * c), load_rows(rows, ci, filled, GU_OFF, ck, DK,
                                                                                  RW) * c


@triton.jit
def fold_slab(a_in, a_out, dst_in, dst_out, rows, kc_t, guc, decay, n_rows, s0, ck, cd, D: tl.constexpr,
              DK: tl.constexpr, BLOCK_C: tl.constexpr, DOT: tl.constexpr):
    """Hidden slab ``s0`` of :func:`fold_rows`, from :func:`fold_factors`."""
    _, GZ_OFF, A_OFF, _, RW = row_offsets(D, DK)
    ci = tl.arange(0, BLOCK_C)
    filled = ci < n_rows
    gz = load_rows(rows, ci, filled, GZ_OFF + s0, cd, D - s0, RW)  # [BC, BD]
    a = load_rows(rows, ci, filled, A_OFF + s0, cd, D - s0, RW)
    ptr_in, mask_in = in_slab(a_in, s0, ck, cd, D, DK)
    w_in_t = decay * tl.load(ptr_in, mask=mask_in, other=0.0) - mm(kc_t, gz, False, DOT)
    ptr_out, mask_out = out_slab(a_out, s0, ck, cd, D, DK)
    w_out_t = decay * tl.load(ptr_out, mask=mask_out, other=0.0) - mm(tl.trans(a), guc, False, DOT)
    tl.debug_barrier()
    ptr_in, mask_in = in_slab(dst_in, s0, ck, cd, D, DK)
    tl.store(ptr_in, w_in_t, mask=mask_in)
    ptr_out, mask_out = out_slab(dst_out, s0, ck, cd, D, DK)
    tl.store(ptr_out, w_out_t, mask=mask_out)
