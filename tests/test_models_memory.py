"""The memory rules against independent statements of the equations (the per-token reference kernels.naive,
the gated delta rule, closed forms) and the two state layouts against each other."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from miras_serve.kernels import naive
from miras_serve.models.config import preset_config
from miras_serve.models.memory import (
    REFERENCE,
    PromptKernels,
    boundary_step,
    factored_decode_step,
    factored_fresh,
    factored_scan,
    fold_rows,
    lq_normalise,
    memory_scan,
    output_grad,
    power,
)

B, H, d, E = 2, 2, 8, 4
D = E * d


def random_inputs(T: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    q = F.normalize(r(B, H, T, d), dim=-1)
    k = F.normalize(r(B, H, T, d), dim=-1)
    v = r(B, H, T, d)
    eta = 0.3 * torch.rand(B, H, T, generator=g, dtype=dtype)
    log_alpha = F.logsigmoid(2 + r(B, H, T))
    delta = 0.5 + torch.rand(B, H, T, generator=g, dtype=dtype)
    ln_w = (0.5 + torch.rand(H, 1, d, generator=g, dtype=dtype))
    ln_b = 0.1 * r(H, 1, d)
    return q, k, v, eta, log_alpha, delta, ln_w, ln_b


def random_memory(cfg, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    if cfg.memory == "linear":
        return (0.3 * torch.randn(B, H, d, d, generator=g, dtype=dtype),)
    if cfg.retention == "kl":
        return tuple(w.shape[-1] * torch.softmax(torch.randn(*w.shape, generator=g, dtype=dtype), -1)
                     for w in (torch.empty(B, H, D, d), torch.empty(B, H, d, D)))
    std_in, std_out = cfg.memory_rule().init_std
    return (std_in * torch.randn(B, H, D, d, generator=g, dtype=dtype),
            std_out * torch.randn(B, H, d, D, generator=g, dtype=dtype))


def config(preset: str, **overrides):
    return preset_config(preset, head_dim=d, n_heads=H, memory_expansion=E, **overrides)


def test_small_powers_as_products_equal_pow():
    """The lp bias and the lq normalisation take small powers as products (a faster CPU prefill): equal to
    torch's pow in fp64, values and gradients, and other exponents are pow itself."""
    x = (torch.rand(100, dtype=torch.float64) * 3).requires_grad_()
    for exponent in (1.0, 2.0, 3.0, 4.0, 0.25, 1.5):
        mine, theirs = power(x, exponent), x.pow(exponent)
        torch.testing.assert_close(mine, theirs, rtol=1e-14, atol=0.0)
        torch.testing.assert_close(torch.autograd.grad(mine.sum(), x)[0], torch.autograd.grad(theirs.sum(), x)[0],
                                   rtol=1e-13, atol=0.0)


def test_yaad_switch_takes_both_branches():
    cfg = config("yaad")
    e = torch.tensor([[[[0.1, -0.2, 0.05, 0.0, 0.1, 0.1, -0.1, 0.2], [3.0, -2.0, 1.0, 0.5, -4.0, 2.0, 1.0, 3.0]]]])
    delta = torch.tensor([[[0.5, 0.5]]])
    g = output_grad(cfg, e, delta)
    torch.testing.assert_close(g[0, 0, 0], e[0, 0, 0])  # rms 0.12 <= 0.5: the l2 branch
    torch.testing.assert_close(g[0, 0, 1], 0.5 * torch.tanh(cfg.sign_sharpness * e[0, 0, 1]))  # the l1 branch


def test_moneta_smoothing_matches_the_paper_form():
    cfg = config("moneta", lp_knee=None)  # the paper's form is unbounded (the knee: tests/test_models_lp_knee.py)
    e = torch.linspace(-2, 2, 101, dtype=torch.float64)
    expected = torch.tanh(cfg.sign_sharpness * e) * (e * e + cfg.abs_eps).pow((cfg.p - 1) / 2)
    torch.testing.assert_close(output_grad(cfg, e, None), expected)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-12, 1.0, 1e3])
def test_moneta_normalisation_has_a_finite_gradient(scale):
    """Training differentiates through the projection: at a memory decayed to (nearly) zero the old form
    min(1, R / nu) gave 0 * inf = NaN in its backward; the value is unchanged."""
    cfg = config("moneta")
    std = cfg.memory_rule().init_std[0]
    w = (scale * torch.randn(1, 1, D, d)).requires_grad_()
    projected = lq_normalise(cfg, w, std)
    projected.sum().backward()
    assert torch.isfinite(w.grad).all()
    nu = w.detach().abs().pow(cfg.q).mean().pow(1 / cfg.q) / std
    expected = w.detach() * torch.clamp(cfg.lq_radius / nu, max=1.0) if scale > 0 else w.detach()
    torch.testing.assert_close(projected.detach(), expected)


@pytest.mark.parametrize("q", [4.0, 3.0])  # Moneta's q, and an odd one (where |w|^q needs the abs)
def test_moneta_normalisation_takes_both_branches(q):
    cfg = config("moneta", q=q)
    std = cfg.memory_rule().init_std[0]
    small = 0.5 * std * torch.randn(1, 1, D, d, dtype=torch.float64)  # inside the ball: unchanged
    torch.testing.assert_close(lq_normalise(cfg, small, std), small)
    large = 10 * std * torch.randn(1, 1, D, d, dtype=torch.float64)  # outside: projected onto the sphere
    projected = lq_normalise(cfg, large, std)
    nu = projected.abs().pow(cfg.q).mean().pow(1 / cfg.q) / std
    assert math.isclose(nu.item(), cfg.lq_radius, rel_tol=1e-9)
    torch.testing.assert_close(projected / projected.norm(), large / large.norm())  # direction kept


@pytest.mark.parametrize("preset", ["moneta", "yaad", "memora", "linear"])
def test_chunk_size_one_equals_the_per_token_reference(preset):
    """With b = 1 the chunked machinery is the per-token recurrence of the equations (kernels.naive): every
    token's gradient at the memory just before it, Moneta projected at every token, Memora's Eq. 27 at every
    token. (The reference's gradients are checked against autograd in tests/test_kernels_naive.py.)"""
    cfg = config(preset, chunk_size=1)
    T = 7
    q, k, v, eta, log_alpha, delta, ln_w, ln_b = random_inputs(T, seed=3)
    if preset == "moneta":  # make the projection fire on some tokens
        eta = 3 * eta
    memory = random_memory(cfg, seed=4)
    if cfg.memory == "linear":
        ln_w = ln_b = None
    args = (memory, memory, torch.zeros(B, dtype=torch.long), q, k, v, eta, log_alpha, delta,
            torch.ones(B, T, dtype=torch.bool), ln_w, ln_b)
    out, _, final = memory_scan(cfg, *args)
    ref_out, _, ref_final = naive.memory_scan(cfg.memory_rule(), *args)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    for a, b in zip(final, ref_final, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3])
def test_linear_preset_is_the_gated_delta_rule(chunk):
    """linear = S_t = alpha_t S + eta_t (v_t - S_anchor k_t) k_t^T, o_t = S_t q_t; with chunk 1 the anchor is
    S_{t-1}: the gated delta rule. With a larger chunk every prediction uses the chunk-start S."""
    cfg = config("linear", chunk_size=chunk)
    T = 8
    q, k, v, eta, log_alpha, _, _, _ = random_inputs(T, seed=5)
    S0 = 0.3 * torch.randn(B, H, d, d, dtype=torch.float64)
    out, _, (final,) = memory_scan(cfg, (S0,), (S0,), torch.zeros(B, dtype=torch.long), q, k, v, eta, log_alpha,
                                   None, torch.ones(B, T, dtype=torch.bool), None, None)
    S, anchor, ref = S0.clone(), S0.clone(), []
    for t in range(T):
        if t % chunk == 0:
            anchor = S
        kt, vt = k[:, :, t, :, None], v[:, :, t, :, None]
        S = log_alpha[:, :, t].exp()[..., None, None] * S + eta[:, :, t][..., None, None] * (vt - anchor @ kt) @ kt.mT
        ref.append((S @ q[:, :, t, :, None]).squeeze(-1))
    torch.testing.assert_close(out, torch.stack(ref, dim=2), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(final, S, rtol=1e-9, atol=1e-12)


def test_linear_preset_equals_fla_gated_delta_rule_after_reparametrisation():
    """The yardstick behind the preset's name (models/SPEC.md §5): with chunk 1, linear's (eta, alpha, v) equals
    the gated delta rule as fla writes it, S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v'_t k_t^T,
    o_t = S_t q_t, only after beta = eta / alpha and v' = alpha v; the natural mapping (beta = eta, v' = v)
    gives another function."""
    cfg = config("linear", chunk_size=1)
    T = 9
    q, k, v, eta, log_alpha, _, _, _ = random_inputs(T, seed=11)
    S0 = 0.3 * torch.randn(B, H, d, d, dtype=torch.float64)
    out, _, _ = memory_scan(cfg, (S0,), (S0,), torch.zeros(B, dtype=torch.long), q, k, v, eta, log_alpha, None,
                            torch.ones(B, T, dtype=torch.bool), None, None)

    def gated_delta_rule(beta: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        S, eye, reads = S0.clone(), torch.eye(d, dtype=torch.float64), []
        for t in range(T):
            kt = k[:, :, t, :, None]
            b, vt = beta[:, :, t][..., None, None], values[:, :, t, :, None]
            S = log_alpha[:, :, t].exp()[..., None, None] * S @ (eye - b * kt @ kt.mT) + b * vt @ kt.mT
            reads.append((S @ q[:, :, t, :, None]).squeeze(-1))
        return torch.stack(reads, dim=2)

    alpha = log_alpha.exp()
    torch.testing.assert_close(out, gated_delta_rule(eta / alpha, alpha.unsqueeze(-1) * v), rtol=1e-9, atol=1e-12)
    assert (out - gated_delta_rule(eta, v)).abs().max() > 1e-3


def test_memora_memory_stays_positive_and_normalised():
    cfg = config("memora", chunk_size=4)
    T = 4 * 6
    q, k, v, eta, log_alpha, _, ln_w, ln_b = random_inputs(T, seed=6)
    eta = eta * 20  # large steps push the in-chunk linear part negative: the lag step must repair it
    memory = random_memory(cfg, seed=7)
    pos = torch.zeros(B, dtype=torch.long)
    saw_negative = False
    for start in range(0, T, 4):
        sl = slice(start, start + 4)
        valid = torch.ones(B, 4, dtype=torch.bool)
        _, anchor, memory = memory_scan(cfg, memory, memory, pos, q[:, :, sl], k[:, :, sl], v[:, :, sl],
                                        eta[:, :, sl], log_alpha[:, :, sl], None, valid, ln_w, ln_b)
        pos = pos + 4
        saw_negative |= any(bool((w < 0).any()) for w in memory)
        for w in anchor:  # the anchor is the post-lag memory: on the scaled simplex
            assert bool((w > 0).all())
            torch.testing.assert_close(w.sum(-1), torch.full(w.shape[:-1], float(w.shape[-1]), dtype=w.dtype))
    assert saw_negative, "the test should exercise the positivity handling"
    stepped = boundary_step(cfg, memory, k[:, :, :1], v[:, :, :1], eta[:, :, :1], log_alpha[:, :, :1], ln_w, ln_b)
    assert all(bool((w > 0).all()) for w in stepped)


def factored_state_after(cfg, memory, pos_tokens, seed):
    """A factored state after ``pos_tokens`` tokens from ``memory`` (token by token), and those inputs."""
    inputs = random_inputs(pos_tokens, seed=seed)
    q, k, v, eta, log_alpha, delta, ln_w, ln_b = inputs
    state = factored_fresh(cfg, memory)
    for t in range(pos_tokens):
        sl = slice(t, t + 1)
        _, state = factored_decode_step(cfg, state, torch.full((B,), t), q[:, :, sl], k[:, :, sl], v[:, :, sl],
                                        eta[:, :, sl], log_alpha[:, :, sl], delta[:, :, sl],
                                        torch.ones(B, 1, dtype=torch.bool), ln_w, ln_b)
    return state


@pytest.mark.parametrize("preset", ["moneta", "yaad", "memora"])
def test_factored_decode_equals_running_decode(preset):
    """fp64, token by token over several chunks: the dual-form step on (anchor, factor rows) reads exactly
    what the running-memory step reads, and folding its rows gives the running memory at every step.
    Row 1 skips some steps (padding): its state does not change."""
    cfg = config(preset, chunk_size=4)
    T = 3 * cfg.chunk_size + 3
    q, k, v, eta, log_alpha, delta, ln_w, ln_b = random_inputs(T, seed=11)
    memory = random_memory(cfg, seed=12)
    anchor, running = memory, memory
    factored = factored_fresh(cfg, memory)
    pos = torch.zeros(B, dtype=torch.long)
    for t in range(T):
        valid = torch.tensor([[True], [t % 5 != 3]])
        token = [x[:, :, t:t + 1] for x in (q, k, v, eta, log_alpha, delta)]
        ref_out, anchor, running = memory_scan(cfg, anchor, running, pos, *token, valid, ln_w, ln_b)
        before = factored
        out, factored = factored_decode_step(cfg, factored, pos, *token, valid, ln_w, ln_b)
        torch.testing.assert_close(out[0], ref_out[0], rtol=1e-9, atol=1e-12)
        if valid[1]:
            torch.testing.assert_close(out[1], ref_out[1], rtol=1e-9, atol=1e-12)
        else:
            assert all(torch.equal(a[1], b[1]) for a, b in zip((*before.anchor, *before[1:]),
                                                               (*factored.anchor, *factored[1:]), strict=True))
        for mine, ref in zip((*factored.anchor, *fold_rows(factored)), (*anchor, *running), strict=True):
            torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-12)
        filled = (pos + valid[:, 0]) % cfg.chunk_size  # rows past the filled ones hold 0
        for row, n in enumerate(filled.tolist()):
            if n:
                assert not factored.rows[row, :, n:].any() and not factored.row_coef[row, :, n:].any()
        pos = pos + valid[:, 0]


@pytest.mark.parametrize("preset", ["moneta", "yaad", "memora"])
# after 3 tokens of a 4-token chunk: rows ending mid-chunk, exactly at a chunk end, an empty row, one token;
# rows of one length (their last chunk's rows come from the last segment): crossing two chunk starts; after
# 1 token: filling the chunk's middle rows without crossing one
@pytest.mark.parametrize("consumed,lengths", [(3, (9, 2)), (3, (4, 7)), (3, (1, 0)), (3, (1, 1)), (3, (6, 6)),
                                              (1, (2, 2))])
def test_factored_scan_continues_and_writes_the_factored_state(preset, consumed, lengths):
    """A prompt continuing a half-consumed chunk (rows at different positions) on a factored state equals
    the running-memory scan (reads, anchor, folded memory), and leaves the state that token-by-token
    decoding leaves: prefill then decode and decode all the way are the same state. Rows of one length take
    their last chunk's factor rows from the scan's last segment, not from the kernels' factors."""
    cfg = config(preset, chunk_size=4)
    memory = random_memory(cfg, seed=13)
    start = factored_state_after(cfg, memory, consumed, seed=14)
    pos = torch.tensor([consumed, consumed])
    T = max(lengths)
    q, k, v, eta, log_alpha, delta, ln_w, ln_b = random_inputs(T, seed=15)
    valid = torch.arange(T).view(1, -1) < torch.tensor(lengths).view(-1, 1)
    gates = (q, k, v, eta, log_alpha, delta)
    ref_out, ref_anchor, ref_memory = memory_scan(cfg, start.anchor, fold_rows(start), pos, *gates, valid, ln_w, ln_b)
    def no_factors(*args):
        raise AssertionError("rows of one length and phase must not recompute their last chunk's factors")

    kernels = PromptKernels(factors=no_factors) if len(set(lengths)) == 1 and T > 1 else REFERENCE
    out, state = factored_scan(cfg, start, pos, *gates, valid, ln_w, ln_b, kernels=kernels)
    mask = valid[:, None, :, None]
    torch.testing.assert_close(out * mask, ref_out * mask, rtol=1e-9, atol=1e-12)
    for mine, ref in zip((*state.anchor, *fold_rows(state)), (*ref_anchor, *ref_memory), strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-12)
    stepped = start
    for t in range(T):
        token = [x[:, :, t:t + 1] for x in gates]
        _, stepped = factored_decode_step(cfg, stepped, pos + t, *token, valid[:, t:t + 1], ln_w, ln_b)
    for mine, ref in zip((*state.anchor, *state[1:]), (*stepped.anchor, *stepped[1:]), strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-12)
