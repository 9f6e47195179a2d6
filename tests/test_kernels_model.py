"""Model-level invariants with the Triton backend for every preset: one parallel pass equals prefill +
decode steps and equals the PyTorch backend; the slot-pool forward updates the pool in place. Without
a GPU the kernels run under the Triton interpreter."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import random
import sys

import pytest

pytest.importorskip("triton")

from conftest import small_model  # noqa: E402

from benchmarks.kernel_cases import check_model_invariant  # noqa: E402
from miras_serve import models  # noqa: E402
from miras_serve.kernels.testing import rel_err  # noqa: E402
from miras_serve.models.backend import forced_backend  # noqa: E402
from miras_serve.models.layers import state_layout  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5 if DEVICE == "cpu" else 5e-3  # relative RMS; TF32 dots on the GPU
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")


@pytest.mark.parametrize("preset", sorted(models.PRESETS))
def test_parallel_equals_prefill_then_decode(preset):
    check_invariant(preset)


def test_memory_rope_parallel_equals_prefill_then_decode():
    """q/k reach the kernels rotated (models/SPEC.md §2): the same invariant, and triton == torch."""
    check_invariant("moneta-h", memory_rope=True)


def check_invariant(preset: str, **overrides) -> None:
    seed = random.SystemRandom().randrange(2**31)
    model = small_model(preset, seed=seed % 1000, **overrides).to(DEVICE)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=gen).to(DEVICE)
    tol = TOL * (5 if model.config.retention == "kl" else 1)
    errors = check_model_invariant(model, ids, prompt=5)
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, f"{preset}: relative errors above {tol:.1g}: {bad} (seed {seed})"


@torch.inference_mode()
def test_both_state_layouts_on_triton():
    """The triton backend also runs the running layout of an MLP memory (kept to compare the two): a prompt
    and decode steps from either layout give the same logits."""
    seed = random.SystemRandom().randrange(2**31)
    model = small_model("yaad", seed=seed % 1000).to(DEVICE)
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    logits = {}
    with forced_backend("triton"):
        for layout in ("running", "factored"):
            state = model.init_state(2, layout=layout)
            steps = [model(ids[:, :3], state)]
            for t in range(3, ids.shape[1]):
                steps.append(model(ids[:, t:t + 1], steps[-1][1]))
            assert steps[-1][1].layout == layout
            logits[layout] = torch.cat([step[0] for step in steps], dim=1)
    assert rel_err(logits["running"], logits["factored"]) < TOL, f"seed {seed}"


@pytest.mark.parametrize("preset", ["moneta", "memora-h"])
@torch.inference_mode()
def test_slot_pool_forward_in_place(preset):
    """Prompts of different lengths prefilled into pool slots, then decoded through the pool: logits
    match the pool-free path and the slots not in the batch stay bit-identical."""
    seed = random.SystemRandom().randrange(2**31)
    model = small_model(preset, seed=seed % 1000).to(DEVICE)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=gen).to(DEVICE)
    lengths = torch.tensor([7, 4], device=DEVICE)
    pool = model.init_state(5, layout=state_layout(model.config, "triton"))
    for layer in pool.layers:  # make every slot distinct, so a stray write shows
        for t in layer.values():
            t.add_(torch.rand(t.shape, generator=gen).to(DEVICE))
    slots = torch.tensor([3, 1], device=DEVICE)
    model.reset_slots(pool, slots)
    before = pool.clone()
    with forced_backend("triton"):
        ref_logits, ref_state = model(ids[:, :7], lengths=lengths)
        logits, returned = model(ids[:, :7], pool, lengths=lengths, slots=slots)
        assert returned is pool
        for b, n in enumerate(lengths.tolist()):
            assert rel_err(ref_logits[b, :n], logits[b, :n]) < TOL, f"prefill row {b} (seed {seed})"
        # Decode both sequences from their own positions (7 and 4), with their batch rows swapped.
        logits, _ = model(ids[:, 7:8].flip(0), pool, slots=slots.flip(0))
        ref_rows = [model(ids[b:b + 1, 7:8], ref_state.select([b]))[0] for b in (1, 0)]
    assert rel_err(torch.cat(ref_rows), logits) < TOL, f"decode through the pool (seed {seed})"
    assert pool.pos.tolist() == [0, 5, 0, 8, 0]
    for layer, layer_before in zip(pool.layers, before.layers, strict=True):
        for name, t in layer.items():
            for s in (0, 2, 4):
                assert torch.equal(t[s], layer_before[name][s]), f"untouched slot {s} of {name} changed"


HOST_SYNCS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero")


@pytest.fixture
def no_host_syncs(monkeypatch):
    """Tensor methods that copy a value to the host (a device sync on CUDA, which breaks CUDA-graph
    capture) raise when called from anywhere but the Triton interpreter, which runs the kernel here."""
    for name in HOST_SYNCS:
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}triton{os.sep}" not in caller:
                raise AssertionError(f"host sync: Tensor.{_name} called from {caller}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)


@pytest.mark.parametrize("preset", ["moneta", "memora", "linear", "yaad-h"])
@torch.inference_mode()
def test_pool_decode_step_has_no_host_syncs(preset, no_host_syncs):
    """The whole-model decode step through the pool is CUDA-graph capturable on the Triton backend
    (no host syncs); the PyTorch reference path is not (it groups rows on the host), which shows the
    guard works."""
    model = small_model(preset, seed=0).to(DEVICE)
    pool = model.init_state(4, layout=state_layout(model.config, "triton"))
    ids = torch.tensor([[5], [9]], device=DEVICE)
    slots = torch.tensor([2, 0], device=DEVICE)
    with forced_backend("triton"):
        for _ in range(5):  # crosses a chunk boundary (chunk 4)
            model(ids, pool, slots=slots)
    with forced_backend("torch"), pytest.raises(AssertionError, match="host sync"):
        model(ids, pool, slots=slots)


@pytest.mark.parametrize("preset", ["moneta", "memora"])
@torch.inference_mode()
def test_pool_prefill_has_no_host_syncs(preset, no_host_syncs):
    """A prompt through the pool on the Triton backend: the slab-parallel prefill's launches (chunk segments
    x phases, counted from the shapes) read nothing on the host, so a prefill can be captured in a CUDA graph."""
    model = small_model(preset, seed=0).to(DEVICE)
    pool = model.init_state(4, layout=state_layout(model.config, "triton"))
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with forced_backend("triton"):
        model(ids, pool, slots=torch.tensor([2, 0], device=DEVICE))
