"""The Triton kernels on the factored decode state (anchor + the chunk's factor rows, kernels/factored.py and
the scan's FACTORED prefill) against the fp64 reference (models.memory.memory_scan run from the running
memory the state stands for), on fresh random inputs every run, kernel outputs poisoned with NaN and the
unfilled factor rows poisoned with NaN. Without a GPU the kernels run under the Triton interpreter."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import random

import pytest

pytest.importorskip("triton")

from benchmarks.kernel_cases import PROMPT_HEADS, rule_case, rule_config  # noqa: E402
from miras_serve.kernels.precision import dot_precision  # noqa: E402
from miras_serve.kernels.scan import Factors, scan_pool  # noqa: E402
from miras_serve.kernels.testing import (  # noqa: E402
    check_factored_decode,
    check_factored_prefill,
    check_factored_varlen,
    random_inputs,
    tolerance,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MLP_RULES = ["moneta", "moneta-no-knee", "yaad", "memora", "mlp-lp-l2", "mlp-huber-lq"]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = random.SystemRandom().randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


def assert_all_close(errors: dict[str, float], tol: float, seed: int) -> None:
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, f"relative RMS errors above {tol:.1g}: {bad} (seed {seed})"


@pytest.mark.parametrize(("rule", "split_d"), [(rule, 0) for rule in MLP_RULES] +
                         [(rule, 8) for rule in ("moneta", "yaad", "memora")])
def test_decode_on_factored_pool(rule, split_d):
    """Token by token through random slots and a padding slot, from mid-chunk, completed-chunk (fold first)
    and fresh states, across chunk boundaries: every row through the fused kernel (SPLIT_D=0), or the
    split kernels over four 8-wide hidden slabs with the boundary rows fused. The anchor is not written
    inside a chunk; slots outside the batch stay bit-identical."""
    case = rule_case(rule_config(rule))
    gen, seed = fresh_generator()
    errors = check_factored_decode(case, gen, DEVICE, launch=dict(SPLIT_D=split_d, SPLIT_WARPS=1))
    assert_all_close(errors, tolerance(case.rule, "ieee"), seed)


@pytest.mark.parametrize("rule", MLP_RULES)
def test_prefill_leaves_decode_ready_factored_state(rule):
    """Prompts continuing mid-chunk or a completed chunk, fresh, ending mid-chunk or exactly at a chunk
    end, right padding and an empty row; then decode steps from the state the prefill wrote."""
    case = rule_case(rule_config(rule, n_heads=PROMPT_HEADS))
    gen, seed = fresh_generator()
    errors = check_factored_prefill(case, gen, DEVICE)
    assert_all_close(errors, tolerance(case.rule, dot_precision(torch.device(DEVICE))), seed)


@pytest.mark.parametrize("rule", ["moneta", "yaad", "memora"])
def test_varlen_prefill_on_factored_pool(rule):
    case = rule_case(rule_config(rule))
    gen, seed = fresh_generator()
    errors = check_factored_varlen(case, gen, DEVICE)
    assert_all_close(errors, tolerance(case.rule, dot_precision(torch.device(DEVICE))), seed)


def test_linear_memory_refuses_the_factored_layout():
    case = rule_case(rule_config("linear"))
    x = random_inputs(case, 1, 1, torch.Generator().manual_seed(0), DEVICE)
    factors = Factors(torch.zeros(1, 2, 4, 32), torch.zeros(1, 2, 4), torch.ones(1, 2))
    with pytest.raises(ValueError, match="linear memory"):
        scan_pool(case.rule, x["anchor"], factors, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                  x["q"], x["k"], x["v"], x["eta"], x["log_alpha"], None, None, None)
