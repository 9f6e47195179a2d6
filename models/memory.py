"""The Miras memory: the PyTorch reference for every rule, with the exact chunked semantics.

This file is the specification in code (models/SPEC.md states the same equations in prose).
Shapes: ``B`` sequences, ``H`` heads, ``n`` tokens, head dim ``d``, memory hidden ``D = E*d``.
The memory of one head is either an MLP ``M(x) = x + LN(W_out gelu(W_in x))`` with
``W_in: [D, d]``, ``W_out: [d, D]``, or a linear map ``M(x) = W x`` with ``W: [d, d]``.

Chunked semantics (all rules): tokens are grouped in chunks of ``b`` at absolute positions
``[kb, (k+1)b)``. Every gradient inside a chunk is taken at the chunk's *anchor* (the memory at
the chunk start, after the rule's boundary step); the running memory is
``W_t = alpha_t W_{t-1} - eta_t grad l(anchor; k_t, v_t)`` and the read at ``t`` uses ``W_t``.
Because every gradient is a sum of outer products at a fixed anchor, a chunk's reads and its
end state come out of a few matmuls (the TTT "dual form"), and a single decode step is the same
computation with ``n = 1``.

No autograd is used to compute the inner gradients: they are written out below so that the
kernels can follow them line by line (training differentiates *through* them with autograd).

Decoding keeps an MLP memory *factored* (``FactoredMemory``, models/SPEC.md §7): the chunk's anchor
plus one factor row per token of the chunk so far, instead of the running memory. The running memory
is the anchor, decayed, minus the rows' outer products (``fold_rows``); a decode step reads the anchor
once and the rows (``factored_token``), and a chunk start folds the rows into the next anchor
(``start_chunk``). Same math as the running-memory form, different bookkeeping.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from .config import MirasConfig

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# A memory is a tuple of tensors: (W_in, W_out) for the MLP memory, (W,) for the linear one.
Memory = tuple[Tensor, ...]
# The factors (a, gz, gu) of tokens' gradients at an anchor, as mlp_factors returns them.
TokenFactors = tuple[Tensor, Tensor, Tensor]


# How the Triton kernels' tensor-core products (``tl.dot``, kernels/scan.py) round their fp32 operands, emulated
# here so that the reference can measure what each precision does to a trained model (benchmarks/precision.py).
# Accumulation and the state stay fp32 in every mode; the one-token decode products run on the CUDA cores in
# exact fp32 in the kernels, so they are never rounded here either.
DOT_EMULATIONS = ("ieee", "tf32x3", "tf32", "bf16")
TF32_MANTISSA_BITS = 10
BF16_MANTISSA_BITS = 7
# A plain module global, not a ContextVar: torch.compile traces a global's read (and guards on it), while a
# ContextVar's get() breaks the graph, and the compiled decode steps allow no break (server/decode_graphs.py).
_dot_emulation = "ieee"


def round_mantissa(x: Tensor, bits: int) -> Tensor:
    """fp32 ``x`` rounded to ``bits`` explicit mantissa bits, round to nearest, ties to even (the fp32
    exponent range is kept: tf32 is 10 bits, bf16 7). Bit manipulation on the fp32 view; NaN stays NaN and a
    value past the largest representable one rounds to infinity, as torch's own bf16 conversion does."""
    if x.dtype != torch.float32:
        raise ValueError(f"round_mantissa takes fp32 tensors, got {x.dtype}")
    dropped = 23 - bits
    raw = torch.where(torch.isnan(x), 0.0, x).view(torch.int32)  # (a NaN's bits could overflow the addition)
    lsb = (raw >> dropped) & 1  # the kept last bit: a tie rounds towards making it 0
    rounded = (raw + ((1 << (dropped - 1)) - 1) + lsb) & ~((1 << dropped) - 1)
    return torch.where(torch.isnan(x), x, rounded.view(torch.float32))


def dot_emulation() -> str:
    """The operand rounding that :func:`dot` applies now (``ieee``: none)."""
    return _dot_emulation


@contextlib.contextmanager
def emulate_dots(mode: str) -> Iterator[None]:
    """Within the block, the memory's chunk products round their fp32 operands as the kernels' ``tl.dot``
    with this input precision: ``ieee`` (exact fp32), ``tf32x3`` (each operand split into a tf32 high and
    low part, hi*hi + hi*lo + lo*hi), ``tf32`` (10 mantissa bits) or ``bf16`` (7 mantissa bits)."""
    if mode not in DOT_EMULATIONS:
        raise ValueError(f"dot emulation must be one of {DOT_EMULATIONS}, got {mode!r}")
    global _dot_emulation
    outer, _dot_emulation = _dot_emulation, mode
    try:
        yield
    finally:
        _dot_emulation = outer


def dot(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` as a kernel's ``tl.dot`` computes it under :func:`emulate_dots` (fp32 accumulation; the
    products of rounded operands are exact in fp32). Exactly ``a @ b`` by default, and for fp64 operands."""
    mode = _dot_emulation
    if mode == "ieee" or a.dtype != torch.float32:
        return a @ b
    if mode == "bf16":
        return round_mantissa(a, BF16_MANTISSA_BITS) @ round_mantissa(b, BF16_MANTISSA_BITS)
    a_hi, b_hi = round_mantissa(a, TF32_MANTISSA_BITS), round_mantissa(b, TF32_MANTISSA_BITS)
    if mode == "tf32":
        return a_hi @ b_hi
    a_lo, b_lo = round_mantissa(a - a_hi, TF32_MANTISSA_BITS), round_mantissa(b - b_hi, TF32_MANTISSA_BITS)
    return (a_lo @ b_hi + a_hi @ b_lo) + a_hi @ b_hi  # the order kernels' tf32x3 accumulates in


class KnownStep(NamedTuple):
    """What the host knows of a one-token step in which every row is live (the server's decode step), so
    that the step reads no device value on the host and compiles into one graph (server/decode_graphs.py).

    ``first``: the batch rows whose token starts a chunk (their boundary step runs, or their factor rows
    fold into a new anchor), None if none does. ``filled``: how many factor rows to read, at least as many
    as any row has filled (unwritten rows hold 0, so a larger count gives the same result)."""

    first: Tensor | None
    filled: int


def gelu(z: Tensor) -> Tensor:
    """Exact (erf) GELU: z * Phi(z)."""
    return 0.5 * z * (1.0 + torch.erf(z * _SQRT_HALF))


def gelu_grad(z: Tensor) -> Tensor:
    """d gelu / dz = Phi(z) + z * phi(z)."""
    return 0.5 * (1.0 + torch.erf(z * _SQRT_HALF)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def power(x: Tensor, exponent: float) -> Tensor:
    """``x ** exponent``, by multiplication for the exponents 1 to 4 the presets use (p = 3, q = 4): torch's
    pow with a float exponent is ~18x slower than two squarings on a CPU; Moneta's 266-token chat-turn prefill
    took 1.11x less time with products (in-process A/B on 2 threads: 85 -> 76 ms)."""
    if exponent not in (1.0, 2.0, 3.0, 4.0):
        return x.pow(exponent)
    if exponent == 1.0:
        return x
    square = x * x
    return {2.0: square, 3.0: square * x, 4.0: square * square}[exponent]


def layer_norm(u: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the last dim; returns (output, normalised input, 1/std) for the backward."""
    centred = u - u.mean(-1, keepdim=True)
    inv_std = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    u_hat = centred * inv_std
    return u_hat * weight + bias, u_hat, inv_std


def layer_norm_backward(grad_out: Tensor, u_hat: Tensor, inv_std: Tensor, weight: Tensor) -> Tensor:
    """d loss / d u for y = LN(u) * weight + bias, given d loss / d y."""
    g = grad_out * weight
    return inv_std * (g - g.mean(-1, keepdim=True) - u_hat * (g * u_hat).mean(-1, keepdim=True))


def smooth_sign(x: Tensor, sharpness: float) -> Tensor:
    return torch.tanh(sharpness * x)


def lp_magnitude(cfg: MirasConfig, s_sq: Tensor) -> Tensor:
    """|g| of the lp bias from s^2 = e^2 + eps: s^(p-1) up to the knee r, r^(p-2) s beyond it (the same
    s min(s, r)^(p-2), written so that without a knee it is exactly the unbounded (s^2)^((p-1)/2))."""
    magnitude = power(s_sq, (cfg.p - 1.0) / 2.0)
    if cfg.lp_knee is None:
        return magnitude
    knee = cfg.lp_knee
    return torch.where(s_sq <= knee * knee, magnitude, knee ** (cfg.p - 2.0) * s_sq.sqrt())


def output_grad(cfg: MirasConfig, error: Tensor, delta: Tensor | None) -> Tensor:
    """d l / d M(k) for the attentional bias, given the error e = M(k) - v  ([..., n, d]).

    l2:    l = 1/2 ||e||^2                          -> e
    lp:    l = 1/p sum |e|^p, smoothed               -> tanh(c e) s^(p-1),  s = sqrt(e^2 + eps)
           with a knee r: quadratic beyond r          -> tanh(c e) s min(s, r)^(p-2)
    huber: per token, rms(e) <= delta ? l2 : delta * l1 (smoothed sign) -> e or delta tanh(c e)
    """
    if cfg.attentional_bias == "l2":
        return error
    if cfg.attentional_bias == "lp":
        return smooth_sign(error, cfg.sign_sharpness) * lp_magnitude(cfg, error * error + cfg.abs_eps)
    assert delta is not None, "the huber bias needs delta"
    delta = delta.unsqueeze(-1)
    rms = error.pow(2).mean(-1, keepdim=True).sqrt()
    return torch.where(rms <= delta, error, delta * smooth_sign(error, cfg.sign_sharpness))


def attentional_loss(cfg: MirasConfig, error: Tensor, delta: Tensor | None) -> Tensor:
    """The attentional bias l(M(k), v) itself, per token ([..., n, d] -> [..., n]): the memory's surprise.

    The unsmoothed loss of models/SPEC.md §4 (the smoothing only shapes the gradient):
    l2: 1/2 ||e||^2;  huber: rms(e) <= delta ? 1/2 ||e||^2 : delta * sum |e|;
    lp: sum phi(|e_j|), phi(a) = a^p / p, and with a knee r beyond it r^p / p + r^(p-2) (a^2 - r^2) / 2.
    """
    half_sq = 0.5 * error.pow(2).sum(-1)
    if cfg.attentional_bias == "l2":
        return half_sq
    if cfg.attentional_bias == "lp":
        size = error.abs()
        scaled = power(size, cfg.p)  # p phi(|e_j|)
        if cfg.lp_knee is not None:
            r, p = cfg.lp_knee, cfg.p
            scaled = torch.where(size <= r, scaled, r ** p + p * r ** (p - 2.0) * (size * size - r * r) / 2.0)
        return scaled.sum(-1) / cfg.p
    assert delta is not None, "the huber bias needs delta"
    rms = error.pow(2).mean(-1).sqrt()
    return torch.where(rms <= delta, half_sq, delta * error.abs().sum(-1))


def mlp_read(w_in: Tensor, w_out: Tensor, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float) -> Tensor:
    """M(x) = x + LN(W_out gelu(W_in x)) with per-sequence weights."""
    u = gelu(x @ w_in.transpose(-1, -2)) @ w_out.transpose(-1, -2)
    return x + layer_norm(u, ln_weight, ln_bias, eps)[0]


def mlp_factors(cfg: MirasConfig, w_in: Tensor, w_out: Tensor, k: Tensor, v: Tensor, ln_weight: Tensor,
                ln_bias: Tensor, delta: Tensor | None, surprise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token gradients of l(M(k_i), v_i) at fixed weights, as outer-product factors.

    Returns (a, gz, gu) with grad W_out_i = gu_i a_i^T  ([d, D]) and grad W_in_i = gz_i k_i^T ([D, d]).
    ``surprise`` [B, H, n], if given, takes the losses l(M(k_i), v_i) themselves (:func:`attentional_loss`).
    """
    return mlp_factors_at(cfg, dot(k, w_in.transpose(-1, -2)), w_out, k, v, ln_weight, ln_bias, delta, surprise)


def mlp_factors_at(cfg: MirasConfig, z: Tensor, w_out: Tensor, k: Tensor, v: Tensor, ln_weight: Tensor,
                   ln_bias: Tensor, delta: Tensor | None,
                   surprise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`mlp_factors` given the keys' pre-activations z = k W_in^T [B, H, n, D]."""
    a = gelu(z)
    u = dot(a, w_out.transpose(-1, -2))  # [B, H, n, d]
    y_ln, u_hat, inv_std = layer_norm(u, ln_weight, ln_bias, cfg.memory_ln_eps)
    error = k + y_ln - v
    if surprise is not None:
        surprise.copy_(attentional_loss(cfg, error, delta))
    g = output_grad(cfg, error, delta)
    gu = layer_norm_backward(g, u_hat, inv_std, ln_weight)
    gz = dot(gu, w_out) * gelu_grad(z)
    return a, gz, gu


def chunk_coefficients(eta: Tensor, log_alpha: Tensor) -> tuple[Tensor, Tensor]:
    """decay[t] = prod_{j<=t} alpha_j and C[t, i] = eta_i prod_{i<j<=t} alpha_j for i <= t (else 0)."""
    n = eta.shape[-1]
    cum = log_alpha.cumsum(-1)
    causal = torch.ones(n, n, dtype=torch.bool, device=eta.device).tril()
    # Mask before exponentiating: for i > t the exponent is positive and could overflow.
    exponent = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~causal, 0.0)
    coeff = (eta.unsqueeze(-2) * exponent.exp()).masked_fill(~causal, 0.0)
    return cum.exp(), coeff


def decayed_update(w: Tensor, decay: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``decay * w - left @ right`` with a single full-size temporary: this is the memory traffic of
    every decode step, so it matters (a one-token segment is a rank-1 update, done without a matmul)."""
    out = w * decay
    if left.shape[-1] == 1:
        return out.addcmul_(left, right, value=-1.0)
    return out.sub_(dot(left, right))


def memory_segment(cfg: MirasConfig, anchor: Memory, memory: Memory, q: Tensor, k: Tensor, v: Tensor,
                   eta: Tensor, log_alpha: Tensor, delta: Tensor | None, ln_weight: Tensor | None,
                   ln_bias: Tensor | None, surprise: Tensor | None = None) -> tuple[Tensor, Memory,
                                                                                   TokenFactors | None]:
    """Process tokens that all lie in one chunk: reads for every token, the memory after the last and, for the
    MLP memory, the tokens' gradient factors at the anchor (:func:`mlp_factors`; None for the linear memory).

    ``anchor`` is the chunk's anchor (gradients are taken there), ``memory`` the running memory
    just before the first token. Reads see the post-update memory:
        W_t = decay_t * memory - sum_{i<=t} C[t, i] grad_i,   y_t = M(q_t; W_t).
    ``surprise`` [B, H, n], if given, takes each token's loss at the anchor, l(M_anchor(k_t), v_t).
    """
    decay, coeff = chunk_coefficients(eta, log_alpha)
    last = coeff[..., -1, :].unsqueeze(-1)  # [B, H, n, 1]: C[n-1, i]
    decay_last = decay[..., -1, None, None]
    if cfg.memory == "linear":
        (w_anchor,), (w,) = anchor, memory
        error = dot(k, w_anchor.transpose(-1, -2)) - v
        if surprise is not None:
            surprise.copy_(attentional_loss(cfg, error, delta))
        g = output_grad(cfg, error, delta)
        out = decay.unsqueeze(-1) * dot(q, w.transpose(-1, -2)) - dot(coeff * dot(q, k.transpose(-1, -2)), g)
        return out, (decayed_update(w, decay_last, g.transpose(-1, -2), last * k),), None
    a, gz, gu = mlp_factors(cfg, *anchor, k, v, ln_weight, ln_bias, delta, surprise)
    w_in, w_out = memory
    zq = decay.unsqueeze(-1) * dot(q, w_in.transpose(-1, -2)) - dot(coeff * dot(q, k.transpose(-1, -2)), gz)
    aq = gelu(zq)
    uq = decay.unsqueeze(-1) * dot(aq, w_out.transpose(-1, -2)) - dot(coeff * dot(aq, a.transpose(-1, -2)), gu)
    out = q + layer_norm(uq, ln_weight, ln_bias, cfg.memory_ln_eps)[0]
    new_in = decayed_update(w_in, decay_last, gz.transpose(-1, -2), last * k)
    new_out = decayed_update(w_out, decay_last, gu.transpose(-1, -2), last * a)
    return out, (new_in, new_out), (a, gz, gu)


def lq_normalise(cfg: MirasConfig, w: Tensor, init_std: float) -> Tensor:
    """Moneta's boundary step: project each head's matrix onto the lq ball.

    nu(W) = (mean |W_ij|^q)^(1/q) / init_std;  W <- W * min(1, radius / nu(W)).

    Written as (radius^q / max(nu^q, radius^q))^(1/q), the same value, so that training's backward stays finite
    when the memory has decayed to (nearly) zero: there 1/nu and the q-th root's derivative overflow, and the
    min's zero gradient times them gave NaN (Moneta skipped almost every step after warm-up in 1,024-token
    windows).
    """
    magnitude = w if cfg.q % 2 == 0 else w.abs()  # |w|^q = w^q bit for bit for an even q: one pass fewer
    nu_q = power(magnitude, cfg.q).mean((-2, -1), keepdim=True) / init_std ** cfg.q
    radius_q = cfg.lq_radius ** cfg.q
    return w * (radius_q / torch.clamp(nu_q, min=radius_q)).pow(1.0 / cfg.q)


def softmax_rows(logits: Tensor) -> Tensor:
    """A Memora memory matrix: every row on the simplex scaled to sum to its fan-in (mean entry 1)."""
    return logits.shape[-1] * torch.softmax(logits, dim=-1)


def memora_lag_step(cfg: MirasConfig, memory: Memory, k0: Tensor, v0: Tensor, eta0: Tensor,
                    log_alpha0: Tensor, ln_weight: Tensor, ln_bias: Tensor) -> Memory:
    """Memora's exact step on a chunk's first token (the lag token): KL retention + l2 gradient.

    M1 = c * softmax_row(alpha_0 * log(max(M0 / c, eps)) - eta_0 * grad l(M0; k_0, v_0)).
    The clamp is the positivity handling: in-chunk linear updates can leave small negative entries.
    """
    w_in, w_out = memory
    with emulate_dots("ieee"):  # a one-token step: the kernels run it on the CUDA cores
        a, gz, gu = mlp_factors(cfg, w_in, w_out, k0, v0, ln_weight, ln_bias, None)
    grads = (gz.transpose(-1, -2) @ k0, gu.transpose(-1, -2) @ a)
    alpha = log_alpha0.exp().unsqueeze(-1)  # [B, H, 1, 1]
    eta = eta0.unsqueeze(-1)
    out = []
    for w, grad in zip(memory, grads, strict=True):
        fan_in = w.shape[-1]
        log_p = torch.log(torch.clamp(w / fan_in, min=cfg.memora_eps))
        out.append(softmax_rows(alpha * log_p - eta * grad))
    return tuple(out)


def boundary_step(cfg: MirasConfig, memory: Memory, k0: Tensor, v0: Tensor, eta0: Tensor,
                  log_alpha0: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None,
                  lq_map: Callable[[MirasConfig, Tensor, float], Tensor] = lq_normalise) -> Memory:
    """The memory at a chunk start becomes the new anchor, after the rule's boundary map (``lq_map``: what
    computes :func:`lq_normalise`)."""
    if cfg.retention == "lq":
        return tuple(lq_map(cfg, w, std) for w, std in zip(memory, cfg.memory_rule().init_std, strict=True))
    if cfg.retention == "kl":
        return memora_lag_step(cfg, memory, k0, v0, eta0, log_alpha0, ln_weight, ln_bias)
    return memory


def _where_rows(mask: Tensor, new: Memory, old: Memory) -> Memory:
    m = mask.view(-1, 1, 1, 1)
    return tuple(torch.where(m, a, b) for a, b in zip(new, old, strict=True))


class PromptKernels(NamedTuple):
    """What runs a prompt's chunks in :func:`memory_scan` and :func:`factored_scan`: :func:`memory_segment`,
    :func:`mlp_factors` and :func:`lq_normalise` (at chunk boundaries), or implementations of their contracts
    (models.backend picks native ones on a CPU)."""

    segment: Callable[..., tuple[Tensor, Memory, TokenFactors | None]] = memory_segment
    factors: Callable[..., tuple[Tensor, Tensor, Tensor]] = mlp_factors
    lq_map: Callable[[MirasConfig, Tensor, float], Tensor] = lq_normalise


REFERENCE = PromptKernels()


class LastSegment(NamedTuple):
    """The last segment of a scan: its first token's index in the call, and its tokens' gradient factors at its
    anchor (the scan's final anchor) as the kernels' segment returned them (None for the linear memory)."""

    start: int
    factors: TokenFactors | None


def _one_phase(phase: Tensor) -> bool:
    """Whether every row's chunks start at the same offset (``phase``: each row's position mod the chunk size)."""
    return not bool((phase != phase[0]).any())


def memory_scan(cfg: MirasConfig, anchor: Memory, memory: Memory, pos: Tensor, q: Tensor, k: Tensor,
                v: Tensor, eta: Tensor, log_alpha: Tensor, delta: Tensor | None, valid: Tensor,
                ln_weight: Tensor | None, ln_bias: Tensor | None, surprise: Tensor | None = None,
                known: KnownStep | None = None, kernels: PromptKernels = REFERENCE) -> tuple[Tensor, Memory, Memory]:
    """Run the memory over ``T`` tokens per sequence, continuing from (anchor, memory) at ``pos``.

    q, k, v: [B, H, T, d]; eta, log_alpha, delta: [B, H, T]; pos: [B] absolute position of the
    first token; valid: [B, T] (padding at the end of a row updates nothing).
    Returns the reads [B, H, T, d] and the new (anchor, memory). ``surprise`` [B, H, T], if given, takes
    every token's loss at its chunk's anchor (``memory_segment``; padding: unspecified). ``known`` (T = 1):
    which rows start a chunk, from the host (:class:`KnownStep`); None: looked up on the device. ``kernels.segment``
    runs each segment (:class:`PromptKernels`).
    """
    b = cfg.chunk_size
    T = q.shape[2]
    if T == 1 and dot_emulation() != "ieee":  # one-token decode: the kernels run it on the CUDA cores, exact fp32
        with emulate_dots("ieee"):
            return memory_scan(cfg, anchor, memory, pos, q, k, v, eta, log_alpha, delta, valid, ln_weight, ln_bias,
                               surprise, kernels=kernels)
    phase = pos % b
    if T > 1 and not _one_phase(phase):
        # Rows whose chunk boundaries fall at different offsets are processed in groups.
        out = torch.empty_like(q)
        new_anchor = [torch.empty_like(w) for w in anchor]
        new_memory = [torch.empty_like(w) for w in memory]
        for value in torch.unique(phase).tolist():
            rows = (phase == value).nonzero().squeeze(1)

            def pick(t: Tensor | None, rows: Tensor = rows) -> Tensor | None:
                return None if t is None else t.index_select(0, rows)

            part = None if surprise is None else surprise.new_empty(len(rows), *surprise.shape[1:])
            o, an, mem = memory_scan(cfg, tuple(pick(w) for w in anchor), tuple(pick(w) for w in memory),
                                     pick(pos), pick(q), pick(k), pick(v), pick(eta), pick(log_alpha),
                                     pick(delta), pick(valid), ln_weight, ln_bias, part, kernels=kernels)
            if surprise is not None:
                surprise.index_copy_(0, rows, part)
            out = out.index_copy(0, rows, o)
            new_anchor = [x.index_copy(0, rows, y) for x, y in zip(new_anchor, an, strict=True)]
            new_memory = [x.index_copy(0, rows, y) for x, y in zip(new_memory, mem, strict=True)]
        return out, tuple(new_anchor), tuple(new_memory)

    out, anchor, memory, _ = scan_chunks(cfg, anchor, memory, pos, q, k, v, eta, log_alpha, delta, valid, ln_weight,
                                         ln_bias, surprise, known, kernels)
    return out, anchor, memory


def scan_chunks(cfg: MirasConfig, anchor: Memory, memory: Memory, pos: Tensor, q: Tensor, k: Tensor, v: Tensor,
                eta: Tensor, log_alpha: Tensor, delta: Tensor | None, valid: Tensor, ln_weight: Tensor | None,
                ln_bias: Tensor | None, surprise: Tensor | None = None, known: KnownStep | None = None,
                kernels: PromptKernels = REFERENCE) -> tuple[Tensor, Memory, Memory, LastSegment]:
    """:func:`memory_scan` for rows whose chunks start at the same offsets (one phase, or one token), segment by
    segment; also returns its last segment (:class:`LastSegment`)."""
    b = cfg.chunk_size
    T = q.shape[2]
    mask = valid.unsqueeze(1).to(eta.dtype)  # padding: eta = 0 and alpha = 1, so nothing changes
    eta = eta * mask
    lag_log_alpha = log_alpha * mask
    # Memora's retention lives in the lag step only; inside a chunk its updates are not decayed.
    log_alpha = torch.zeros_like(log_alpha) if cfg.retention == "kl" else lag_log_alpha
    start_phase = int(pos[0]) % b if T > 1 else 0  # one token is one segment, whatever its phase
    outs = []
    t = 0
    while t < T:
        n = min(T - t, b - (start_phase + t) % b)
        seg = slice(t, t + n)
        seg_eta = eta[:, :, seg]
        at_boundary = ((pos + t) % b == 0) & valid[:, t]
        if known.first is not None if known is not None else bool(at_boundary.any()):
            stepped = boundary_step(cfg, memory, k[:, :, t:t + 1], v[:, :, t:t + 1], eta[:, :, t:t + 1],
                                    lag_log_alpha[:, :, t:t + 1], ln_weight, ln_bias, kernels.lq_map)
            if known is None and bool(at_boundary.all()):  # every row (a prompt's usual case): no selection
                anchor = memory = stepped
            else:
                anchor = _where_rows(at_boundary, stepped, anchor)
                memory = _where_rows(at_boundary, stepped, memory)
            if cfg.retention == "kl":
                # The lag token's update is the softmax step itself.
                first = torch.where(at_boundary.view(-1, 1), 0.0, seg_eta[:, :, 0])
                seg_eta = torch.cat([first.unsqueeze(-1), seg_eta[:, :, 1:]], dim=-1)
        o, memory, factors = kernels.segment(cfg, anchor, memory, q[:, :, seg], k[:, :, seg], v[:, :, seg],
                                             seg_eta, log_alpha[:, :, seg], None if delta is None else delta[:, :, seg],
                                             ln_weight, ln_bias, None if surprise is None else surprise[:, :, seg])
        outs.append(o)
        t += n
    return torch.cat(outs, dim=2), anchor, memory, LastSegment(T - n, factors)


def initial_memory(cfg: MirasConfig, params: dict[str, Tensor]) -> Memory:
    """The learned initial memory of every head (outer-loop parameters)."""
    if cfg.memory == "linear":
        return (params["mem_init"],)
    if cfg.retention == "kl":
        return (softmax_rows(params["mem_logits_in"]), softmax_rows(params["mem_logits_out"]))
    return (params["mem_init_in"], params["mem_init_out"])


def read_memory(cfg: MirasConfig, memory: Memory, x: Tensor, ln_weight: Tensor | None,
                ln_bias: Tensor | None) -> Tensor:
    """M(x; W) for a fixed memory (used by tests and by the per-token reference)."""
    if cfg.memory == "linear":
        return x @ memory[0].transpose(-1, -2)
    return mlp_read(memory[0], memory[1], x, ln_weight, ln_bias, cfg.memory_ln_eps)


def l2_normalise(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class FactoredMemory(NamedTuple):
    """The decode state of an MLP memory in the factored layout, per sequence and head.

    ``anchor``: (W_in [B, H, D, d], W_out [B, H, d, D]), the anchor of the chunk the sequence is in.
    ``rows`` [B, H, b, 2(D + d)]: one factor row ``(k_i, gz_i, a_i, gu_i)`` per token of the chunk
    consumed so far (grad W_in_i = gz_i k_i^T, grad W_out_i = gu_i a_i^T, at the anchor); rows not yet
    written hold 0. ``row_coef`` [B, H, b]: C[t, i] = eta_i prod_{i<j<=t} alpha_j after the last token
    t (0 for unwritten rows). ``row_decay`` [B, H]: prod_{j<=t} alpha_j from the chunk start.
    The number of filled rows is ``pos % b`` (0 at ``pos > 0``: the chunk is complete, all b are).
    """

    anchor: Memory
    rows: Tensor
    row_coef: Tensor
    row_decay: Tensor


def factored_fresh(cfg: MirasConfig, memory: Memory) -> FactoredMemory:
    """The factored state at position 0: the anchor is the initial memory, no rows, decay 1."""
    w_in = memory[0]
    batch, H = w_in.shape[:2]
    rows = w_in.new_zeros(batch, H, cfg.chunk_size, 2 * (cfg.memory_hidden + cfg.head_dim))
    return FactoredMemory(memory, rows, w_in.new_zeros(batch, H, cfg.chunk_size), w_in.new_ones(batch, H))


def split_rows(rows: Tensor, head_dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Views (k, gz, a, gu) of factor rows laid out as (k [d], gz [D], a [D], gu [d])."""
    hidden = (rows.shape[-1] - 2 * head_dim) // 2
    return rows.split((head_dim, hidden, hidden, head_dim), dim=-1)


def fold_rows(state: FactoredMemory) -> Memory:
    """The running memory of a factored state: W = decay * anchor - sum_i C_i grad_i (never stored)."""
    k, gz, a, gu = split_rows(state.rows, state.anchor[0].shape[-1])
    coef = state.row_coef.unsqueeze(-1)
    decay = state.row_decay[..., None, None]
    w_in, w_out = state.anchor
    return (decayed_update(w_in, decay, gz.transpose(-1, -2), coef * k),
            decayed_update(w_out, decay, gu.transpose(-1, -2), coef * a))


def start_chunk(cfg: MirasConfig, state: FactoredMemory, k0: Tensor, v0: Tensor, eta0: Tensor, log_alpha0: Tensor,
                ln_weight: Tensor, ln_bias: Tensor) -> FactoredMemory:
    """A token starts a chunk: the finished chunk's rows fold into the running memory, the rule's boundary
    map makes it the new anchor, and the rows, coefficients and decay start over (k0 ... : [B, H, 1, *])."""
    anchor = boundary_step(cfg, fold_rows(state), k0, v0, eta0, log_alpha0, ln_weight, ln_bias)
    return FactoredMemory(anchor, torch.zeros_like(state.rows), torch.zeros_like(state.row_coef),
                          torch.ones_like(state.row_decay))


def factored_token(cfg: MirasConfig, state: FactoredMemory, row: Tensor, q: Tensor, k: Tensor, v: Tensor,
                   eta: Tensor, log_alpha: Tensor, delta: Tensor | None, ln_weight: Tensor,
                   ln_bias: Tensor, surprise: Tensor | None = None,
                   filled: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One token per sequence (q, k, v: [B, H, 1, d]; gates [B, H, 1]) that becomes factor row ``row``
    [B] of its chunk, whose anchor ``state`` already holds (``start_chunk`` ran for a chunk's first token).

    Returns the read y = M(q; W_t) [B, H, 1, d] and the new (row [B, H, 2(D + d)], row_coef, row_decay):
    the old coefficients and the decay take the token's alpha, its row enters with eta, and the read sees
    the post-update memory W_t = decay_t * anchor - sum_{i<=t} C[t, i] grad_i, through the anchor once
    and the rows' dot products (the dual form with n = 1). ``surprise`` [B, H, 1], if given, takes the
    token's loss at the anchor (computed with its factors). ``filled``: how many rows to read (None: as
    many as some sequence has filled, a device value read on the host).
    """
    if cfg.retention == "kl":
        # Memora: no decay inside a chunk; the lag token's update is its boundary step (eta 0 here).
        alpha = torch.ones_like(log_alpha)
        eta = torch.where((row == 0).view(-1, 1, 1), 0.0, eta)
    else:
        alpha = log_alpha.exp()
    w_in, w_out = state.anchor
    z, zq = (torch.cat([k, q], dim=2) @ w_in.transpose(-1, -2)).split(1, dim=2)  # one pass over W_in for both
    with emulate_dots("ieee"):  # one token: the kernels' decode runs on the CUDA cores, in exact fp32
        a, gz, gu = mlp_factors_at(cfg, z, w_out, k, v, ln_weight, ln_bias, delta, surprise)  # [B, H, 1, *]
    coef = state.row_coef * alpha  # the old rows (a new row's slot holds 0 until written)
    decay = state.row_decay * alpha.squeeze(-1)
    # Only the rows some sequence has filled are read (the others hold 0).
    if filled is None:
        filled = int(row.max())
    old_k, old_gz, old_a, old_gu = split_rows(state.rows[:, :, :filled], cfg.head_dim)
    old_coef = coef[..., None, :filled]
    eta = eta.unsqueeze(-1)  # [B, H, 1, 1]
    scale = decay[..., None, None]
    zq = (scale * zq - (old_coef * (q @ old_k.transpose(-1, -2))) @ old_gz
          - eta * (q * k).sum(-1, keepdim=True) * gz)
    aq = gelu(zq)
    uq = (scale * (aq @ w_out.transpose(-1, -2)) - (old_coef * (aq @ old_a.transpose(-1, -2))) @ old_gu
          - eta * (aq * a).sum(-1, keepdim=True) * gu)
    out = q + layer_norm(uq, ln_weight, ln_bias, cfg.memory_ln_eps)[0]
    new_row = torch.cat([k, gz, a, gu], dim=-1).squeeze(2)
    coef = coef.scatter(-1, row.view(-1, 1, 1).expand(-1, coef.shape[1], 1), eta.view(*coef.shape[:2], 1))
    return out, new_row, coef, decay


def factored_decode_step(cfg: MirasConfig, state: FactoredMemory, pos: Tensor, q: Tensor, k: Tensor, v: Tensor,
                         eta: Tensor, log_alpha: Tensor, delta: Tensor | None, valid: Tensor, ln_weight: Tensor,
                         ln_bias: Tensor, surprise: Tensor | None = None) -> tuple[Tensor, FactoredMemory]:
    """One decode step on a factored state (the inputs untouched): token [B, H, 1, *] at ``pos`` [B];
    rows with ``valid`` [B, 1] false change nothing. Returns the reads and the new state (``surprise``
    [B, H, 1], if given, takes the token's loss at the anchor)."""
    b = cfg.chunk_size
    row = pos % b
    live = valid[:, 0]
    first = (row == 0) & live
    if bool(first.any()):
        started = start_chunk(cfg, state, k, v, eta, log_alpha, ln_weight, ln_bias)
        state = FactoredMemory(*(_where_rows(first, new, old) if isinstance(new, tuple) else
                                 torch.where(first.view(-1, *[1] * (new.dim() - 1)), new, old)
                                 for new, old in zip(started, state, strict=True)))
    out, new_row, coef, decay = factored_token(cfg, state, row, q, k, v, eta, log_alpha, delta, ln_weight, ln_bias,
                                               surprise)
    at_row = (torch.arange(b, device=pos.device) == row.view(-1, 1)) & live.view(-1, 1)  # [B, b]
    rows = torch.where(at_row[:, None, :, None], new_row.unsqueeze(2), state.rows)
    keep = ~live.view(-1, 1, 1)
    return out, FactoredMemory(state.anchor, rows, torch.where(keep, state.row_coef, coef),
                               torch.where(keep.squeeze(-1), state.row_decay, decay))


def factored_scan(cfg: MirasConfig, state: FactoredMemory, pos: Tensor, q: Tensor, k: Tensor, v: Tensor, eta: Tensor,
                  log_alpha: Tensor, delta: Tensor | None, valid: Tensor, ln_weight: Tensor,
                  ln_bias: Tensor, surprise: Tensor | None = None,
                  kernels: PromptKernels = REFERENCE) -> tuple[Tensor, FactoredMemory]:
    """``memory_scan`` from and to a factored state (any number of tokens, rows at any positions, a chunk
    possibly half consumed): the running memory is folded once, the tokens run through the chunked scan,
    and the tokens of the last (possibly partial) chunk become its factor rows at the final anchor
    (``surprise`` [B, H, T]: as in ``memory_scan``)."""
    b, T = cfg.chunk_size, q.shape[2]
    scan_args = (cfg, state.anchor, fold_rows(state), pos, q, k, v, eta, log_alpha, delta, valid, ln_weight, ln_bias,
                 surprise)
    if T > 1 and bool(valid.all()) and _one_phase(pos % b):
        # Rows of one length and phase (a prompt's usual case) end in the same segment, which holds exactly the
        # tokens of the last chunk this call adds, and computed their factors at the final anchor already.
        out, anchor, _, last = scan_chunks(*scan_args, kernels=kernels)
    else:
        (out, anchor, _), last = memory_scan(*scan_args, kernels=kernels), None
    lengths = valid.sum(1)
    end = pos + lengths
    chunk_start = torch.div(end - 1, b, rounding_mode="floor") * b  # of the chunk of each row's last token
    crossed = (chunk_start >= pos).view(-1, 1, 1)  # the call started that chunk: the old rows are gone
    # Row r of that chunk holds the token at chunk_start + r: index t of this call, or an old row if t < 0.
    t = (chunk_start - pos).view(-1, 1) + torch.arange(b, device=pos.device)  # [B, b]
    new = ((t >= 0) & (t < lengths.view(-1, 1))).unsqueeze(1)  # [B, 1, b]
    index = t.clamp(0, T - 1).unsqueeze(1).expand(-1, q.shape[1], -1)  # [B, H, b]

    def tail(x: Tensor) -> Tensor:
        return x.gather(2, index if x.dim() == 3 else index.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))

    zero = torch.zeros((), dtype=state.rows.dtype, device=pos.device)
    if last is None:
        k_tail = tail(k)
        a, gz, gu = kernels.factors(cfg, *anchor, k_tail, tail(v), ln_weight, ln_bias,
                                    None if delta is None else tail(delta))
        rows = torch.where(new.unsqueeze(-1), torch.cat([k_tail, gz, a, gu], dim=-1),
                           torch.where(crossed.unsqueeze(-1), zero, state.rows))
    else:  # the last segment's tokens become the rows from `first` on: after the old rows if it did not start the chunk
        first, a, gz, gu = (int(pos[0]) + last.start) % b, *last.factors
        after = state.rows[:, :, first + T - last.start:]
        rows = torch.cat([state.rows[:, :, :first], torch.cat([k[:, :, last.start:], gz, a, gu], dim=-1),
                          after if first else torch.zeros_like(after)], dim=2)
    eta_new = torch.where(new, tail(eta), zero)
    log_alpha_new = torch.zeros_like(eta_new) if cfg.retention == "kl" else torch.where(new, tail(log_alpha), zero)
    if cfg.retention == "kl":  # the lag token (row 0) enters through its boundary step
        eta_new[..., 0] = 0.0
    coef = torch.where(new | crossed, eta_new, state.row_coef)
    later = log_alpha_new.flip(-1).cumsum(-1).flip(-1) - log_alpha_new  # sum over the rows after r
    decay = torch.where(crossed.squeeze(-1), 1.0, state.row_decay) * log_alpha_new.sum(-1).exp()
    return out, FactoredMemory(anchor, rows, coef * later.exp(), decay)
