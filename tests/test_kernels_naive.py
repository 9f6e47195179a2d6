"""kernels.naive, the per-token reference written from the equations, against the chunked spec
(models.memory.memory_scan) in fp64 for every legal rule, and its loss gradients against autograd."""

from __future__ import annotations

import dataclasses
import itertools
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from benchmarks.kernel_cases import rule_case
from miras_serve.kernels import naive
from miras_serve.kernels.rule import MemoryRule
from miras_serve.kernels.testing import GATE_NAMES, fp64, random_inputs
from miras_serve.models.config import ATTENTIONAL_BIASES, MEMORY_ARCHITECTURES, RETENTIONS, ConfigError, MirasConfig
from miras_serve.models.memory import memory_scan

CHUNK = 4
# Rows at every phase of the chunk, lengths that are no multiple of it, several chunks, right padding, an empty row.
SCENARIOS = {
    "prefill-four-phases": dict(pos=[0, 5, 2, 7], lengths=[11, 8, 3, 0]),
    "prefill-one-phase": dict(pos=[0, 4, 8, 12], lengths=[9, 10, 5, 2]),  # rows at different chunks, same phase
    "decode": dict(pos=[3, 4, 0, 9], lengths=[1, 1, 1, 0]),  # one token: chunk starts beside mid-chunk rows
}


# Moneta's knee in the "-knee" rules: the random errors (entries of M(k) - v, about N(0, 2)) lie on both sides of it.
KNEE = 1.0


def config(memory: str, bias: str, retention: str, knee: str | None = None) -> MirasConfig:
    """The rule (memory, bias, retention), with the lp bias's knee at KNEE if ``knee`` ("knee")."""
    return MirasConfig(memory=memory, attentional_bias=bias, retention=retention, n_heads=2, head_dim=8,
                       chunk_size=CHUNK, eta_max=0.5, lp_knee=KNEE if knee else None).validate()


def legal_rules() -> list[tuple[str, str, str]]:
    """Every (memory, attentional bias, retention) a model config accepts: the presets' and the others."""
    legal = []
    for combination in itertools.product(MEMORY_ARCHITECTURES, ATTENTIONAL_BIASES, RETENTIONS):
        try:
            config(*combination)
        except ConfigError:
            continue
        legal.append(combination)
    return legal


def rule_cases() -> list[tuple[str, ...]]:
    """The legal rules, and those with the lp bias once more with a knee."""
    return legal_rules() + [(*rule, "knee") for rule in legal_rules() if rule[1] == "lp"]


def fp64_inputs(cfg: MirasConfig, batch: int, T: int, seed: int) -> dict:
    drawn = random_inputs(rule_case(cfg), batch, T, torch.Generator().manual_seed(seed))
    return {name: fp64(x) for name, x in drawn.items()}


def lq_radius_between(rule: MemoryRule, memory: naive.Memory) -> float:
    """A radius through the middle of the memories' lq sizes: half of them lie outside the ball (a boundary
    projects them), half inside (a boundary leaves them)."""
    sizes = sorted(naive.lq_size(rule, w[b, h], std).item() for w, std in zip(memory, rule.init_std, strict=True)
                   for b in range(w.shape[0]) for h in range(w.shape[1]))
    return (sizes[len(sizes) // 2 - 1] + sizes[len(sizes) // 2]) / 2


def anchor_errors(rule: MemoryRule, x: dict, valid: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(M_anchor(k) - v, delta or None) of every head and valid token: the errors the gradients are taken at."""
    ln = zip(x["ln_weight"].reshape(rule.n_heads, -1), x["ln_bias"].reshape(rule.n_heads, -1), strict=True)
    return [(naive.read(rule, tuple(w[b, h] for w in x["anchor"]), x["k"][b, h, t], gamma_beta) - x["v"][b, h, t],
             None if x["delta"] is None else x["delta"][b, h, t])
            for h, gamma_beta in enumerate(ln) for b, t in valid.nonzero().tolist()]


def assert_huber_takes_both_branches(rule: MemoryRule, x: dict, valid: torch.Tensor) -> None:
    """Some errors at the anchor are above delta and some below: the inputs exercise both sides of Yaad's switch."""
    quadratic = [naive.huber_is_quadratic(error, delta) for error, delta in anchor_errors(rule, x, valid)]
    assert any(quadratic) and not all(quadratic), "the errors should take both branches of the Huber switch"


def assert_lp_knee_crossed(rule: MemoryRule, x: dict, valid: torch.Tensor) -> None:
    """Some error entries at the anchor lie beyond the lp knee and some below it."""
    sizes = torch.cat([error.abs() for error, _ in anchor_errors(rule, x, valid)])
    beyond = (sizes > rule.lp_knee).double().mean().item()
    assert 0.2 < beyond < 0.8, f"the errors should lie on both sides of the knee ({beyond:.0%} beyond it)"


@pytest.mark.parametrize("with_surprise", [False, True], ids=["reads", "surprise"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("combination", rule_cases(), ids="-".join)
def test_naive_equals_the_chunked_spec(combination, scenario, with_surprise):
    cfg = config(*combination)
    pos, lengths = (torch.tensor(SCENARIOS[scenario][key]) for key in ("pos", "lengths"))
    T = int(lengths.max())
    x = fp64_inputs(cfg, len(pos), T, seed=zlib.crc32(f"{combination} {scenario}".encode()))
    if cfg.retention == "lq":
        cfg = dataclasses.replace(cfg, lq_radius=lq_radius_between(cfg.memory_rule(), x["memory"]))
    rule = cfg.memory_rule()
    valid = torch.arange(T).view(1, -1) < lengths.view(-1, 1)
    if rule.attentional_bias == "huber":
        assert_huber_takes_both_branches(rule, x, valid)
    if math.isfinite(rule.lp_knee) and valid.any():
        assert_lp_knee_crossed(rule, x, valid)
    args = [x["anchor"], x["memory"], pos, *(x[name] for name in GATE_NAMES), valid, x["ln_weight"], x["ln_bias"]]
    before = [t.clone() for t in (*x["anchor"], *x["memory"])]
    surprise = {}
    if with_surprise:
        surprise = {impl: torch.full((len(pos), cfg.n_heads, T), float("nan"), dtype=torch.float64)
                    for impl in ("naive", "spec")}
    out, anchor, memory = naive.memory_scan(rule, *args, surprise.get("naive"))
    ref_out, ref_anchor, ref_memory = memory_scan(cfg, *args, surprise.get("spec"))
    tight = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, ref_out, **tight)  # padding included: its read sees the unchanged memory
    for mine, ref in zip((*anchor, *memory), (*ref_anchor, *ref_memory), strict=True):
        torch.testing.assert_close(mine, ref, **tight)
    if with_surprise:  # padding's surprise is unspecified
        mask = valid.unsqueeze(1).expand_as(surprise["spec"])
        torch.testing.assert_close(surprise["naive"][mask], surprise["spec"][mask], **tight)
    assert all(torch.equal(a, b) for a, b in zip(before, (*x["anchor"], *x["memory"]), strict=True)), \
        "the inputs are left untouched"
    empty = lengths == 0  # a row of padding changes nothing
    for new, old in zip((*anchor, *memory), (*x["anchor"], *x["memory"]), strict=True):
        assert torch.equal(new[empty], old[empty])


def stated_loss(rule: MemoryRule, y: torch.Tensor, v: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """The attentional bias as a potential for autograd (Moneta's in its exact, unsmoothed form)."""
    e = y - v
    if rule.attentional_bias == "l2":
        return 0.5 * e.pow(2).sum()
    if rule.attentional_bias == "lp":  # phi(|e_j|) of SPEC §4, with its knee r if any
        a, r, p = e.abs(), rule.lp_knee, rule.p
        if math.isinf(r):
            return a.pow(p).sum() / p
        return torch.where(a <= r, a.pow(p) / p, r**p / p + r ** (p - 2) * (a.pow(2) - r**2) / 2).sum()
    if e.pow(2).mean().sqrt() <= delta:
        return 0.5 * e.pow(2).sum()
    # delta * l1 with the smoothed sign: the potential of delta * tanh(c e) is delta/c log cosh(c e)
    return delta * (torch.log(torch.cosh(rule.sign_sharpness * e)) / rule.sign_sharpness).sum()


@pytest.mark.parametrize("memory", MEMORY_ARCHITECTURES)
@pytest.mark.parametrize("bias,delta_scale,knee", [("l2", 1.0, None), ("lp", 1.0, None), ("lp", 1.0, KNEE),
                                                    ("huber", 0.01, None), ("huber", 100.0, None)])
def test_loss_gradient_equals_autograd(memory, bias, delta_scale, knee):
    """naive.memory_gradient (the chain rule written out) == autograd of the stated loss, for each attentional
    bias (Huber on both sides of its switch, Moneta's with and without its knee) and both memories. Moneta's
    smoothing is sharpened so that its smoothed gradient converges to the exact lp one."""
    rule = dataclasses.replace(config("mlp", "l2", "l2").memory_rule(), memory=memory, attentional_bias=bias,
                               sign_sharpness=1e4 if bias == "lp" else 10.0, abs_eps=1e-14 if bias == "lp" else 1e-6,
                               lp_knee=math.inf if knee is None else knee)
    gen = torch.Generator().manual_seed(1)
    d, D = rule.head_dim, rule.memory_hidden
    shapes = [(d, d)] if memory == "linear" else [(D, d), (d, D)]
    ln = None if memory == "linear" else (0.5 + torch.rand(d, generator=gen, dtype=torch.float64),
                                          0.1 * torch.randn(d, generator=gen, dtype=torch.float64))
    for _ in range(4):
        w = tuple(std * torch.randn(*shape, generator=gen, dtype=torch.float64)
                  for shape, std in zip(shapes, rule.init_std, strict=True))
        k = F.normalize(torch.randn(d, generator=gen, dtype=torch.float64), dim=0)
        v = torch.randn(d, generator=gen, dtype=torch.float64)
        delta = delta_scale * (0.5 + torch.rand((), generator=gen, dtype=torch.float64))
        if bias == "huber":
            quadratic = naive.huber_is_quadratic(naive.read(rule, w, k, ln) - v, delta)
            assert quadratic == (delta_scale > 1), "the test should take the intended side of the switch"
        if knee is not None:
            sizes = (naive.read(rule, w, k, ln) - v).abs()
            assert (sizes > knee).any() and (sizes < knee).any(), "the errors should lie on both sides of the knee"
        params = [m.clone().requires_grad_() for m in w]
        expected = torch.autograd.grad(stated_loss(rule, naive.read(rule, tuple(params), k, ln), v, delta), params)
        for mine, ref in zip(naive.memory_gradient(rule, w, k, v, delta, ln), expected, strict=True):
            torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-9)
