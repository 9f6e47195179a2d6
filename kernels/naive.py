"""The plain reference of the Miras memory: one sequence, one head, one token at a time, from the equations.

models/SPEC.md §3-§5 in code, with the vectors and matrices of the paper and nothing batched or chunked:
it computes what the chunked spec (``models.memory.memory_scan``, the TTT dual form) and the Triton kernels
compute, and is what they are tested against (tests/test_kernels_naive.py). It runs in whatever dtype it
is given (the tests run it in fp64) and is slow on purpose: read it, don't serve with it.

Per head, with the chunk's anchor ``A`` (where every gradient of the chunk is taken) and the running memory ``S``,
tokens in chunks of ``b`` at absolute positions:

    position % b == 0:   A = S = boundary(S)                        (§5: copy, lq projection or Memora's lag step)
    every token:         S_t = alpha_t S_{t-1} - eta_t grad l(A; k_t, v_t)    (Memora: alpha 1, the lag token 0)
                         y_t = M(q_t; S_t)                          (reads see the post-update memory)

A memory is a tuple of matrices: ``(W_in [D, d], W_out [d, D])`` for the MLP memory
``M(x) = x + LN(W_out gelu(W_in x))``, ``(W [d, d],)`` for the linear one ``M(x) = W x``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .rule import MemoryRule

Memory = tuple[Tensor, ...]
# The memory's LayerNorm affine (gamma, beta) of one head, [d] each; None for the linear memory.
LayerNormAffine = tuple[Tensor, Tensor] | None


def gelu(z: Tensor) -> Tensor:
    """Exact GELU: z Phi(z)."""
    return z * 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def gelu_derivative(z: Tensor) -> Tensor:
    """gelu'(z) = Phi(z) + z phi(z)."""
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def standardise(u: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """LayerNorm without its affine: (u_hat, s) with u_hat = (u - mean u) / s, s = sqrt(var u + eps)."""
    centred = u - u.mean()
    s = torch.sqrt(centred.pow(2).mean() + eps)
    return centred / s, s


def read(rule: MemoryRule, memory: Memory, x: Tensor, ln: LayerNormAffine) -> Tensor:
    """M(x; W) (SPEC §3): x + LN(W_out gelu(W_in x)), or W x."""
    if rule.memory == "linear":
        (w,) = memory
        return w @ x
    w_in, w_out = memory
    gamma, beta = ln
    u_hat, _ = standardise(w_out @ gelu(w_in @ x), rule.memory_ln_eps)
    return x + gamma * u_hat + beta


def attentional_loss(rule: MemoryRule, error: Tensor, delta: Tensor | None) -> Tensor:
    """l(M(k), v) for e = M(k) - v, the loss of SPEC §4 without its smoothing (a token's surprise)."""
    if rule.attentional_bias == "l2":
        return 0.5 * error.pow(2).sum()
    if rule.attentional_bias == "lp":
        return lp_potential(rule, error.abs()).sum()
    if huber_is_quadratic(error, delta):
        return 0.5 * error.pow(2).sum()
    return delta * error.abs().sum()


def lp_potential(rule: MemoryRule, size: Tensor) -> Tensor:
    """phi(a) per component a = |e_j|: a^p / p up to the knee r, then the parabola r^p / p + r^(p-2) (a^2 - r^2) / 2
    that continues it with the same slope (SPEC §4; no knee, r = inf: a^p / p throughout)."""
    if math.isinf(rule.lp_knee):
        return size.pow(rule.p) / rule.p
    r = rule.lp_knee
    below = size.clamp(max=r)
    return below.pow(rule.p) / rule.p + r ** (rule.p - 2.0) * (size.pow(2) - below.pow(2)) / 2.0


def huber_is_quadratic(error: Tensor, delta: Tensor) -> bool:
    """Yaad's switch (SPEC §4): the l2 branch while rms(e) = ||e|| / sqrt(d) <= delta, per token and head."""
    return bool(error.pow(2).mean().sqrt() <= delta)


def output_gradient(rule: MemoryRule, error: Tensor, delta: Tensor | None) -> Tensor:
    """g = d l / d M(k) (SPEC §4's table, with Remark 5's smoothing: Sign(x) ~ tanh(c x), |x| ~ sqrt(x^2 + eps)).

    l2: e;   lp: tanh(c e) s min(s, r)^(p - 2) with s = sqrt(e^2 + eps) and the knee r (inf: tanh(c e) s^(p - 1));
    huber: e if rms(e) <= delta, else delta tanh(c e).
    """
    if rule.attentional_bias == "l2":
        return error
    smooth_sign = torch.tanh(rule.sign_sharpness * error)
    if rule.attentional_bias == "lp":
        s = torch.sqrt(error.pow(2) + rule.abs_eps)
        return smooth_sign * s * s.clamp(max=rule.lp_knee).pow(rule.p - 2.0)
    if huber_is_quadratic(error, delta):
        return error
    return delta * smooth_sign


def memory_gradient(rule: MemoryRule, memory: Memory, k: Tensor, v: Tensor, delta: Tensor | None,
                    ln: LayerNormAffine) -> Memory:
    """grad_W l(M(k; W), v), by the chain rule of SPEC §4 (one gradient per matrix of the memory).

    Linear: grad W = g k^T. MLP: z = W_in k, a = gelu(z), u = W_out a, y = k + gamma u_hat + beta, then
    g_u = (1/s)(gamma g - mean(gamma g) - u_hat mean(gamma g u_hat))  (LayerNorm backward),
    grad W_out = g_u a^T,  g_z = (W_out^T g_u) * gelu'(z),  grad W_in = g_z k^T.
    """
    if rule.memory == "linear":
        (w,) = memory
        return (torch.outer(output_gradient(rule, w @ k - v, delta), k),)
    w_in, w_out = memory
    gamma, beta = ln
    z = w_in @ k
    a = gelu(z)
    u_hat, s = standardise(w_out @ a, rule.memory_ln_eps)
    g = output_gradient(rule, k + gamma * u_hat + beta - v, delta)
    gamma_g = gamma * g
    g_u = (gamma_g - gamma_g.mean() - u_hat * (gamma_g * u_hat).mean()) / s
    g_z = (w_out.T @ g_u) * gelu_derivative(z)
    return torch.outer(g_z, k), torch.outer(g_u, a)


def lq_size(rule: MemoryRule, w: Tensor, init_std: float) -> Tensor:
    """nu(W) = (mean |W_ij|^q)^(1/q) / std_0: W's lq size in units of its init std (SPEC §5)."""
    return w.abs().pow(rule.q).mean().pow(1.0 / rule.q) / init_std


def lq_project(rule: MemoryRule, w: Tensor, init_std: float) -> Tensor:
    """Moneta's lq retention at a boundary (SPEC §5): W onto the lq ball of radius R, W <- W min(1, R / nu(W))."""
    return w * torch.clamp(rule.lq_radius / lq_size(rule, w, init_std), max=1.0)


def memora_lag_step(rule: MemoryRule, memory: Memory, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor,
                    delta: Tensor | None, ln: LayerNormAffine) -> Memory:
    """Memora's KL retention on a chunk's first (lag) token, Eq. 27 per row of each matrix (fan-in c):

    W <- c softmax_row(alpha log(max(W / c, eps)) - eta grad l(W; k, v)).
    """
    grads = memory_gradient(rule, memory, k, v, delta, ln)
    stepped = []
    for w, grad in zip(memory, grads, strict=True):
        fan_in = w.shape[-1]
        log_w = torch.log(torch.clamp(w / fan_in, min=rule.memora_eps))
        stepped.append(fan_in * torch.softmax(alpha * log_w - eta * grad, dim=-1))
    return tuple(stepped)


def boundary_step(rule: MemoryRule, memory: Memory, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor,
                  delta: Tensor | None, ln: LayerNormAffine) -> Memory:
    """The running memory at a chunk's first token, mapped to the chunk's anchor (SPEC §5)."""
    if rule.retention == "lq":
        return tuple(lq_project(rule, w, std) for w, std in zip(memory, rule.init_std, strict=True))
    if rule.retention == "kl":
        return memora_lag_step(rule, memory, k, v, eta, alpha, delta, ln)
    return memory  # l2 retention: the decay alpha is all of it, the anchor is the memory itself


def retain(rule: MemoryRule, memory: Memory, alpha: Tensor) -> Memory:
    """The retention inside a chunk: alpha_t W (local + global l2, Eq. 24); Memora's retention is its lag step."""
    if rule.retention == "kl":
        return memory
    return tuple(alpha * w for w in memory)


def token_step(rule: MemoryRule, anchor: Memory, memory: Memory, position: int, k: Tensor, v: Tensor, eta: Tensor,
               alpha: Tensor, delta: Tensor | None, ln: LayerNormAffine) -> tuple[Memory, Memory]:
    """One token's write at absolute ``position``: the (anchor, running memory) after it."""
    if position % rule.chunk_size == 0:
        anchor = memory = boundary_step(rule, memory, k, v, eta, alpha, delta, ln)
        if rule.retention == "kl":
            return anchor, memory  # the lag token's update is the lag step itself
    grads = memory_gradient(rule, anchor, k, v, delta, ln)  # at the anchor, for every token of the chunk
    return anchor, tuple(w - eta * g for w, g in zip(retain(rule, memory, alpha), grads, strict=True))


def memory_scan(rule: MemoryRule, anchor: Memory, memory: Memory, pos: Tensor, q: Tensor, k: Tensor, v: Tensor,
                eta: Tensor, log_alpha: Tensor, delta: Tensor | None, valid: Tensor, ln_weight: Tensor | None,
                ln_bias: Tensor | None, surprise: Tensor | None = None) -> tuple[Tensor, Memory, Memory]:
    """Run the memory over ``T`` tokens per sequence, continuing from (anchor, memory) at ``pos``.

    The contract of ``models.memory.memory_scan``: q, k, v [B, H, T, d]; eta, log_alpha, delta (Yaad's, else
    None) [B, H, T]; pos [B] the absolute position of each row's first token (a row may start mid-chunk, with
    ``anchor`` that chunk's anchor); valid [B, T] (right padding: a padding token changes nothing, its read sees
    the memory as it is); ln_weight, ln_bias [H, d] in any shape of H * d entries (None for the linear memory).
    Returns the reads [B, H, T, d] and the new (anchor, memory), the inputs untouched. ``surprise`` [B, H, T],
    if given, takes every token's loss at its chunk's anchor (padding: the loss at the anchor it sees).
    """
    batch, heads, length, _ = q.shape
    out = torch.empty_like(q)
    new_anchor = tuple(w.clone() for w in anchor)
    new_memory = tuple(w.clone() for w in memory)
    for b in range(batch):
        for h in range(heads):
            head_anchor = tuple(w[b, h] for w in anchor)
            head_memory = tuple(w[b, h] for w in memory)
            ln = None if ln_weight is None else (ln_weight.reshape(heads, -1)[h], ln_bias.reshape(heads, -1)[h])
            for t in range(length):
                k_t, v_t = k[b, h, t], v[b, h, t]
                delta_t = None if delta is None else delta[b, h, t]
                if valid[b, t]:
                    head_anchor, head_memory = token_step(rule, head_anchor, head_memory, int(pos[b]) + t, k_t, v_t,
                                                          eta[b, h, t], log_alpha[b, h, t].exp(), delta_t, ln)
                out[b, h, t] = read(rule, head_memory, q[b, h, t], ln)
                if surprise is not None:
                    error = read(rule, head_anchor, k_t, ln) - v_t
                    surprise[b, h, t] = attentional_loss(rule, error, delta_t)
            for new, w in zip((*new_anchor, *new_memory), (*head_anchor, *head_memory), strict=True):
                new[b, h] = w
    return out, new_anchor, new_memory
