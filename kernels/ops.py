"""Triton building blocks shared by the scan kernel: activations, row-wise LayerNorm and its backward,
the attentional biases' output gradient, and a matmul that also covers the one-token (decode) case.

Everything here runs under ``TRITON_INTERPRET=1`` too: no libdevice (tanh is 2*sigmoid(2x)-1, powers
go through exp2/log2), fp32 arithmetic only (the interpreter gets bf16 arithmetic wrong).
Row tiles are ``[R, BK]`` with the head dim padded to the block ``BK``; padded columns hold zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl

SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def gelu(z):
    """Exact (erf) GELU, as the reference."""
    return 0.5 * z * (1.0 + tl.erf(z * SQRT_HALF))


@triton.jit
def gelu_grad(z):
    return 0.5 * (1.0 + tl.erf(z * SQRT_HALF)) + z * tl.exp(-0.5 * z * z) * INV_SQRT_2PI


@triton.jit
def tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def pow_pos(x, exponent):
    """x ** exponent for x >= 0 (0 ** e = 0 for e > 0)."""
    return tl.exp2(exponent * tl.log2(x))


@triton.jit
def mm(a, b, VEC: tl.constexpr, DOT: tl.constexpr):
    """a @ b. With VEC (one-token tiles, below tl.dot's 16-row minimum) one of the two shapes
    [1, K] @ [K, N] or [M, 1] @ [1, N] is computed on the CUDA cores; otherwise tl.dot with fp32
    input precision ``DOT`` ("ieee", "tf32x3" or "tf32")."""
    if VEC:
        if a.shape[0] == 1:
            return tl.sum(tl.trans(a) * b, axis=0, keep_dims=True)
        else:
            return a * b
    else:
        return tl.dot(a, b, input_precision=DOT)


@triton.jit
def layer_norm_rows(u, weight, bias, col_mask, n, eps):
    """LayerNorm over the first ``n`` columns of each row; returns (output, normalised input, 1/std)."""
    mean = tl.sum(u, axis=1, keep_dims=True) / n
    centred = tl.where(col_mask, u - mean, 0.0)
    inv_std = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1, keep_dims=True) / n + eps)
    u_hat = centred * inv_std
    return u_hat * weight + bias, u_hat, inv_std


@triton.jit
def layer_norm_backward_rows(grad_out, u_hat, inv_std, weight, col_mask, n):
    g = grad_out * weight
    g_mean = tl.sum(g, axis=1, keep_dims=True) / n
    gu_mean = tl.sum(g * u_hat, axis=1, keep_dims=True) / n
    return tl.where(col_mask, inv_std * (g - g_mean - u_hat * gu_mean), 0.0)


@triton.jit
def output_grad(error, delta, n, p, knee, abs_eps, sharpness, BIAS: tl.constexpr):
    """d l / d M(k) for the attentional bias (models.memory.output_grad); delta is [R, 1] (huber), knee the lp
    bias's knee r (+inf: none). With s^2 = e^2 + eps, lp's |g| is s^(p-1) up to r and r^(p-2) s beyond."""
    if BIAS == 0:
        return error
    elif BIAS == 1:
        s_sq = error * error + abs_eps
        s = tl.sqrt(s_sq)
        # min(s, r) is r wherever it is used and keeps the unused side finite (r = +inf: never used).
        beyond = s * pow_pos(tl.minimum(s, knee), p - 2.0)
        magnitude = tl.where(s_sq <= knee * knee, pow_pos(s_sq, (p - 1.0) * 0.5), beyond)
        return tanh(sharpness * error) * magnitude
    else:
        rms = tl.sqrt(tl.sum(error * error, axis=1, keep_dims=True) / n)
        return tl.where(rms <= delta, error, delta * tanh(sharpness * error))


@triton.jit
def attentional_loss(error, delta, n, p, knee, BIAS: tl.constexpr):
    """The loss l(M(k), v) itself per row [R, 1]: a token's surprise (models.memory.attentional_loss,
    unsmoothed); delta is [R, 1] (huber), knee lp's knee r (+inf: none); padded columns hold 0 and add nothing."""
    half_sq = 0.5 * tl.sum(error * error, axis=1, keep_dims=True)
    if BIAS == 0:
        return half_sq
    elif BIAS == 1:
        size = tl.abs(error)
        r = tl.minimum(size, knee)  # the knee wherever it is used, finite elsewhere
        beyond = pow_pos(r, p) + p * pow_pos(r, p - 2.0) * (size * size - r * r) * 0.5
        power = tl.where(size <= knee, pow_pos(size, p), beyond)  # p phi(|e_j|)
        return tl.sum(power, axis=1, keep_dims=True) / p
    else:
        rms = tl.sqrt(2.0 * half_sq / n)
        return tl.where(rms <= delta, half_sq, delta * tl.sum(tl.abs(error), axis=1, keep_dims=True))


@triton.jit
def mlp_error_grad(u, k, v, delta, ln_w, ln_b, col_mask, ln_eps, p_exp, lp_knee, abs_eps, sharpness,
                   DK: tl.constexpr, BIAS: tl.constexpr):
    """gu = d l / d u for M(k) = k + LN(u) against v (models.memory.mlp_factors' gu), and the error M(k) - v."""
    y, u_hat, inv_std = layer_norm_rows(u, ln_w, ln_b, col_mask, DK, ln_eps)
    error = k + y - v
    g = output_grad(error, delta, DK, p_exp, lp_knee, abs_eps, sharpness, BIAS)
    return layer_norm_backward_rows(g, u_hat, inv_std, ln_w, col_mask, DK), error


@triton.jit
def in_slab(base, s0, ck, cd, D: tl.constexpr, DK: tl.constexpr):
    """Pointers and mask of W_in^T's slab [BK, BD]: element (j, i) is W_in[s0 + i, j] (W_in is [D, DK])."""
    rows = s0 + cd
    return base + rows[None, :] * DK + ck[:, None], (ck < DK)[:, None] & (rows < D)[None, :]


@triton.jit
def out_slab(base, s0, ck, cd, D: tl.constexpr, DK: tl.constexpr):
    """Pointers and mask of W_out^T's slab [BD, BK]: element (i, j) is W_out[j, s0 + i] (W_out is [DK, D])."""
    cols = s0 + cd
    return base + ck[None, :] * D + cols[:, None], (ck < DK)[None, :] & (cols < D)[:, None]


@triton.jit
def mlp_forward(x, w_in, w_out, ck, cd, D: tl.constexpr, DK: tl.constexpr, BLOCK_D: tl.constexpr,
                VEC: tl.constexpr, DOT: tl.constexpr):
    """u = W_out gelu(W_in x) for the rows of x [R, BK]: [R, BK]."""
    u = tl.zeros((x.shape[0], ck.shape[0]), dtype=tl.float32)
    for s0 in range(0, D, BLOCK_D):
        u += mlp_forward_slab(x, w_in, w_out, s0, ck, cd, D, DK, VEC, DOT)
    return u


@triton.jit
def mlp_forward_slab(x, w_in, w_out, s0, ck, cd, D: tl.constexpr, DK: tl.constexpr, VEC: tl.constexpr,
                     DOT: tl.constexpr):
    """Hidden slab ``s0``'s share of u = W_out gelu(W_in x) for the rows of x [R, BK]: [R, BK]."""
    ptr, mask = in_slab(w_in, s0, ck, cd, D, DK)
    w_in_t = tl.load(ptr, mask=mask, other=0.0)
    ptr, mask = out_slab(w_out, s0, ck, cd, D, DK)
    w_out_t = tl.load(ptr, mask=mask, other=0.0)
    return mm(gelu(mm(x, w_in_t, VEC, DOT)), w_out_t, VEC, DOT)


@triton.jit
def row_offsets(D: tl.constexpr, DK: tl.constexpr):
    """Where each factor sits in a row of the factored state, (k [DK], gz [D], a [D], gu [DK]), and the
    row's length: (k, gz, a, gu offsets, row length)."""
    return 0, DK, DK + D, DK + 2 * D, 2 * (D + DK)


@triton.jit
def load_rows(rows, ci, filled, offset, cols, width, RW: tl.constexpr):
    """Factor rows ``ci`` (only the ``filled`` ones; zeros elsewhere), columns ``offset + cols`` for
    cols < width: [len(ci), len(cols)]."""
    mask = filled[:, None] & (cols < width)[None, :]
    return tl.load(rows + ci[:, None] * RW + offset + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_row(row, offset, cols, width, value, write):
    """One factor row's columns ``offset + cols`` (cols < width) take ``value`` [1, len(cols)] if ``write``."""
    tl.store(row + offset + cols[None, :], value, mask=(cols < width)[None, :] & write)


@triton.jit
def clear_rows(rows, first, ci, cw, CHUNK: tl.constexpr, RW: tl.constexpr):
    """Factor rows ``first`` to CHUNK - 1 hold 0 (rows not yet written in a chunk), ``len(cw)`` columns at
    a time."""
    for c0 in range(0, RW, cw.shape[0]):
        cols = c0 + cw
        mask = ((ci >= first) & (ci < CHUNK))[:, None] & (cols < RW)[None, :]
        tl.store(rows + ci[:, None] * RW + cols[None, :], tl.zeros((ci.shape[0], cw.shape[0]), tl.float32), mask=mask)
