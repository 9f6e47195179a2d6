"""Correctness checks of the Triton scan against a reference scan run in fp64, shared by the CPU tests
(tests/test_kernels_*.py, under the Triton interpreter) and the GPU check (benchmarks/gpu_check.py).
Nothing of the model: a :class:`RuleCase` carries the rule, its gates' scale and the reference, which the
caller chooses (benchmarks/kernel_cases.py picks it for the tests and the GPU check).

Each ``check_*`` function draws fresh random inputs, runs the kernel with its outputs poisoned with
NaN, and returns ``{name: relative RMS error}``; a broken invariant (an untouched slot that changed,
a padding row that was written) is reported as an infinite error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .rule import MemoryRule
from .scan import Factors, scan_pool


class RuleCase(NamedTuple):
    """A memory rule under test: the rule the kernels take, the largest learning rate its gates produce
    (the random inputs' scale), and the reference the kernels are measured against, with the contract of
    models.memory.memory_scan and the rule bound: ``reference(anchor, memory, pos, q, k, v, eta, log_alpha,
    delta, valid, ln_weight, ln_bias, surprise=None) -> (reads, anchor, memory)``."""

    rule: MemoryRule
    eta_max: float
    reference: Callable[..., tuple]


GATE_NAMES = ("q", "k", "v", "eta", "log_alpha", "delta")
# Relative RMS error bounds per fp32 dot precision (MIRAS_DOT_PRECISION): exact fp32 (the interpreter),
# tf32x3 (GPU default: fp32-level, a little looser) and plain tf32 (opt-in: 10-bit operands).
# Memora's memory has entries ~1, so M(x) is nearly constant before its LayerNorm and fp32 rounding
# order matters ~10x more (the fp32 reference itself is off by ~1e-5 against fp64 there).
TOLERANCE = {"ieee": 2e-5, "tf32x3": 5e-5, "tf32": 5e-3}
KL_FACTOR = 5.0


def tolerance(rule: MemoryRule, precision: str) -> float:
    return TOLERANCE[precision] * (KL_FACTOR if rule.retention == "kl" else 1.0)


def random_memory(rule: MemoryRule, batch: int, gen: torch.Generator) -> tuple[Tensor, ...]:
    """A memory per row at 1x to 4x its initial scale, so Moneta's lq projection both acts and does not."""
    H, d, D = rule.n_heads, rule.head_dim, rule.memory_hidden
    if rule.retention == "kl":
        return (d * torch.softmax(torch.randn(batch, H, D, d, generator=gen), -1),
                D * torch.softmax(torch.randn(batch, H, d, D, generator=gen), -1))
    shapes = [(d, d)] if rule.memory == "linear" else [(D, d), (d, D)]
    scale = 1 + 3 * torch.rand(batch, 1, 1, 1, generator=gen)
    return tuple(std * scale * torch.randn(batch, H, *shape, generator=gen)
                 for shape, std in zip(shapes, rule.init_std, strict=True))


def random_inputs(case: RuleCase, batch: int, T: int, gen: torch.Generator, device: str = "cpu") -> dict:
    """Token inputs as a Miras layer makes them, an anchor and a (different) running memory."""
    rule = case.rule
    H, d = rule.n_heads, rule.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    memory = random_memory(rule, batch, gen)
    anchor = tuple(w * (1 + 0.05 * torch.rand(w.shape, generator=gen)) for w in memory)
    ln = rule.memory == "mlp"
    inputs = dict(
        anchor=anchor, memory=memory,
        q=F.normalize(randn(batch, H, T, d), dim=-1), k=F.normalize(randn(batch, H, T, d), dim=-1),
        v=randn(batch, H, T, d),
        eta=case.eta_max * torch.sigmoid(randn(batch, H, T)),
        log_alpha=F.logsigmoid(randn(batch, H, T) + 2.0),
        delta=F.softplus(randn(batch, H, T)) if rule.attentional_bias == "huber" else None,
        ln_weight=1 + 0.2 * randn(H, 1, d) if ln else None, ln_bias=0.2 * randn(H, 1, d) if ln else None,
    )
    return {k: to_device(v, device) for k, v in inputs.items()}


def to_device(x, device: str):
    if isinstance(x, tuple):
        return tuple(to_device(t, device) for t in x)
    return None if x is None else x.to(device)


def fp64(x):
    """A tensor, or a tuple of them, in fp64 (integer tensors and None as they are)."""
    if isinstance(x, tuple):
        return tuple(fp64(t) for t in x)
    return x.double() if x is not None and x.is_floating_point() else x


def ref_scan(case: RuleCase, *args):
    """The case's reference in fp64: the oracle every fp32 implementation is measured against."""
    return case.reference(*(fp64(a) for a in args))


def rel_err(ref: Tensor, got: Tensor) -> float:
    """Relative RMS error (fla's assert_close metric); any non-finite value is an infinite error."""
    ref, got = ref.double(), got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((ref - got).norm() / ref.norm().clamp(min=1e-30)).item()


@contextlib.contextmanager
def nan_poisoned_empty() -> Iterator[None]:
    """torch.empty returns NaN-filled float tensors, so entries a kernel forgets to write show up."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = poisoned
    try:
        yield
    finally:
        torch.empty = real_empty


def _state_errors(prefix: str, ref: tuple, got: tuple) -> dict[str, float]:
    return {f"{prefix} {i}": rel_err(r, g) for i, (r, g) in enumerate(zip(ref, got, strict=True))}


def _identical(a: tuple, b: tuple, index: Tensor) -> bool:
    """Rows ``index`` hold the same bits (NaN poison included)."""
    def bits(t: Tensor) -> Tensor:
        return t.index_select(0, index).contiguous().view(torch.int32)

    return all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b, strict=True))


def check_padded_prefill(case: RuleCase, gen: torch.Generator, device: str = "cpu",
                         dtype: torch.dtype = torch.float32, T: int = 9,
                         launch: dict | None = None) -> dict[str, float]:
    """Rows at different phases, an odd length, partial chunks, right padding and an empty row;
    q, k, v stored in ``dtype`` (the reference gets the same stored values, up-cast). ``launch`` overrides
    the scan's launch configuration (e.g. the prefill path: ``SPLIT_D``)."""
    x = random_inputs(case, 4, T, gen, device)
    for name in ("q", "k", "v"):
        x[name] = x[name].to(dtype)
    pos = torch.tensor([0, 5, 2, 7], device=device)
    lengths = torch.tensor([T, T - 3, 3, 0], device=device)
    valid = torch.arange(T, device=device).view(1, -1) < lengths.view(-1, 1)
    args = [x[n] for n in GATE_NAMES]
    ref = ref_scan(case, x["anchor"], x["memory"], pos, *args[:-1], args[-1], valid, x["ln_weight"], x["ln_bias"])
    anchor = tuple(w.clone() for w in x["anchor"])
    memory = tuple(w.clone() for w in x["memory"])
    with nan_poisoned_empty():
        out = scan_pool(case.rule, anchor, memory, torch.arange(4, device=device), pos, *args, x["ln_weight"],
                        x["ln_bias"], lengths=lengths, launch=launch)
    errors = {"reads": rel_err(ref[0], out)}
    errors.update(_state_errors("anchor", ref[1], anchor))
    errors.update(_state_errors("memory", ref[2], memory))
    empty = torch.tensor([3], device=device)
    if not _identical((*x["anchor"], *x["memory"]), (*anchor, *memory), empty):
        errors["empty row untouched"] = float("inf")
    return errors


def check_decode_slots(case: RuleCase, gen: torch.Generator, device: str = "cpu", steps: int = 5,
                       pool_size: int = 7, launch: dict | None = None) -> dict[str, float]:
    """Token-by-token decode on a pool through random slots, one of them a padding slot (-1), across
    chunk boundaries: reads and touched slots against the reference, the rest bit-identical.
    ``launch`` overrides the scan's launch configuration (e.g. the split decode's slab width)."""
    batch = 3
    x = random_inputs(case, batch, steps, gen, device)
    pool_anchor = to_device(random_memory(case.rule, pool_size, gen), device)
    pool_memory = to_device(random_memory(case.rule, pool_size, gen), device)
    chosen = torch.randperm(pool_size, generator=gen)[:batch].to(device)
    for pool, init in ((pool_anchor, x["anchor"]), (pool_memory, x["memory"])):
        for w_pool, w in zip(pool, init, strict=True):
            w_pool[chosen] = w
    before = tuple(w.clone() for w in (*pool_anchor, *pool_memory))
    slots = torch.cat([chosen[:1], torch.tensor([-1], device=device), chosen[1:]])  # batch row 1 is padding
    rows = torch.tensor([0, 2, 3], device=device)
    pos = torch.tensor([3, 0, 4, 9], device=device)
    ref_state = (x["anchor"], x["memory"])
    ones = torch.ones(batch, 1, dtype=torch.bool, device=device)
    errors = {}
    for step in range(steps):
        token = [None if x[n] is None else x[n][:, :, step:step + 1] for n in GATE_NAMES]
        ref_out, *ref_state = ref_scan(case, *ref_state, pos.index_select(0, rows) + step, *token, ones,
                                       x["ln_weight"], x["ln_bias"])
        padded = [None if t is None else torch.cat([t[:1], t[:1], t[1:]]) for t in token]
        with nan_poisoned_empty():
            out = scan_pool(case.rule, pool_anchor, pool_memory, slots, pos + step, *padded, x["ln_weight"],
                            x["ln_bias"], launch=launch)
        errors[f"reads step {step}"] = rel_err(ref_out, out.index_select(0, rows))
        if not torch.isnan(out[1]).all():
            errors["padding row unwritten"] = float("inf")
    errors.update(_state_errors("anchor", ref_state[0], tuple(w[chosen] for w in pool_anchor)))
    errors.update(_state_errors("memory", ref_state[1], tuple(w[chosen] for w in pool_memory)))
    untouched = torch.tensor([s for s in range(pool_size) if s not in chosen.tolist()], device=device)
    if not _identical(before, (*pool_anchor, *pool_memory), untouched):
        errors["untouched slots bit-identical"] = float("inf")
    return errors


def packed_inputs(case: RuleCase, lengths: list[int], gen: torch.Generator,
                  device: torch.device | str) -> tuple[list[dict], tuple, list, Tensor]:
    """Random inputs of one sequence per length, and the same packed end to end along the token dim with
    their cu_seqlens (the varlen layout): (per-sequence inputs, LayerNorm params, packed gates, cu_seqlens)."""
    seqs = [random_inputs(case, 1, n, gen, device) for n in lengths]
    ln = seqs[0]["ln_weight"], seqs[0]["ln_bias"]
    packed = [None if seqs[0][n] is None else torch.cat([s[n] for s in seqs], dim=2) for n in GATE_NAMES]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return seqs, ln, packed, torch.tensor(cu, device=device)


def check_varlen_prefill(case: RuleCase, gen: torch.Generator, device: str = "cpu",
                         lengths: tuple[int, ...] = (7, 1, 5), pool_size: int = 5,
                         launch: dict | None = None) -> dict[str, float]:
    """cu_seqlens layout: prompts of different lengths and phases, each continuing its own pool slot."""
    n_seqs = len(lengths)
    pos = torch.randint(0, 3 * case.rule.chunk_size, (n_seqs,), generator=gen).to(device)
    pool_anchor = to_device(random_memory(case.rule, pool_size, gen), device)
    pool_memory = to_device(random_memory(case.rule, pool_size, gen), device)
    before = tuple(w.clone() for w in (*pool_anchor, *pool_memory))
    slots = torch.randperm(pool_size, generator=gen)[:n_seqs].to(device)
    seqs, ln, packed, cu_seqlens = packed_inputs(case, lengths, gen, device)
    with nan_poisoned_empty():
        out = scan_pool(case.rule, pool_anchor, pool_memory, slots, pos, *packed, *ln, cu_seqlens=cu_seqlens,
                        launch=launch)
    errors = {}
    for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        slot = slots[i:i + 1]
        ref = ref_scan(case, tuple(w[slot] for w in before[:len(pool_anchor)]),
                       tuple(w[slot] for w in before[len(pool_anchor):]), pos[i:i + 1], *(s[m] for m in GATE_NAMES),
                       torch.ones(1, n, dtype=torch.bool, device=device), *ln)
        errors[f"reads seq {i}"] = rel_err(ref[0], out[:, :, cu_seqlens[i]:cu_seqlens[i + 1]])
        errors.update(_state_errors(f"seq {i} anchor", ref[1], tuple(w[slot] for w in pool_anchor)))
        errors.update(_state_errors(f"seq {i} memory", ref[2], tuple(w[slot] for w in pool_memory)))
    return errors


def filled_rows(pos: Tensor, chunk: int) -> Tensor:
    """Factor rows a factored state holds before the token at ``pos``: pos % b, or b at a completed chunk."""
    j = pos % chunk
    return torch.where(j > 0, j, torch.where(pos > 0, chunk, 0))


def random_factors(case: RuleCase, pos: Tensor, gen: torch.Generator) -> Factors:
    """A factored state per row consistent with ``pos``: random factor rows and positive coefficients for
    the filled rows, NaN rows and zero coefficients past them (a kernel that reads them shows it), a decay
    in (0.5, 1] (Memora: 1)."""
    rule = case.rule
    H, d, D, b = rule.n_heads, rule.head_dim, rule.memory_hidden, rule.chunk_size
    batch = pos.shape[0]
    filled = (torch.arange(b).view(1, 1, b) < filled_rows(pos.cpu(), b).view(-1, 1, 1)).expand(batch, H, b)
    k = F.normalize(torch.randn(batch, H, b, d, generator=gen), dim=-1)
    gz = 0.5 * torch.randn(batch, H, b, D, generator=gen)
    a = F.gelu(torch.randn(batch, H, b, D, generator=gen))
    gu = 0.3 * torch.randn(batch, H, b, d, generator=gen)
    rows = torch.where(filled.unsqueeze(-1), torch.cat([k, gz, a, gu], dim=-1), float("nan"))
    coef = torch.where(filled, case.eta_max * torch.rand(batch, H, b, generator=gen), 0.0)
    decay = torch.ones(batch, H) if rule.retention == "kl" else 0.5 + 0.5 * torch.rand(batch, H, generator=gen)
    return Factors(rows, coef, torch.where(pos.cpu().view(-1, 1) > 0, decay, 1.0))


def factored_memory(rule: MemoryRule, anchor: tuple, factors: Factors, pos: Tensor) -> tuple[Tensor, Tensor]:
    """The running memory a factored state stands for, in fp64: decay A - sum_i C_i (gz_i k_i^T, gu_i a_i^T)
    over the filled rows."""
    d, D = rule.head_dim, rule.memory_hidden
    filled = torch.arange(rule.chunk_size, device=pos.device).view(1, 1, -1) < filled_rows(pos, rule.chunk_size).view(
        -1, 1, 1)
    rows = torch.where(filled.unsqueeze(-1), factors.rows.double(), 0.0)
    k, gz, a, gu = rows.split([d, D, D, d], dim=-1)
    coef = torch.where(filled, factors.coef.double(), 0.0).unsqueeze(-1)
    decay = factors.decay.double().view(*factors.decay.shape, 1, 1)
    return (decay * anchor[0].double() - gz.transpose(-1, -2) @ (coef * k),
            decay * anchor[1].double() - gu.transpose(-1, -2) @ (coef * a))


def _factored_errors(prefix: str, rule: MemoryRule, ref: tuple, anchor: tuple, factors: Factors, pos: Tensor,
                     start: Tensor) -> dict[str, float]:
    """The kernel's factored state at ``pos`` against the reference's (anchor, running memory); coefficients
    past the filled rows must be 0, and so must those rows wherever a chunk started since ``start``."""
    b = rule.chunk_size
    errors = _state_errors(f"{prefix}anchor", ref[0], anchor)
    errors.update(_state_errors(f"{prefix}memory", ref[1], factored_memory(rule, anchor, factors, pos)))
    past = torch.arange(b, device=pos.device).view(1, 1, -1) >= filled_rows(pos, b).view(-1, 1, 1)
    if bool((factors.coef.masked_select(past) != 0).any()):
        errors[f"{prefix}coefficients past the filled rows"] = float("inf")
    started = (torch.div(pos - 1, b, rounding_mode="floor") * b >= start) & (pos > start)
    cleared = (past & started.view(-1, 1, 1)).expand(factors.coef.shape)
    if bool((factors.rows[cleared] != 0).any()):
        errors[f"{prefix}rows past the filled ones in a new chunk"] = float("inf")
    return errors


def check_factored_decode(case: RuleCase, gen: torch.Generator, device: str = "cpu", steps: int = 5,
                          pool_size: int = 7, launch: dict | None = None) -> dict[str, float]:
    """Token-by-token decode on a factored pool through random slots and a padding slot (-1), from every
    kind of start (mid-chunk, a completed chunk that folds first, a fresh state) across chunk boundaries:
    reads and the state (anchor, the running memory it stands for) against the fp64 reference, slots not
    in the batch bit-identical, and the anchor untouched by every step that starts no chunk."""
    batch = 4
    x = random_inputs(case, batch, steps, gen, device)
    b = case.rule.chunk_size
    start = torch.tensor([b - 1, b, 0, 2 * b + 1])
    pool_pos = torch.randint(0, 3 * b, (pool_size,), generator=gen)
    chosen = torch.randperm(pool_size, generator=gen)[:batch]
    pool_pos[chosen] = start
    pool_anchor = list(random_memory(case.rule, pool_size, gen))
    for w, w0 in zip(pool_anchor, x["anchor"], strict=True):
        w[chosen] = w0.cpu()
    factors = to_device(tuple(random_factors(case, pool_pos, gen)), device)
    pool = to_device(tuple(pool_anchor), device), Factors(*factors)
    chosen, start = chosen.to(device), start.to(device)
    ref_state = (x["anchor"], factored_memory(case.rule, x["anchor"], Factors(*(t[chosen] for t in factors)), start))
    before = tuple(w.clone() for w in (*pool[0], *pool[1]))
    slots = torch.cat([chosen[:1], torch.tensor([-1], device=device), chosen[1:]])  # batch row 1 is padding
    rows = torch.tensor([0, 2, 3, 4], device=device)
    pos = torch.cat([start[:1], torch.tensor([5], device=device), start[1:]])
    ones = torch.ones(batch, 1, dtype=torch.bool, device=device)
    errors = {}
    for step in range(steps):
        token = [None if x[n] is None else x[n][:, :, step:step + 1] for n in GATE_NAMES]
        ref_out, *ref_state = ref_scan(case, *ref_state, start + step, *token, ones, x["ln_weight"], x["ln_bias"])
        padded = [None if t is None else torch.cat([t[:1], t[:1], t[1:]]) for t in token]
        anchor_before = tuple(w.clone() for w in pool[0])
        with nan_poisoned_empty():
            out = scan_pool(case.rule, *pool, slots, pos + step, *padded, x["ln_weight"], x["ln_bias"], launch=launch)
        errors[f"reads step {step}"] = rel_err(ref_out, out.index_select(0, rows))
        if not torch.isnan(out[1]).all():
            errors["padding row unwritten"] = float("inf")
        mid_chunk = chosen[(start + step) % b != 0]
        if not _identical(anchor_before, pool[0], mid_chunk):
            errors["anchor untouched by steps inside a chunk"] = float("inf")
    end = start + steps
    errors.update(_factored_errors("", case.rule, ref_state, tuple(w[chosen] for w in pool[0]),
                                   Factors(*(t[chosen] for t in pool[1])), end, start))
    untouched = torch.tensor([s for s in range(pool_size) if s not in chosen.tolist()], device=device)
    if not _identical(before, (*pool[0], *pool[1]), untouched):
        errors["untouched slots bit-identical"] = float("inf")
    return errors


def check_factored_prefill(case: RuleCase, gen: torch.Generator, device: str = "cpu", T: int = 9,
                           decode_steps: int = 1, launch: dict | None = None) -> dict[str, float]:
    """A padded prefill on a factored pool: rows continuing mid-chunk, from a completed chunk, fresh, a
    prompt ending exactly at a chunk end, right padding and an empty row (left untouched); then
    ``decode_steps`` one-token steps from the state it leaves (the first already takes both kinds: a fold
    where the prompt ended at a chunk end, a continued chunk elsewhere). Reads and states against the fp64
    reference."""
    b = case.rule.chunk_size
    batch = 5
    x = random_inputs(case, batch, T, gen, device)
    pos = torch.tensor([b + 2, b, 0, 1, 3], device=device)
    lengths = torch.tensor([T, T - 3, 2 * b, b - 1, 0], device=device).clamp(max=T)
    factors = Factors(*to_device(tuple(random_factors(case, pos.cpu(), gen)), device))
    anchor = tuple(w.clone() for w in x["anchor"])
    before = tuple(w.clone() for w in (*anchor, *factors))
    valid = torch.arange(T, device=device).view(1, -1) < lengths.view(-1, 1)
    args = [x[n] for n in GATE_NAMES]
    ref_state = (x["anchor"], factored_memory(case.rule, x["anchor"], factors, pos))
    ref_out, *ref_state = ref_scan(case, *ref_state, pos, *args, valid, x["ln_weight"], x["ln_bias"])
    slots = torch.arange(batch, device=device)
    with nan_poisoned_empty():
        out = scan_pool(case.rule, anchor, factors, slots, pos, *args, x["ln_weight"], x["ln_bias"], lengths=lengths,
                        launch=launch)
    errors = {"reads": rel_err(ref_out, out)}
    start, pos = pos, pos + lengths
    errors.update(_factored_errors("prefill ", case.rule, ref_state, anchor, factors, pos, start))
    if not _identical(before, (*anchor, *factors), torch.tensor([batch - 1], device=device)):
        errors["empty row untouched"] = float("inf")
    y = random_inputs(case, batch, decode_steps, gen, device)
    ones = torch.ones(batch, 1, dtype=torch.bool, device=device)
    for step in range(decode_steps):
        token = [None if y[n] is None else y[n][:, :, step:step + 1] for n in GATE_NAMES]
        ref_out, *ref_state = ref_scan(case, *ref_state, pos, *token, ones, x["ln_weight"], x["ln_bias"])
        with nan_poisoned_empty():
            out = scan_pool(case.rule, anchor, factors, slots, pos, *token, x["ln_weight"], x["ln_bias"])
        errors[f"decode after prefill, step {step}"] = rel_err(ref_out, out)
        pos = pos + 1
    errors.update(_factored_errors("decode ", case.rule, ref_state, anchor, factors, pos, start))
    return errors


def check_factored_varlen(case: RuleCase, gen: torch.Generator, device: str = "cpu",
                          lengths: tuple[int, ...] = (7, 1, 5), pool_size: int = 5,
                          launch: dict | None = None) -> dict[str, float]:
    """cu_seqlens prefill on a factored pool: prompts of different lengths, each continuing its own slot
    from its own factored state and phase."""
    n_seqs = len(lengths)
    pool_pos = torch.randint(0, 3 * case.rule.chunk_size, (pool_size,), generator=gen)
    pool_anchor = to_device(random_memory(case.rule, pool_size, gen), device)
    factors = Factors(*to_device(tuple(random_factors(case, pool_pos, gen)), device))
    pool_pos = pool_pos.to(device)
    before_anchor = tuple(w.clone() for w in pool_anchor)
    before_memory = factored_memory(case.rule, pool_anchor, factors, pool_pos)
    slots = torch.randperm(pool_size, generator=gen)[:n_seqs].to(device)
    pos = pool_pos[slots]
    seqs, ln, packed, cu_seqlens = packed_inputs(case, lengths, gen, device)
    with nan_poisoned_empty():
        out = scan_pool(case.rule, pool_anchor, factors, slots, pos, *packed, *ln, cu_seqlens=cu_seqlens, launch=launch)
    errors = {}
    for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        slot = slots[i:i + 1]
        ref = ref_scan(case, tuple(w[slot] for w in before_anchor), tuple(w[slot] for w in before_memory),
                       pos[i:i + 1], *(s[m] for m in GATE_NAMES), torch.ones(1, n, dtype=torch.bool, device=device),
                       *ln)
        errors[f"reads seq {i}"] = rel_err(ref[0], out[:, :, cu_seqlens[i]:cu_seqlens[i + 1]])
        errors.update(_factored_errors(f"seq {i} ", case.rule, ref[1:], tuple(w[slot] for w in pool_anchor),
                                       Factors(*(t[slot] for t in factors)), pos[i:i + 1] + n, pos[i:i + 1]))
    return errors
