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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import MirasConfig

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# A memory is a tuple of tensors: (W_in, W_out) for the MLP memory, (W,) for the linear one.
Memory = tuple[Tensor, ...]


def gelu(z: Tensor) -> Tensor:
    """Exact (erf) GELU: z * Phi(z)."""
    return 0.5 * z * (1.0 + torch.erf(z * _SQRT_HALF))


def gelu_grad(z: Tensor) -> Tensor:
    """d gelu / dz = Phi(z) + z * phi(z)."""
    return 0.5 * (1.0 + torch.erf(z * _SQRT_HALF)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


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


def output_grad(cfg: MirasConfig, error: Tensor, delta: Tensor | None) -> Tensor:
    """d l / d M(k) for the attentional bias, given the error e = M(k) - v  ([..., n, d]).

    l2:    l = 1/2 ||e||^2                          -> e
    lp:    l = 1/p sum |e|^p, smoothed               -> tanh(c e) (e^2 + eps)^((p-1)/2)
    huber: per token, rms(e) <= delta ? l2 : delta * l1 (smoothed sign) -> e or delta tanh(c e)
    """
    if cfg.attentional_bias == "l2":
        return error
    if cfg.attentional_bias == "lp":
        magnitude = (error * error + cfg.abs_eps).pow((cfg.p - 1.0) / 2.0)
        return smooth_sign(error, cfg.sign_sharpness) * magnitude
    assert delta is not None, "the huber bias needs delta"
    delta = delta.unsqueeze(-1)
    rms = error.pow(2).mean(-1, keepdim=True).sqrt()
    return torch.where(rms <= delta, error, delta * smooth_sign(error, cfg.sign_sharpness))


def mlp_read(w_in: Tensor, w_out: Tensor, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float) -> Tensor:
    """M(x) = x + LN(W_out gelu(W_in x)) with per-sequence weights."""
    u = gelu(x @ w_in.transpose(-1, -2)) @ w_out.transpose(-1, -2)
    return x + layer_norm(u, ln_weight, ln_bias, eps)[0]


def mlp_factors(cfg: MirasConfig, w_in: Tensor, w_out: Tensor, k: Tensor, v: Tensor, ln_weight: Tensor,
                ln_bias: Tensor, delta: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token gradients of l(M(k_i), v_i) at fixed weights, as outer-product factors.

    Returns (a, gz, gu) with grad W_out_i = gu_i a_i^T  ([d, D]) and grad W_in_i = gz_i k_i^T ([D, d]).
    """
    z = k @ w_in.transpose(-1, -2)  # [B, H, n, D]
    a = gelu(z)
    u = a @ w_out.transpose(-1, -2)  # [B, H, n, d]
    y_ln, u_hat, inv_std = layer_norm(u, ln_weight, ln_bias, cfg.memory_ln_eps)
    g = output_grad(cfg, k + y_ln - v, delta)
    gu = layer_norm_backward(g, u_hat, inv_std, ln_weight)
    gz = (gu @ w_out) * gelu_grad(z)
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
    return out.sub_(left @ right)


def memory_segment(cfg: MirasConfig, anchor: Memory, memory: Memory, q: Tensor, k: Tensor, v: Tensor,
                   eta: Tensor, log_alpha: Tensor, delta: Tensor | None, ln_weight: Tensor | None,
                   ln_bias: Tensor | None) -> tuple[Tensor, Memory]:
    """Process tokens that all lie in one chunk: reads for every token and the memory after the last.

    ``anchor`` is the chunk's anchor (gradients are taken there), ``memory`` the running memory
    just before the first token. Reads see the post-update memory:
        W_t = decay_t * memory - sum_{i<=t} C[t, i] grad_i,   y_t = M(q_t; W_t).
    """
    decay, coeff = chunk_coefficients(eta, log_alpha)
    last = coeff[..., -1, :].unsqueeze(-1)  # [B, H, n, 1]: C[n-1, i]
    decay_last = decay[..., -1, None, None]
    if cfg.memory == "linear":
        (w_anchor,), (w,) = anchor, memory
        g = output_grad(cfg, k @ w_anchor.transpose(-1, -2) - v, delta)
        out = decay.unsqueeze(-1) * (q @ w.transpose(-1, -2)) - (coeff * (q @ k.transpose(-1, -2))) @ g
        return out, (decayed_update(w, decay_last, g.transpose(-1, -2), last * k),)
    a, gz, gu = mlp_factors(cfg, *anchor, k, v, ln_weight, ln_bias, delta)
    w_in, w_out = memory
    zq = decay.unsqueeze(-1) * (q @ w_in.transpose(-1, -2)) - (coeff * (q @ k.transpose(-1, -2))) @ gz
    aq = gelu(zq)
    uq = decay.unsqueeze(-1) * (aq @ w_out.transpose(-1, -2)) - (coeff * (aq @ a.transpose(-1, -2))) @ gu
    out = q + layer_norm(uq, ln_weight, ln_bias, cfg.memory_ln_eps)[0]
    new_in = decayed_update(w_in, decay_last, gz.transpose(-1, -2), last * k)
    new_out = decayed_update(w_out, decay_last, gu.transpose(-1, -2), last * a)
    return out, (new_in, new_out)


def memory_init_std(cfg: MirasConfig) -> tuple[float, ...]:
    """Entry scale of each memory matrix at initialisation: W_in (and the linear W) read unit-norm keys,
    so std 1 gives O(1) pre-activations; W_out reads D hidden units, so std 1/sqrt(D)."""
    if cfg.memory == "linear":
        return (1.0,)
    return (1.0, 1.0 / math.sqrt(cfg.memory_hidden))


def lq_normalise(cfg: MirasConfig, w: Tensor, init_std: float) -> Tensor:
    """Moneta's boundary step: project each head's matrix onto the lq ball.

    nu(W) = (mean |W_ij|^q)^(1/q) / init_std;  W <- W * min(1, radius / nu(W)).
    """
    nu = w.abs().pow(cfg.q).mean((-2, -1), keepdim=True).pow(1.0 / cfg.q) / init_std
    return w * torch.clamp(cfg.lq_radius / nu, max=1.0)


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
                  log_alpha0: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None) -> Memory:
    """The memory at a chunk start becomes the new anchor, after the rule's boundary map."""
    if cfg.retention == "lq":
        return tuple(lq_normalise(cfg, w, std) for w, std in zip(memory, memory_init_std(cfg), strict=True))
    if cfg.retention == "kl":
        return memora_lag_step(cfg, memory, k0, v0, eta0, log_alpha0, ln_weight, ln_bias)
    return memory


def _where_rows(mask: Tensor, new: Memory, old: Memory) -> Memory:
    m = mask.view(-1, 1, 1, 1)
    return tuple(torch.where(m, a, b) for a, b in zip(new, old, strict=True))


def memory_scan(cfg: MirasConfig, anchor: Memory, memory: Memory, pos: Tensor, q: Tensor, k: Tensor,
                v: Tensor, eta: Tensor, log_alpha: Tensor, delta: Tensor | None, valid: Tensor,
                ln_weight: Tensor | None, ln_bias: Tensor | None) -> tuple[Tensor, Memory, Memory]:
    """Run the memory over ``T`` tokens per sequence, continuing from (anchor, memory) at ``pos``.

    q, k, v: [B, H, T, d]; eta, log_alpha, delta: [B, H, T]; pos: [B] absolute position of the
    first token; valid: [B, T] (padding at the end of a row updates nothing).
    Returns the reads [B, H, T, d] and the new (anchor, memory).
    """
    b = cfg.chunk_size
    T = q.shape[2]
    phase = pos % b
    if T > 1 and bool((phase != phase[0]).any()):
        # Rows whose chunk boundaries fall at different offsets are processed in groups.
        out = torch.empty_like(q)
        new_anchor = [torch.empty_like(w) for w in anchor]
        new_memory = [torch.empty_like(w) for w in memory]
        for value in torch.unique(phase).tolist():
            rows = (phase == value).nonzero().squeeze(1)

            def pick(t: Tensor | None, rows: Tensor = rows) -> Tensor | None:
                return None if t is None else t.index_select(0, rows)

            o, an, mem = memory_scan(cfg, tuple(pick(w) for w in anchor), tuple(pick(w) for w in memory),
                                     pick(pos), pick(q), pick(k), pick(v), pick(eta), pick(log_alpha),
                                     pick(delta), pick(valid), ln_weight, ln_bias)
            out = out.index_copy(0, rows, o)
            new_anchor = [x.index_copy(0, rows, y) for x, y in zip(new_anchor, an, strict=True)]
            new_memory = [x.index_copy(0, rows, y) for x, y in zip(new_memory, mem, strict=True)]
        return out, tuple(new_anchor), tuple(new_memory)

    mask = valid.unsqueeze(1).to(eta.dtype)  # padding: eta = 0 and alpha = 1, so nothing changes
    eta = eta * mask
    lag_log_alpha = log_alpha * mask
    # Memora's retention lives in the lag step only; inside a chunk its updates are not decayed.
    log_alpha = torch.zeros_like(log_alpha) if cfg.retention == "kl" else lag_log_alpha
    start_phase = int(phase[0])
    outs = []
    t = 0
    while t < T:
        n = min(T - t, b - (start_phase + t) % b)
        seg = slice(t, t + n)
        seg_eta = eta[:, :, seg]
        at_boundary = ((pos + t) % b == 0) & valid[:, t]
        if bool(at_boundary.any()):
            stepped = boundary_step(cfg, memory, k[:, :, t:t + 1], v[:, :, t:t + 1], eta[:, :, t:t + 1],
                                    lag_log_alpha[:, :, t:t + 1], ln_weight, ln_bias)
            anchor = _where_rows(at_boundary, stepped, anchor)
            memory = _where_rows(at_boundary, stepped, memory)
            if cfg.retention == "kl":
                # The lag token's update is the softmax step itself.
                first = torch.where(at_boundary.view(-1, 1), 0.0, seg_eta[:, :, 0])
                seg_eta = torch.cat([first.unsqueeze(-1), seg_eta[:, :, 1:]], dim=-1)
        o, memory = memory_segment(cfg, anchor, memory, q[:, :, seg], k[:, :, seg], v[:, :, seg], seg_eta,
                                   log_alpha[:, :, seg], None if delta is None else delta[:, :, seg],
                                   ln_weight, ln_bias)
        outs.append(o)
        t += n
    return torch.cat(outs, dim=2), anchor, memory


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
