"""The slab-parallel prefill (kernels.prefill) against the fp64 PyTorch reference, and the fused prefill it
replaced, still selectable. The default launch configuration already runs the slab path in the scan,
factored and surprise tests (two 16-wide slabs at their tiny shape); here: more slabs, a hidden width
that is not a multiple of the slab, the fused path (``SPLIT_D=0``, ``MIRAS_PREFILL=fused``) and the path
choice itself. Triton interpreter on the CPU: head dim 8, chunk 4, fresh random inputs, NaN-poisoned
outputs."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import random

import pytest

pytest.importorskip("triton")

from benchmarks.kernel_cases import rule_case, rule_config  # noqa: E402
from miras_serve.kernels.precision import dot_precision  # noqa: E402
from miras_serve.kernels.prefill import chunk_phases, prefill_kernels  # noqa: E402
from miras_serve.kernels.scan import launch_config, prefill_path, split_launch  # noqa: E402
from miras_serve.kernels.testing import (  # noqa: E402
    RuleCase,
    check_factored_prefill,
    check_factored_varlen,
    check_padded_prefill,
    check_varlen_prefill,
    tolerance,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRECISION = dot_precision(torch.device(DEVICE))
# Three 8-wide slabs of a hidden width of 24 (expansion 3), one head: the interpreter runs every program of
# every phase one after another, so the multi-slab cases keep the program count down.
THREE_SLABS = dict(SPLIT_D=8, SPLIT_WARPS=1)
FUSED = dict(SPLIT_D=0)


def slab_case(rule: str) -> RuleCase:
    case = rule_case(rule_config(rule, memory_expansion=3, n_heads=1))
    assert case.rule.memory_hidden == 24
    return case
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")


def assert_close(check, case: RuleCase, launch: dict, **kwargs) -> None:
    seed = random.SystemRandom().randrange(2**31)
    errors = check(case, torch.Generator().manual_seed(seed), DEVICE, launch=launch, **kwargs)
    tol = tolerance(case.rule, PRECISION)
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, f"relative RMS errors above {tol:.1g}: {bad} (seed {seed})"


@pytest.mark.parametrize("rule", ["moneta", "memora", "mlp-huber-lq"])
def test_three_slabs_padded_batch(rule):
    """Rows at different phases (prompts starting mid-chunk), an odd length, partial chunks, right padding
    and an empty row left untouched; the chunk's sums run over three slab programs."""
    assert_close(check_padded_prefill, slab_case(rule), THREE_SLABS)


def test_hidden_width_not_a_multiple_of_the_slab():
    """Hidden width 24 in 16-wide slabs: the second slab is half masked."""
    assert_close(check_padded_prefill, slab_case("yaad"), dict(SPLIT_D=16, SPLIT_WARPS=1))


def test_three_slabs_factored_prefill_then_decode():
    """On the factored state: the fold into scratch, prompts continuing mid-chunk, from a completed chunk,
    fresh, ending exactly at a chunk end, an empty row; then decode steps from the state it wrote."""
    assert_close(check_factored_prefill, slab_case("memora"), THREE_SLABS)


@pytest.mark.parametrize("check", [check_varlen_prefill, check_factored_varlen])
def test_three_slabs_varlen_with_initial_states(check):
    """cu_seqlens packing, each sequence continuing its own pool slot from its own phase."""
    assert_close(check, slab_case("moneta"), THREE_SLABS)


@pytest.mark.parametrize("rule", ["moneta", "yaad", "memora", "mlp-lp-l2"])
def test_fused_prefill_still_matches_reference(rule):
    """The fused scan kernel (one program per sequence and head), kept for the side-by-side comparison."""
    assert_close(check_padded_prefill, rule_case(rule_config(rule)), FUSED)


def test_fused_prefill_on_the_factored_state():
    assert_close(check_factored_prefill, rule_case(rule_config("moneta")), FUSED)


def test_prefill_path_choice(monkeypatch):
    """MIRAS_PREFILL picks the MLP memories' prefill path; the linear memory and decode never take the slab
    prefill; any other value is an error."""
    mlp, linear = rule_config("moneta").memory_rule(), rule_config("linear").memory_rule()
    monkeypatch.delenv("MIRAS_PREFILL", raising=False)
    assert prefill_path() == "slabs"
    assert launch_config(mlp, False, False, "ieee")["SPLIT_D"] > 0
    assert "SPLIT_D" not in launch_config(linear, False, False, "ieee")
    config, split_d, _ = split_launch(launch_config(mlp, False, True, "ieee"))
    assert split_d > 0 and not config["BOUNDARY_ROWS_ONLY"]  # a prefill has no decode rows to hand over
    monkeypatch.setenv("MIRAS_PREFILL", "fused")
    assert "SPLIT_D" not in launch_config(mlp, False, False, "ieee")
    monkeypatch.setenv("MIRAS_PREFILL", "parallel")
    with pytest.raises(ValueError, match="MIRAS_PREFILL"):
        launch_config(mlp, False, False, "ieee")


def test_phases_per_rule():
    """The launches per chunk: the boundary statistics only where the boundary map needs a sum over the
    hidden width (lq norm: one phase; Memora's lag step: two); the fold once, on the factored state."""
    assert chunk_phases(0) == ["forward", "grad", "update", "output"]
    assert chunk_phases(1) == ["lag", "forward", "grad", "update", "output"]
    assert chunk_phases(2) == ["lag", "softmax", "forward", "grad", "update", "output"]
    config, split_d, warps = split_launch(launch_config(rule_config("memora").memory_rule(), False, False, "ieee"))
    assert list(prefill_kernels(config, split_d, warps, factored=True)) == [
        "fold", "lag", "softmax", "forward", "grad", "update", "output"]
