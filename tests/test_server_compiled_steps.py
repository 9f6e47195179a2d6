"""Compiled decode steps on a CPU (server/decode_graphs.py): the pool step under torch.compile equals the
eager step, logits and state, for every preset, at several batch sizes, across chunk starts and factor row
counts (one graph, specialised then symbolic), and leaves slots outside the batch untouched. Inductor's code
generation is slow to compile, so it runs for one preset; the others trace the same whole-step graph with
"aot_eager" (fullgraph: no host sync inside)."""

from __future__ import annotations

import os
import random
import threading

import pytest
import torch
from conftest import small_model

from miras_serve.models.memory import KnownStep
from miras_serve.server import EngineConfig, LLMEngine
from miras_serve.server.cli import parse_args
from miras_serve.server.decode_graphs import (
    ENGINE_COMPILE_MAX_BATCH,
    DecodeGraphs,
    guards_on_arguments,
    use_project_compile_cache,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

CHUNK = 4


@torch.inference_mode()
def check_compiled_equals_eager(preset: str, backend: str, batches: list[list[int]], steps: int,
                                warm_up: bool = False, **overrides) -> DecodeGraphs:
    model = small_model(preset, seed=1, chunk_size=CHUNK, n_layers=2 if preset.endswith("-h") else 1, **overrides)
    pool = model.init_state(5)  # slots 0-3 for sequences, 4 the scratch slot
    # staggered positions (3, 4, 6, 7), so rows of one batch start chunks at different steps
    model(torch.randint(3, 200, (4, 7)), pool, lengths=torch.tensor([3, 4, 6, 7]), slots=torch.arange(4))
    eager = pool.clone()
    graphs = DecodeGraphs(model, pool, scratch_slot=4, max_batch=max(map(len, batches)), use_graphs=False,
                          compile_backend=backend)
    untouched = set(range(4)) - {s for b in batches for s in b}
    before = pool.clone()
    if warm_up:
        graphs.warm_up()
    warmed = len(graphs.compiles)
    for _ in range(steps):
        for batch in batches:
            slots = torch.tensor(batch)
            ids = torch.randint(3, 200, (len(batch), 1))
            expected, _ = model(ids, eager, slots=slots)
            torch.testing.assert_close(graphs.run(ids, slots), expected, rtol=1e-5, atol=1e-5)
    assert graphs.compiled is not None, "fell back to eager"
    if warm_up:
        assert len(graphs.compiles) == warmed, "a step compiled after the warm-up"
    assert {known.first is None for _, known, _ in graphs.compiles} == {False, True}  # chunk starts crossed
    for name, mine, theirs, old in zip(["pos"] + [k for layer in pool.layers for k in layer], pool.tensors(),
                                       eager.tensors(), before.tensors(), strict=True):
        torch.testing.assert_close(mine[:4], theirs[:4], rtol=1e-5, atol=1e-5, msg=name)
        for s in untouched:
            assert torch.equal(mine[s], old[s]), f"slot {s} of {name} changed"
    return graphs


@pytest.mark.parametrize("preset", ["moneta", "yaad", "memora", "linear", "moneta-h", "transformer"])
def test_traced_step_equals_eager(preset):
    """Batch sizes 2 and 1 (slot 1 starts a chunk at the first step, slot 2 at the third), slot 3 never in a batch."""
    check_compiled_equals_eager(preset, "aot_eager", [[2, 0], [1]], steps=3)


def test_traced_step_with_memory_rope_equals_eager():
    """RoPE on the memory's q/k (models/SPEC.md §2) takes each row's position from the pool inside the graph."""
    check_compiled_equals_eager("moneta-h", "aot_eager", [[2, 0], [1]], steps=3, memory_rope=True)


def test_inductor_step_equals_eager_after_the_warm_up():
    """The generated C++ code itself: warmed up (server/decode_graphs.py: every graph, each a compile of tens of
    seconds), then batch 2 and 1 over 2 to 3 factor rows and chunk starts compile nothing more (inductor adds
    no guard that the traced graphs lack) and equal eager."""
    check_compiled_equals_eager("moneta", "inductor", [[2, 0], [1]], steps=3, warm_up=True)


def test_known_step_from_the_pool_positions():
    model = small_model("moneta", chunk_size=CHUNK, n_layers=1)
    pool = model.init_state(4)
    pool.pos.copy_(torch.tensor([4, 5, 7, 0]))
    graphs = DecodeGraphs(model, pool, scratch_slot=3, max_batch=2, use_graphs=False)
    assert graphs.known_step(torch.tensor([1, 2])) == KnownStep(None, 3)
    first, filled = graphs.known_step(torch.tensor([1, 0, 3]))  # positions 5, 4, 0
    assert first.tolist() == [1, 2] and filled == 1


@torch.inference_mode()
def test_known_step_from_the_host_equals_the_device_formula_over_a_long_decode():
    """DecodeGraphs.known_step reads the pool's positions as Python ints: over a long decode with sequences
    joining (fresh prompts of every length, forks) and leaving, it says what the pool's positions say."""
    model = small_model("linear", chunk_size=CHUNK, n_layers=1)
    pool = model.init_state(6)
    graphs = DecodeGraphs(model, pool, scratch_slot=5, max_batch=5, use_graphs=False)
    rng = random.Random(0)
    running, starts = [], 0
    for _ in range(300):
        if not running or rng.random() < 0.2 and len(running) < 5:
            joining = rng.choice([s for s in range(5) if s not in running])
            if running and rng.random() < 0.5:  # a fork: the position of a running sequence
                pool.assign([joining], pool.select([rng.choice(running)]))
            else:  # a fresh prompt of 1 to 9 tokens
                pool.assign([joining], model.init_state(1))
                model(torch.randint(3, 200, (1, rng.randint(1, 9))), pool, slots=torch.tensor([joining]))
            running.append(joining)
        elif rng.random() < 0.15 and len(running) > 1:
            running.remove(rng.choice(running))
        slots = torch.tensor(running)
        row = pool.pos.index_select(0, slots) % CHUNK  # on the device: what the step must be told
        first, filled = graphs.known_step(slots)
        assert filled == int(row.max())
        assert (first is None) == bool((row != 0).all())
        if first is not None:
            assert first.dtype == torch.long and first.tolist() == (row == 0).nonzero().squeeze(1).tolist()
            starts += 1
        graphs.run(torch.randint(3, 200, (len(running), 1)), slots)
    assert starts > 50


def test_engine_compiles_only_when_asked(tokenizer):
    """The CLI compiles the CPU decode step unless --enforce-eager; an engine built without it stays eager."""
    assert EngineConfig.from_args(parse_args([])).compiled_steps is True
    assert EngineConfig.from_args(parse_args(["--enforce-eager"])).compiled_steps is False
    for compiled in (False, True):
        engine = LLMEngine(small_model("moneta", n_layers=1), tokenizer,
                           EngineConfig(max_num_seqs=3, compiled_steps=compiled, compile_backend="aot_eager",
                                        state_cache_bytes=0))
        assert (engine.decode_graphs is not None and engine.decode_graphs.compiled is not None) == compiled
        assert engine.pool.batch_size == 3 + compiled  # the scratch slot of the padded batches
    # warmed up at start-up, and counted in the metrics (tests/test_server_warm_up.py)
    compiles = engine.decode_graphs.compiles
    assert compiles and engine.metrics.decode_graph_compiles._value.get() == len(compiles)
    assert engine.metrics.decode_compile_seconds._value.get() == pytest.approx(sum(s for _, _, s in compiles))
    assert engine.metrics.decode_compile_failures._value.get() == 0
    # the policy by measurement (docs/benchmarks/compiled-cpu.md)
    assert engine.decode_graphs.compile_max_batch == ENGINE_COMPILE_MAX_BATCH


def test_the_warm_up_compiles_for_the_threads_that_run_the_steps(tokenizer):
    """The server builds the engine on its main thread (one torch thread) and steps it on the engine thread
    (every core): the warm-up compiles for ``step_threads``, so that steps on that count, in another thread,
    compile nothing (dynamo's guards hold the thread count), and the builder's own count stays as it was."""
    builder_threads = torch.get_num_threads()  # conftest: 1
    torch._dynamo.reset()  # no graph of an earlier test (dynamo caches per code object, every instance's)
    engine = LLMEngine(small_model("moneta", n_layers=1), tokenizer,
                       EngineConfig(max_num_seqs=2, compiled_steps=True, compile_backend="aot_eager",
                                    state_cache_bytes=0, step_threads=builder_threads + 1))
    assert torch.get_num_threads() == builder_threads
    warmed = len(engine.decode_graphs.compiles)
    errors = []

    @torch.inference_mode()
    def steps() -> None:
        try:
            torch.set_num_threads(builder_threads + 1)
            for ids, slots in (([[5]], [0]), ([[5], [6]], [0, 1]), ([[7]], [1])):
                engine.decode_graphs.run(torch.tensor(ids), torch.tensor(slots))
        except Exception as error:
            errors.append(error)

    engine_thread = threading.Thread(target=steps)
    engine_thread.start()
    engine_thread.join()
    assert not errors and len(engine.decode_graphs.compiles) == warmed
    # the measurement can fail: on the builder's count the same step compiles again
    with torch.inference_mode():
        engine.decode_graphs.run(torch.tensor([[5]]), torch.tensor([0]))
    assert len(engine.decode_graphs.compiles) > warmed


def test_a_failed_compile_decodes_eagerly_and_is_counted(tokenizer):
    """A compiler that fails (as inductor's C++ build once did for moneta-tiny's shapes) must not stop the
    server, and must not pass unseen: the engine decodes eagerly, logs a warning and counts the failure."""
    @torch._dynamo.register_backend(name="failing_for_the_test")
    def failing(graph, example_inputs):
        raise RuntimeError("the compiler could not build this graph")

    engine = LLMEngine(small_model("moneta", n_layers=1), tokenizer,
                       EngineConfig(max_num_seqs=2, compiled_steps=True, compile_backend="failing_for_the_test",
                                    state_cache_bytes=0))
    assert engine.decode_graphs.compiled is None and engine.decode_graphs.compiles == []
    assert engine.metrics.decode_compile_failures._value.get() == 1
    ids, slots = torch.tensor([[5], [6]]), torch.tensor([0, 1])
    eager = engine.pool.clone()
    with torch.inference_mode():
        torch.testing.assert_close(engine.decode_graphs.run(ids, slots), engine.model(ids, eager, slots=slots)[0])


@torch.inference_mode()
def test_the_guard_filter_keeps_the_arguments_and_the_global_state(monkeypatch):
    """guards_on_arguments, on the guards dynamo offers for a real step: it drops those on the instance's objects
    and on module globals, and keeps those on the step's arguments and the global state (grad mode, the thread
    count: a step on another thread count must compile again, not run a graph built for the other)."""
    from miras_serve.server import decode_graphs

    offered = []

    def recording(entries: list) -> list[bool]:
        offered.extend(entries)
        return guards_on_arguments(entries)

    monkeypatch.setattr(decode_graphs, "guards_on_arguments", recording)
    model = small_model("moneta", seed=0, chunk_size=CHUNK)
    graphs = DecodeGraphs(model, model.init_state(2), scratch_slot=1, max_batch=1, use_graphs=False,
                          compile_backend="aot_eager")
    graphs.run(torch.tensor([[5]]), torch.tensor([0]))
    kept = dict(zip(map(id, offered), guards_on_arguments(offered), strict=True))
    by_kind = {kind: [kept[id(e)] for e in offered if test(e)] for kind, test in {
        "instance": lambda e: e.name == "self" or e.name.startswith(("self.", "self[")),
        "globals": lambda e: e.is_global,
        "arguments": lambda e: e.name in ("ids", "slots", "first", "filled"),
        "global state": lambda e: e.guard_type == "GLOBAL_STATE"}.items()}
    assert by_kind["instance"] and not any(by_kind["instance"])
    assert by_kind["globals"] and not any(by_kind["globals"])
    assert by_kind["arguments"] and all(by_kind["arguments"])
    assert by_kind["global state"] and all(by_kind["global state"])


@torch.inference_mode()
def test_two_instances_never_share_compiled_graphs():
    """The compiled steps check no guards on their instance's objects (server/decode_graphs.py,
    guards_on_arguments): two instances over models of different depths, stepped in turn, each give their own
    model's logits. A graph traced for one looked up for the other would run its one layer on the other's (with
    every guard dropped, the code object of its own is what keeps them apart: checked by mutation)."""
    runs = []
    for layers in (1, 2):
        model = small_model("moneta", seed=layers, chunk_size=CHUNK, n_layers=layers)
        pool = model.init_state(2)
        model(torch.randint(3, 200, (1, 2)), pool, slots=torch.tensor([0]))
        runs.append((model, pool.clone(), DecodeGraphs(model, pool, scratch_slot=1, max_batch=1, use_graphs=False,
                                                       compile_backend="inductor")))
    slots = torch.tensor([0])
    for _ in range(2):
        ids = torch.randint(3, 200, (1, 1))
        for model, eager, graphs in runs:
            torch.testing.assert_close(graphs.run(ids, slots), model(ids, eager, slots=slots)[0], rtol=1e-5,
                                       atol=1e-5)
    assert all(graphs.compiled is not None for *_, graphs in runs)


def test_batches_above_compile_max_batch_run_eagerly():
    model = small_model("moneta", chunk_size=CHUNK, n_layers=1)
    pool = model.init_state(3)
    graphs = DecodeGraphs(model, pool, scratch_slot=2, max_batch=2, use_graphs=False, compile_backend="aot_eager",
                          compile_max_batch=1)
    eager = pool.clone()
    for _ in range(2):
        ids, slots = torch.tensor([[5], [6]]), torch.tensor([0, 1])
        torch.testing.assert_close(graphs.run(ids, slots), model(ids, eager, slots=slots)[0])
    assert graphs.compiles == [] and graphs.compiled is not None


def test_compiled_steps_cache_under_the_project_dir(tmp_path, monkeypatch):
    """Importing torch._dynamo writes torch's default (a temporary dir) into TORCHINDUCTOR_CACHE_DIR before the
    engine starts: that value must not keep compiled steps out of the project's cache dir; a value the user
    chose is kept."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("MIRAS_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(default_cache_dir()))
    use_project_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    use_project_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
