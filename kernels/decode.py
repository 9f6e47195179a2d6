"""Decode of the MLP memory split over hidden-dim slabs: three small launches instead of one program per
(sequence, head).

A decode step must stream every sequence's whole memory (anchor read, running memory read and
written: ~6 MiB per sequence and layer at the 340M shape) while doing little arithmetic on it, so it
is bound by how many bytes are in flight. The fused kernel (kernels/scan.py) walks the hidden dim
slab by slab inside one program per (sequence, head); here each slab is its own program, so a batch
of 64 keeps 4x-8x more programs, and loads, in flight:

1. ``forward``  (grid N x H x S): z = A_in[s] k and the slab's share of u = A_out gelu(A_in k);
2. ``update``   (grid N x H x S): sums the shares to u, takes the output gradient gu (LayerNorm
   backward, attentional bias), then updates the running memory's slab in place and produces the
   slab's share of the read at the updated memory;
3. ``output``   (grid N x H): sums the read's shares, LayerNorm, residual.

The arithmetic is the fused kernel's one-token case term by term (post-update read folded in the
same way), so both compute the reference's chunk semantics. A row whose token starts a chunk needs
the rule's boundary step (a whole-matrix map) first: the fused kernel takes those rows (launched with
``BOUNDARY_ROWS_ONLY``) and these kernels skip them. Everything is decided on the device: no host
synchronisation, CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .ops import attentional_loss, gelu, gelu_grad, in_slab, layer_norm_rows, mlp_error_grad, mm, out_slab
from .rule import MemoryRule


@triton.jit
def program_row(SLOTS, POS, LENGTHS, CHUNK: tl.constexpr):
    """This program's (row n, head h, slot, valid, skip): skip rows without a slot and rows whose token
    takes a chunk-boundary step (the fused kernel's)."""
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    slot = tl.load(SLOTS + n).to(tl.int64)
    valid = tl.load(LENGTHS + n) > 0
    boundary = (tl.load(POS + n) % CHUNK == 0) & valid
    return n, h, slot, valid, (slot < 0) | boundary


@triton.jit
def decode_forward_kernel(Q, K, A_IN, A_OUT, Z, U_PART, SLOTS, POS, LENGTHS, sq_b, sq_h, sq_d, sk_b, sk_h, sk_d,
                          H: tl.constexpr, DK: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, FACTORED: tl.constexpr):
    """Z [N, H, D] takes z = A_in k; FACTORED (kernels.factored): Z [N, H, 2, D] also takes A_in q, read in
    the same pass over A_in."""
    n, h, slot, _, skip = program_row(SLOTS, POS, LENGTHS, CHUNK)
    if skip:
        return
    s = tl.program_id(2)
    ck = tl.arange(0, BLOCK_K)
    cd = tl.arange(0, BLOCK_D)
    s0 = s * BLOCK_D
    k = tl.load(K + n * sk_b + h * sk_h + ck[None, :] * sk_d, mask=(ck < DK)[None, :], other=0.0).to(tl.float32)
    head = (slot * H + h) * (D * DK)  # one (slot, head)'s W_in [D, DK] and W_out [DK, D] in the pool
    ptr, mask = in_slab(A_IN + head, s0, ck, cd, D, DK)
    w_in_t = tl.load(ptr, mask=mask, other=0.0)
    z = mm(k, w_in_t, True, "ieee")  # [1, BD]
    ptr, mask = out_slab(A_OUT + head, s0, ck, cd, D, DK)
    w_out_t = tl.load(ptr, mask=mask, other=0.0)
    u_part = mm(gelu(z), w_out_t, True, "ieee")  # [1, BK]
    row = n * H + h
    in_d = (s0 + cd < D)[None, :]
    if FACTORED:
        q = tl.load(Q + n * sq_b + h * sq_h + ck[None, :] * sq_d, mask=(ck < DK)[None, :], other=0.0).to(tl.float32)
        tl.store(Z + row * (2 * D) + s0 + cd[None, :], z, mask=in_d)
        tl.store(Z + row * (2 * D) + D + s0 + cd[None, :], mm(q, w_in_t, True, "ieee"), mask=in_d)
    else:
        tl.store(Z + row * D + s0 + cd[None, :], z, mask=in_d)
    tl.store(U_PART + (row * tl.num_programs(2) + s) * BLOCK_K + ck[None, :], u_part)


@triton.jit
def decode_update_kernel(Q, K, V, ETA, LOG_ALPHA, DELTA, A_OUT, M_IN, M_OUT, LN_W, LN_B, Z, U_PART, UQ_PART, S,
                         SLOTS, POS, LENGTHS, sq_b, sq_h, sq_d, sk_b, sk_h, sk_d, sv_b, sv_h, sv_d, sg_b, sg_h,
                         p_exp, lp_knee, abs_eps, sharpness, ln_eps,
                         H: tl.constexpr, DK: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BIAS: tl.constexpr, RETENTION: tl.constexpr,
                         SURPRISE: tl.constexpr):
    n, h, slot, valid, skip = program_row(SLOTS, POS, LENGTHS, CHUNK)
    if skip:
        return
    s = tl.program_id(2)
    n_slabs = tl.num_programs(2)
    ck = tl.arange(0, BLOCK_K)
    cd = tl.arange(0, BLOCK_D)
    col_mask = (ck < DK)[None, :]
    s0 = s * BLOCK_D
    row = n * H + h
    q = tl.load(Q + n * sq_b + h * sq_h + ck[None, :] * sq_d, mask=col_mask, other=0.0).to(tl.float32)
    k = tl.load(K + n * sk_b + h * sk_h + ck[None, :] * sk_d, mask=col_mask, other=0.0).to(tl.float32)
    v = tl.load(V + n * sv_b + h * sv_h + ck[None, :] * sv_d, mask=col_mask, other=0.0).to(tl.float32)
    # A padding token (length 0) is read but changes nothing: eta = 0, alpha = 1, as in the fused kernel.
    eta = tl.where(valid, tl.load(ETA + n * sg_b + h * sg_h).to(tl.float32), 0.0)
    log_alpha = tl.where(valid, tl.load(LOG_ALPHA + n * sg_b + h * sg_h).to(tl.float32), 0.0)
    if RETENTION == 2:  # Memora's retention lives in its boundary step
        log_alpha = 0.0
    alpha = tl.exp(log_alpha)
    delta = 0.0
    if BIAS == 2:
        delta = tl.load(DELTA + n * sg_b + h * sg_h).to(tl.float32)
    ln_w = tl.load(LN_W + h * DK + ck, mask=ck < DK, other=0.0)[None, :]
    ln_b = tl.load(LN_B + h * DK + ck, mask=ck < DK, other=0.0)[None, :]

    u = tl.zeros((1, BLOCK_K), dtype=tl.float32)
    for i in range(n_slabs):
        u += tl.load(U_PART + (row * n_slabs + i) * BLOCK_K + ck[None, :])
    gu, error = mlp_error_grad(u, k, v, delta, ln_w, ln_b, col_mask, ln_eps, p_exp, lp_knee, abs_eps, sharpness, DK,
                               BIAS)
    if SURPRISE:  # the token's loss at the anchor, in S (laid out as the gates); slab 0 writes it
        tl.store(S + n * sg_b + h * sg_h, tl.sum(attentional_loss(error, delta, DK, p_exp, lp_knee, BIAS)),
                 mask=valid & (s == 0))

    z = tl.load(Z + row * D + s0 + cd[None, :], mask=(s0 + cd < D)[None, :], other=0.0)
    x = gelu(z)
    head = (slot * H + h) * (D * DK)
    ptr, mask = out_slab(A_OUT + head, s0, ck, cd, D, DK)
    gz = mm(gu, tl.trans(tl.load(ptr, mask=mask, other=0.0)), True, "ieee") * gelu_grad(z)
    in_ptr, in_mask = in_slab(M_IN + head, s0, ck, cd, D, DK)
    w_in_t = tl.load(in_ptr, mask=in_mask, other=0.0)
    out_ptr, out_mask = out_slab(M_OUT + head, s0, ck, cd, D, DK)
    w_out_t = tl.load(out_ptr, mask=out_mask, other=0.0)
    # The read at the updated memory, from the old one: (alpha W_in - eta gz k^T) q and
    # (alpha W_out - eta gu x^T) xq, as the fused kernel's one-token dual form.
    xq = gelu(alpha * mm(q, w_in_t, True, "ieee") - eta * tl.sum(q * k) * gz)
    uq_part = alpha * mm(xq, w_out_t, True, "ieee") - eta * tl.sum(xq * x) * gu
    tl.store(in_ptr, alpha * w_in_t - eta * mm(tl.trans(k), gz, True, "ieee"), mask=in_mask)
    tl.store(out_ptr, alpha * w_out_t - eta * mm(tl.trans(x), gu, True, "ieee"), mask=out_mask)
    tl.store(UQ_PART + (row * n_slabs + s) * BLOCK_K + ck[None, :], uq_part)


@triton.jit
def decode_output_kernel(Q, O, UQ_PART, LN_W, LN_B, SLOTS, POS, LENGTHS, sq_b, sq_h, sq_d, so_b, so_h, ln_eps,
                         H: tl.constexpr, DK: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
                         N_SLABS: tl.constexpr):
    n, h, _, _, skip = program_row(SLOTS, POS, LENGTHS, CHUNK)
    if skip:
        return
    ck = tl.arange(0, BLOCK_K)
    col_mask = (ck < DK)[None, :]
    row = n * H + h
    uq = tl.zeros((1, BLOCK_K), dtype=tl.float32)
    for i in range(N_SLABS):
        uq += tl.load(UQ_PART + (row * N_SLABS + i) * BLOCK_K + ck[None, :])
    q = tl.load(Q + n * sq_b + h * sq_h + ck[None, :] * sq_d, mask=col_mask, other=0.0).to(tl.float32)
    ln_w = tl.load(LN_W + h * DK + ck, mask=ck < DK, other=0.0)[None, :]
    ln_b = tl.load(LN_B + h * DK + ck, mask=ck < DK, other=0.0)[None, :]
    out = q + layer_norm_rows(uq, ln_w, ln_b, col_mask, DK, ln_eps)[0]
    tl.store(O + n * so_b + h * so_h + ck[None, :], out, mask=col_mask)


def split_kernels(config: dict, slab: int, warps: int) -> dict[str, tuple]:
    """(kernel, compile-time arguments, launch options) of the three split-decode kernels, from the scan's
    launch config, a slab width and the slab kernels' warps: what runs and what benchmarks.compile_check
    compiles come from here."""
    shape = dict(H=config["H"], DK=config["DK"], CHUNK=config["CHUNK"], BLOCK_K=config["BLOCK_K"])
    slabs = dict(shape, D=config["D"], BLOCK_D=slab)
    return {"forward": (decode_forward_kernel, dict(slabs, FACTORED=False), {"num_warps": warps}),
            "update": (decode_update_kernel, dict(slabs, BIAS=config["BIAS"], RETENTION=config["RETENTION"],
                                                  SURPRISE=config["SURPRISE"]), {"num_warps": warps}),
            "output": (decode_output_kernel, dict(shape, N_SLABS=triton.cdiv(config["D"], slab)), {"num_warps": 1})}


def split_decode(rule: MemoryRule, config: dict, slab: int, warps: int, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                 gates: list[Tensor], anchor: tuple[Tensor, Tensor], memory: tuple[Tensor, Tensor], ln_weight: Tensor,
                 ln_bias: Tensor, slots: Tensor, pos: Tensor, lengths: Tensor, surprise: Tensor) -> None:
    """The three launches for the rows that take no boundary step (q, k, v [N, H, 1, d]; gates
    [N, H, 1]; ``out`` [N, H, 1, d] is written for those rows only), in ``slab``-wide hidden slabs of
    ``warps`` warps each. ``config`` is the scan's launch config (shapes and rule codes); with its
    ``SURPRISE``, ``surprise`` (laid out as the gates) takes those rows' losses."""
    n_rows, H = q.shape[0], q.shape[1]
    kernels = split_kernels(config, slab, warps)
    n_slabs = kernels["output"][1]["N_SLABS"]
    z = torch.empty(n_rows, H, config["D"], device=q.device, dtype=torch.float32)
    u_part = torch.empty(n_rows, H, n_slabs, config["BLOCK_K"], device=q.device, dtype=torch.float32)
    uq_part = torch.empty_like(u_part)
    sq, sk, sv, so, sg = q.stride(), k.stride(), v.stride(), out.stride(), gates[0].stride()
    grid = (n_rows, H, n_slabs)
    kernel, constexprs, options = kernels["forward"]
    kernel[grid](q, k, anchor[0], anchor[1], z, u_part, slots, pos, lengths, sq[0], sq[1], sq[3], sk[0], sk[1], sk[3],
                 **constexprs, **options)
    kernel, constexprs, options = kernels["update"]
    kernel[grid](q, k, v, *gates, anchor[1], memory[0], memory[1], ln_weight, ln_bias, z, u_part, uq_part, surprise,
                 slots, pos,
                 lengths, sq[0], sq[1], sq[3], sk[0], sk[1], sk[3], sv[0], sv[1], sv[3], sg[0], sg[1], rule.p,
                 rule.lp_knee, rule.abs_eps, rule.sign_sharpness, rule.memory_ln_eps, **constexprs, **options)
    kernel, constexprs, options = kernels["output"]
    kernel[(n_rows, H)](q, out, uq_part, ln_weight, ln_bias, slots, pos, lengths, sq[0], sq[1], sq[3], so[0], so[1],
                        rule.memory_ln_eps, **constexprs, **options)
