"""The Triton memory scan against the fp64 PyTorch reference (models.memory.memory_scan), on fresh random
inputs every run, with kernel outputs poisoned with NaN. Without a GPU the kernel runs under the Triton
interpreter (small shapes: head dim 8, chunk 4)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import random

import pytest

pytest.importorskip("triton")

from benchmarks.kernel_cases import PROMPT_HEADS, RULES, rule_case, rule_config  # noqa: E402
from miras_serve.kernels.precision import dot_precision  # noqa: E402
from miras_serve.kernels.testing import (  # noqa: E402
    check_decode_slots,
    check_padded_prefill,
    check_varlen_prefill,
    random_inputs,
    random_memory,
    ref_scan,
    rel_err,
    to_device,
    tolerance,
)
from miras_serve.models import backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = random.SystemRandom().randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


def assert_all_close(errors: dict[str, float], tol: float, seed: int) -> None:
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, f"relative RMS errors above {tol:.1g}: {bad} (seed {seed})"


@pytest.mark.parametrize("rule", sorted(RULES))
def test_padded_batch_matches_reference(rule):
    """Rows at different phases, odd length, partial chunks, right padding, an empty row left untouched."""
    case = rule_case(rule_config(rule, n_heads=PROMPT_HEADS))
    gen, seed = fresh_generator()
    assert_all_close(check_padded_prefill(case, gen, DEVICE), tolerance(case.rule, dot_precision(torch.device(DEVICE))),
                     seed)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_decode_steps_in_place_through_slots(rule):
    """One token at a time through random pool slots and a padding slot (-1), across chunk boundaries."""
    case = rule_case(rule_config(rule))
    gen, seed = fresh_generator()
    assert_all_close(check_decode_slots(case, gen, DEVICE), tolerance(case.rule, "ieee"), seed)


@pytest.mark.parametrize("rule", ["moneta", "memora", "yaad", "mlp-lp-l2"])
@pytest.mark.parametrize("split_d", [0, 8])
def test_decode_paths_agree_with_reference(rule, split_d):
    """Decode of the MLP memory both ways: every row through the fused kernel (SPLIT_D=0), and the split
    kernels over four 8-wide hidden slabs (partial sums reduced across programs), boundary rows fused."""
    case = rule_case(rule_config(rule))
    gen, seed = fresh_generator()
    errors = check_decode_slots(case, gen, DEVICE, launch=dict(SPLIT_D=split_d, SPLIT_WARPS=1))
    assert_all_close(errors, tolerance(case.rule, "ieee"), seed)


@pytest.mark.parametrize("rule", ["moneta", "memora", "yaad", "linear"])
def test_varlen_prefill_with_initial_states(rule):
    case = rule_case(rule_config(rule))
    gen, seed = fresh_generator()
    assert_all_close(check_varlen_prefill(case, gen, DEVICE), tolerance(case.rule, dot_precision(torch.device(DEVICE))),
                     seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_up_cast(dtype):
    """q, k, v stored in bf16/fp16 are loaded and up-cast: the result is the fp32 scan of the stored values."""
    case = rule_case(rule_config("moneta", n_heads=PROMPT_HEADS))
    gen, seed = fresh_generator()
    assert_all_close(check_padded_prefill(case, gen, DEVICE, dtype),
                     tolerance(case.rule, dot_precision(torch.device(DEVICE))), seed)


def test_dispatch_is_functional_and_selectable(monkeypatch):
    """models.backend.memory_scan keeps the reference's contract on both backends (inputs untouched)."""
    cfg = rule_config("yaad")
    case = rule_case(cfg)
    gen, seed = fresh_generator()
    x = random_inputs(case, 2, 6, gen, DEVICE)
    pos = torch.tensor([2, 0], device=DEVICE)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2], device=DEVICE)
    args = (pos, x["q"], x["k"], x["v"], x["eta"], x["log_alpha"], x["delta"], valid, x["ln_weight"], x["ln_bias"])
    originals = [w.clone() for w in (*x["anchor"], *x["memory"])]
    ref = ref_scan(case, x["anchor"], x["memory"], *args)
    for name in ("torch", "triton"):
        monkeypatch.setenv("MIRAS_KERNELS", name)
        assert backend.backend_for(DEVICE) == name
        out, anchor, memory = backend.memory_scan(cfg, x["anchor"], x["memory"], *args)
        for w, w0 in zip((*x["anchor"], *x["memory"]), originals, strict=True):
            assert torch.equal(w, w0), f"{name}: an input was modified"
        names = ("reads", "anchor in", "anchor out", "mem in", "mem out")
        errors = {name: rel_err(r, g) for name, r, g in zip(names, (ref[0], *ref[1], *ref[2]), (out, *anchor, *memory),
                                                             strict=True)}
        assert_all_close(errors, tolerance(case.rule, "ieee"), seed)
    monkeypatch.setenv("MIRAS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MIRAS_KERNELS"):
        backend.backend_for(DEVICE)
    monkeypatch.delenv("MIRAS_KERNELS")
    assert backend.backend_for("cpu") == "torch"


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_pool_api_on_both_backends(name, monkeypatch):
    """models.backend.memory_scan_pool updates the pool in place through slots and skips a padding slot."""
    monkeypatch.setenv("MIRAS_KERNELS", name)
    cfg = rule_config("memora")
    case = rule_case(cfg)
    gen, seed = fresh_generator()
    x = random_inputs(case, 2, 5, gen, DEVICE)
    pool = to_device(random_memory(case.rule, 4, gen), DEVICE) + to_device(random_memory(case.rule, 4, gen), DEVICE)
    before = [w.clone() for w in pool]
    slots = torch.tensor([2, -1], device=DEVICE)
    pos = torch.tensor([3, 0], device=DEVICE)
    lengths = torch.tensor([4, 5], device=DEVICE)
    out = backend.memory_scan_pool(cfg, pool[:2], pool[2:], slots, pos, x["q"], x["k"], x["v"], x["eta"],
                                   x["log_alpha"], None, lengths, x["ln_weight"], x["ln_bias"])
    ref = ref_scan(case, tuple(w[2:3] for w in before[:2]), tuple(w[2:3] for w in before[2:]), pos[:1],
                   x["q"][:1], x["k"][:1], x["v"][:1], x["eta"][:1], x["log_alpha"][:1], None,
                   (torch.arange(5, device=DEVICE) < 4).view(1, -1), x["ln_weight"], x["ln_bias"])
    errors = {"reads": rel_err(ref[0], out[:1])}
    errors.update({f"slot 2 state {i}": rel_err(r, w[2:3])
                   for i, (r, w) in enumerate(zip((*ref[1], *ref[2]), pool, strict=True))})
    assert_all_close(errors, tolerance(case.rule, "ieee"), seed)
    for w, w0 in zip(pool, before, strict=True):
        for s in (0, 1, 3):
            assert torch.equal(w[s], w0[s]), "a slot outside the batch changed"
