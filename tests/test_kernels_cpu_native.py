"""The native CPU kernels: the factored memory's decode step (kernels/cpu/factored_decode.cpp through
models.backend.factored_scan_pool) against the fp64 per-token reference (kernels/naive.py) and the PyTorch
factored path (``MIRAS_CPU_NATIVE=0``), on fresh random inputs every run: every rule the factored layout
serves, rows at every chunk phase (the token that starts a chunk, a fresh state), slots out of order, a
skipped slot, an empty row, slots outside the batch bit-identical; whole models decoding after a prompt equal
their parallel pass; a compiled decode step calling the op equals the eager one. A prompt's segment of the MLP
memory and its factors (kernels/cpu/mlp_segment.cpp through models.backend.prompt_kernels) against the
reference's memory_segment and mlp_factors in fp64, and Moneta's boundary map (kernels/cpu/lq_normalise.cpp)
against lq_normalise. The one-row product against F.linear."""

from __future__ import annotations

import os
import random
import shutil

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels.testing imports triton: this must precede it

import pytest
from conftest import small_model

from benchmarks.kernel_cases import rule_case, rule_config
from miras_serve.kernels.scan import Factors
from miras_serve.kernels.testing import (
    GATE_NAMES,
    factored_memory,
    fp64,
    random_factors,
    random_inputs,
    random_memory,
    ref_scan,
    rel_err,
    tolerance,
)
from miras_serve.models import backend
from miras_serve.models import memory as spec
from miras_serve.models.backend import environment, factored_scan_pool
from miras_serve.models.memory import FactoredMemory
from miras_serve.server.decode_graphs import DecodeGraphs

pytestmark = [
    pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                       reason="no C++ compiler: the native CPU kernel cannot be built"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
]

MLP_RULES = ["moneta", "moneta-no-knee", "yaad", "memora", "mlp-lp-l2", "mlp-huber-lq"]
CHUNK = 4


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert backend._native_built(), "a C++ compiler is here, so the native kernel must build"


def native(on: bool):
    return environment("MIRAS_CPU_NATIVE", "1" if on else "0")


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = random.SystemRandom().randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


@pytest.mark.parametrize("head_dim", [8, 20])
@pytest.mark.parametrize("rule", MLP_RULES)
@torch.inference_mode()
def test_native_decode_equals_reference_and_torch_path(rule, head_dim):
    """Six batch rows on a pool of 9 slots, for b + 2 steps: rows start mid-chunk, at a completed chunk (it
    folds first), fresh (position 0) and in every other phase, so every row crosses a chunk start; batch row
    1 is skipped (slot -1), row 4 is empty (length 0) and its slot, like the slots outside the batch, stays
    bit-identical. Head dim 20 (memory hidden 80) takes the kernel's register blocks and their odd tails: 80 =
    a block of 64 columns + 16, and 20 = two vectors of 8 + 4 single values."""
    cfg = rule_config(rule, head_dim=head_dim)
    case = rule_case(cfg)
    gen, seed = fresh_generator()
    b, pool_size, steps = cfg.chunk_size, 9, cfg.chunk_size + 2
    pool_pos = torch.randint(0, 3 * b, (pool_size,), generator=gen)
    slots = torch.randperm(pool_size, generator=gen)[:6]
    slots[1] = -1
    start = torch.tensor([b - 1, 0, b, 0, 2, 2 * b + 1])
    live = torch.tensor([True, False, True, True, False, True])
    lengths = live.long()
    pool_pos[slots[slots >= 0]] = start[slots >= 0]
    anchor = random_memory(case.rule, pool_size, gen)
    rows, coef, decay = random_factors(case, pool_pos, gen)
    pool = FactoredMemory(anchor, rows.nan_to_num(0.0), coef, decay)  # a real pool holds 0 in unfilled rows
    reference = pool._replace(anchor=tuple(w.clone() for w in anchor), rows=pool.rows.clone(),
                              row_coef=coef.clone(), row_decay=decay.clone())
    before = [t.clone() for t in (*pool.anchor, *pool[1:])]
    at = slots[live]
    ref_state = (tuple(w[at] for w in anchor), factored_memory(case.rule, tuple(w[at] for w in anchor),
                                                               Factors(*(t[at] for t in pool[1:])), start[live]))
    x = random_inputs(case, 6, steps, gen)
    ln_weight, ln_bias = x["ln_weight"], x["ln_bias"]
    errors, tol = {}, tolerance(case.rule, "ieee")
    for step in range(steps):
        token = [None if x[n] is None else x[n][:, :, step:step + 1] for n in GATE_NAMES]
        ones = torch.ones(int(live.sum()), 1, dtype=torch.bool)
        ref_out, *ref_state = ref_scan(case, *ref_state, start[live] + step,
                                       *(None if t is None else t[live] for t in token), ones, ln_weight, ln_bias)
        outputs = []
        for on, state in ((True, pool), (False, reference)):
            surprise = torch.full((6, cfg.n_heads, 1), float("nan"))
            with native(on):
                out = factored_scan_pool(cfg, state, slots, start + step, *token, lengths, ln_weight, ln_bias, surprise)
            outputs.append((out, surprise))
        (out, surprise), (torch_out, torch_surprise) = outputs
        errors[f"reads step {step}"] = rel_err(ref_out, out[live])
        errors[f"reads vs torch step {step}"] = rel_err(torch_out[live], out[live])
        errors[f"surprise vs torch step {step}"] = rel_err(torch_surprise[live], surprise[live])
        if out[~live].abs().sum() != 0 or surprise[~live].abs().sum() != 0:
            errors[f"skipped rows read 0, step {step}"] = float("inf")
    end = start[live] + steps
    mine = type(pool)(tuple(w[at] for w in pool.anchor), *(t[at] for t in pool[1:]))
    errors["anchor"] = max(rel_err(r, w) for r, w in zip(ref_state[0], mine.anchor, strict=True))
    errors["memory"] = max(rel_err(r, w) for r, w in zip(
        ref_state[1], factored_memory(case.rule, mine.anchor, Factors(*mine[1:]), end), strict=True))
    for name, got, want in zip(("anchor in", "anchor out", "rows", "coef", "decay"), (*pool.anchor, *pool[1:]),
                               (*reference.anchor, *reference[1:]), strict=True):
        errors[f"{name} vs torch"] = rel_err(want[at], got[at])
    untouched = torch.tensor([s for s in range(pool_size) if s not in at.tolist()])
    for new, old in zip((*pool.anchor, *pool[1:]), before, strict=True):
        if not torch.equal(new[untouched], old[untouched]):
            errors["slots outside the batch bit-identical"] = float("inf")
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, f"relative RMS errors above {tol:.1g}: {bad} (seed {seed})"


@pytest.mark.parametrize("head_dim", [8, 20])
@pytest.mark.parametrize("rule", MLP_RULES)
@torch.inference_mode()
def test_native_segment_equals_reference(rule, head_dim):
    """A prompt's segment through the native kernel against the reference's memory_segment in fp64: the reads,
    the memory after it, each token's surprise and the factors at the anchor (the segment's and mlp_factors'),
    for one token, an odd count and a whole chunk, three sequences of fresh random inputs with the anchor and the
    running memory apart (a segment that starts mid-chunk). Head dim 20: hidden widths that are no multiple of
    the vector width."""
    cfg = rule_config(rule, head_dim=head_dim, chunk_size=8)
    case = rule_case(cfg)
    gen, seed = fresh_generator()
    kernels = backend.prompt_kernels(cfg, torch.zeros(1))
    assert kernels is not spec.REFERENCE, "fp32 CPU inputs without autograd take the native kernels"
    errors = {}
    for n in (1, 5, cfg.chunk_size):
        x = random_inputs(case, 3, n, gen)
        args = [x[name] for name in ("anchor", "memory", *GATE_NAMES, "ln_weight", "ln_bias")]
        surprise = torch.full((3, cfg.n_heads, n), float("nan"))
        out, memory, factors = kernels.segment(cfg, *args, surprise)
        ref_surprise = torch.empty(3, cfg.n_heads, n, dtype=torch.float64)
        ref_out, ref_memory, ref_factors = spec.memory_segment(cfg, *fp64(tuple(args)), ref_surprise)
        errors[f"reads, {n} tokens"] = rel_err(ref_out, out)
        errors[f"surprise, {n} tokens"] = rel_err(ref_surprise, surprise)
        for name, want, got in zip(("W_in", "W_out"), ref_memory, memory, strict=True):
            errors[f"{name}, {n} tokens"] = rel_err(want, got)
        factor_args = (*x["anchor"], x["k"], x["v"], x["ln_weight"], x["ln_bias"], x["delta"])
        alone = kernels.factors(cfg, *factor_args)
        for name, want, got, got_alone in zip(("a", "gz", "gu"), ref_factors, factors, alone, strict=True):
            errors[f"segment's factor {name}, {n} tokens"] = rel_err(want, got)
            errors[f"factor {name} alone, {n} tokens"] = rel_err(want, got_alone)
    tol = tolerance(case.rule, "ieee")
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, f"relative RMS errors above {tol:.1g}: {bad} (seed {seed})"


@pytest.mark.parametrize("q", [4.0, 3.0, 2.5])
@torch.inference_mode()
def test_native_lq_map_equals_reference(q):
    """Moneta's boundary map through the native kernel against the reference's lq_normalise in fp64, per matrix:
    matrices inside the ball (returned bit for bit), on its edge and far outside it, odd sizes (no multiple of the
    vector width), a strided view; q = 3 and 2.5 take the abs (and the general power) the even q skips."""
    gen, seed = fresh_generator()
    cfg = rule_config("moneta", q=q)
    kernels = backend.prompt_kernels(cfg, torch.zeros(1))

    def nu(w: torch.Tensor, std: float) -> torch.Tensor:  # per matrix, in units of the radius
        return w.double().abs().pow(q).mean((-2, -1)).pow(1 / q) / std / cfg.lq_radius

    for shape, std in (((2, 3, 40, 9), 1.0), ((1, 4, 9, 37), 0.25)):
        w = torch.randn(shape, generator=gen) * std * torch.rand(*shape[:2], 1, 1, generator=gen) * 3 * cfg.lq_radius
        w[0, 0] = 0.0  # a memory decayed to nothing
        w[-1, -1] /= nu(w[-1, -1], std)  # on the edge
        for x in (w, w.transpose(-1, -2)):
            got, want = kernels.lq_map(cfg, x, std), spec.lq_normalise(cfg, x.double(), std)
            assert got.shape == x.shape
            assert rel_err(want, got) < 1e-6, f"q {q}, shape {tuple(x.shape)} (seed {seed})"
            inside = nu(x, std) < 1 - 1e-5
            assert torch.equal(got[inside], x[inside]), f"a matrix inside the ball changed (seed {seed})"
            assert not inside.all() and inside.any(), "the case must have matrices on both sides"


def test_prompt_kernels_take_the_reference_where_the_native_ones_do_not_apply():
    """The native prompt kernels serve fp32 CPU tensors of the MLP memory with exact products and nothing to
    differentiate, when the native kernels are on; anything else runs the reference."""
    moneta, x = rule_config("moneta"), torch.zeros(1)
    assert backend.prompt_kernels(moneta, x) is backend.NATIVE_PROMPT_KERNELS
    assert backend.prompt_kernels(moneta, x.double()) is spec.REFERENCE
    assert backend.prompt_kernels(moneta, x, torch.zeros(1, requires_grad=True)) is spec.REFERENCE
    assert backend.prompt_kernels(rule_config("linear"), x) is spec.REFERENCE
    with spec.emulate_dots("tf32"):
        assert backend.prompt_kernels(moneta, x) is spec.REFERENCE
    with native(False):
        assert backend.prompt_kernels(moneta, x) is spec.REFERENCE


@pytest.mark.parametrize("preset", ["moneta", "yaad", "memora", "yaad-h"])
@torch.inference_mode()
def test_model_decode_after_prompt_equals_parallel_pass(preset):
    """Through the pool (the engine's path), rows in shuffled slots: a prompt, then token by token across
    two chunk starts, gives the parallel pass's logits; the same with the PyTorch path."""
    model = small_model(preset, seed=3, chunk_size=CHUNK, n_layers=2 if preset.endswith("-h") else 1)
    ids = torch.randint(3, 200, (3, 13))
    prompt = torch.tensor([5, 1, 4])
    full, _ = model(ids)
    for on in (True, False):
        pool, slots = model.init_state(6), torch.tensor([4, 0, 2])
        with native(on):
            logits, _ = model(ids, pool, lengths=prompt, slots=slots)
            steps = [logits[i, prompt[i] - 1] for i in range(3)]
            got = [[s] for s in steps]
            for t in range(int(prompt.min()), ids.shape[1]):
                rows = (prompt <= t).nonzero().squeeze(1)
                step_logits, _ = model(ids[rows, t:t + 1], pool, slots=slots[rows])
                for j, i in enumerate(rows.tolist()):
                    got[i].append(step_logits[j, 0])
        for i in range(3):
            want = full[i, prompt[i] - 1:]
            torch.testing.assert_close(torch.stack(got[i][:want.shape[0]]), want, rtol=1e-4, atol=1e-4,
                                       msg=f"{preset} row {i}, native {on}")


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@torch.inference_mode()
def test_compiled_step_with_the_native_op_equals_eager(compile_backend):
    """The compiled decode step (one graph, fullgraph) calls the native op; batch 2, across a chunk start."""
    model = small_model("moneta", seed=1, chunk_size=CHUNK, n_layers=1)
    pool = model.init_state(4)
    model(torch.randint(3, 200, (2, 6)), pool, lengths=torch.tensor([3, 6]), slots=torch.tensor([2, 0]))
    eager = pool.clone()
    graphs = DecodeGraphs(model, pool, scratch_slot=3, max_batch=2, use_graphs=False, compile_backend=compile_backend)
    slots = torch.tensor([0, 2])
    for _ in range(3):
        ids = torch.randint(3, 200, (2, 1))
        expected, _ = model(ids, eager, slots=slots)
        torch.testing.assert_close(graphs.run(ids, slots), expected, rtol=1e-5, atol=1e-5)
    assert graphs.compiled is not None, "fell back to eager"
    for mine, theirs in zip(pool.tensors(), eager.tensors(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_compiled_step_graph_calls_the_native_op():
    """The traced decode step holds the native op (an extern kernel), not the PyTorch path's gathers."""
    model = small_model("moneta", seed=1, chunk_size=CHUNK, n_layers=1)
    pool = model.init_state(3)
    graphs_seen = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs_seen.append(gm)
        return gm.forward

    with torch.inference_mode():
        model(torch.randint(3, 200, (2, 2)), pool, slots=torch.tensor([0, 1]))
        graphs = DecodeGraphs(model, pool, scratch_slot=2, max_batch=2, use_graphs=False, compile_backend=record)
        graphs.run(torch.tensor([[5], [6]]), torch.tensor([0, 1]))
    assert len(graphs_seen) == 1
    targets = {str(node.target) for node in graphs_seen[0].graph.nodes if node.op == "call_function"}
    assert any("miras_serve.factored_decode" in t for t in targets), targets


def test_a_failed_build_warns_and_keeps_the_torch_path(tmp_path, monkeypatch):
    from miras_serve.kernels import cpu_native

    monkeypatch.setattr(cpu_native, "_loaded", {})
    monkeypatch.setattr(cpu_native, "SOURCES", (*cpu_native.SOURCES, tmp_path / "missing.cpp"))
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert cpu_native.load(tmp_path / "build") is False
    assert cpu_native.load(tmp_path / "build") is False  # tried once per process


def test_a_stale_build_lock_is_removed(tmp_path):
    """A lock left by a process killed mid-build would make torch's loader wait forever."""
    from miras_serve.kernels import cpu_native

    lock = tmp_path / "lock"
    lock.touch()
    cpu_native._drop_stale_lock(lock)
    assert lock.exists()  # a build in progress keeps its lock
    old = lock.stat().st_mtime - cpu_native.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    cpu_native._drop_stale_lock(lock)
    assert not lock.exists()


def test_the_build_is_keyed_on_the_cpu(monkeypatch):
    """``-march=native`` code must not be loaded on another CPU from a shared cache dir."""
    from miras_serve.kernels import cpu_native

    here = cpu_native.build_key()
    assert here == cpu_native.build_key() and torch.__version__ in here
    monkeypatch.setattr(cpu_native, "_cpu_identity", lambda: "model name : another\nflags : sse2")
    assert cpu_native.build_key() != here


def test_the_build_is_keyed_on_the_source(tmp_path, monkeypatch):
    """A build of another revision of the C++ (another op schema) must not be loaded from the cache dir."""
    from miras_serve.kernels import cpu_native

    here = cpu_native.build_key()
    for index, source in enumerate(cpu_native.SOURCES):
        edited = tmp_path / source.name
        edited.write_bytes(source.read_bytes() + b"\n// another revision\n")
        sources = list(cpu_native.SOURCES)
        sources[index] = edited
        monkeypatch.setattr(cpu_native, "SOURCES", tuple(sources))
        assert cpu_native.build_key() != here, source.name
        monkeypatch.undo()


@pytest.mark.parametrize("threads", [1, 2])
@torch.inference_mode()
def test_row_linear_equals_linear(threads):
    """``x W^T + b`` of the native one-row products equals F.linear in fp64 on fresh random shapes (odd widths,
    products smaller than one block of the thread split and larger, one row and several, with and without a
    bias), to fp32 rounding of a K-term dot product of unit-variance terms (each output ~ sqrt(K))."""
    from miras_serve.kernels.cpu_native import row_linear

    gen, seed = fresh_generator()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(6):
            k, n = (int(torch.randint(1, hi, (), generator=gen)) for hi in (700, 3000))
            rows = int(torch.randint(1, 4, (), generator=gen))
            x, w = torch.randn(rows, 1, k, generator=gen), torch.randn(n, k, generator=gen)
            bias = torch.randn(n, generator=gen) if n % 2 else None
            exact = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
            torch.testing.assert_close(row_linear(x, w, bias).double(), exact, rtol=1e-5, atol=4e-6 * k ** 0.5,
                                       msg=lambda m, k=k, n=n: f"seed {seed}, K {k} N {n}: {m}")
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(RuntimeError, match="x is \\[M, 3\\] but the weight is \\[2, 4\\]"):
        row_linear(torch.randn(1, 3), torch.randn(2, 4), None)
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        row_linear(torch.randn(1, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64), None)


THREADS_CHILD = """
import json, os, torch
torch.set_num_threads(1)
from miras_serve.kernels.cpu_native import row_linear
from miras_serve.models.backend import _native_built
assert _native_built()
x, w = torch.randn(1, 512), torch.randn(4096, 512)  # 8 MB of weight: 256 blocks of the thread split
row_linear(x, w, None)  # one thread: inline
before = len(os.listdir("/proc/self/task"))
torch.set_num_threads(2)
row_linear(x, w, None)
print(json.dumps({"spawned": len(os.listdir("/proc/self/task")) - before,
                  "openmp": sorted({line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line})}))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_the_native_kernels_run_on_torchs_openmp_threads():
    """The library's ``at::parallel_for`` must really split the work: ATen's OpenMP loop sits in its header, and
    built without ``-fopenmp`` it compiled to a serial loop (both kernels ran on one thread whatever torch's
    count). And on torch's own OpenMP runtime, not a second one beside it. In a fresh interpreter, since an
    OpenMP team once started stays."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", THREADS_CHILD], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["spawned"] == 1, seen  # the second thread of the team that ran the product
    assert len(seen["openmp"]) == 1 and seen["openmp"][0].startswith(os.path.dirname(torch.__file__)), seen
