"""The compiled decode step's warm-up (server/decode_graphs.py): every graph is built before the first request,
on the scratch slot, so that no decode step compiles later (a compile inside the engine loop stalls every
stream), and no request's state is touched. Traced with "aot_eager" (the graphs and guards inductor would
compile, without generating code); tests/test_server_compiled_steps.py runs the warm-up under inductor."""

from __future__ import annotations

import os
import random
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import small_model
from test_server_support import metric, metric_values
from torch._dynamo.utils import counters

from deploy.local.launch import serve_command
from miras_serve.loadtest.process import ServerProcess, free_port
from miras_serve.server.decode_graphs import DecodeGraphs, warm_up_steps

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

CHUNK, SLOTS = 4, 5


def test_warm_up_steps_cover_every_kind_of_step():
    """Batch 1 and above, no, one, several and every row starting a chunk, each size seen at two values; the
    first step is batch 1 starting a chunk (its graph stays specialised on all of that anyway)."""
    assert warm_up_steps(1, 4) == [(1, 1, 0), (1, 0, 1), (1, 0, 2), (1, 0, 3)]
    steps = warm_up_steps(32, 64)
    assert steps[0] == (1, 1, 0)
    assert {b for b, _, _ in steps} == {1, 2, 3, 32}
    kinds = {(b > 1, min(s, 2), s == b) for b, s, _ in steps}
    assert kinds == {(False, 0, False), (False, 1, True), (True, 0, False), (True, 1, False), (True, 2, False),
                     (True, 2, True)}
    assert all(f == 0 for b, s, f in steps if s == b) and {f for b, s, f in steps if s < b} == {1, 2, 63}
    assert warm_up_steps(2, 2) == [(1, 1, 0), (1, 0, 1), (2, 0, 1), (2, 1, 1), (2, 2, 0)]


def kind(batch: int, starts: int) -> str:
    return f"batch {'1' if batch == 1 else '>1'}, {'all' if starts == batch else min(starts, 2)} starting"


@torch.inference_mode()
def test_after_the_warm_up_no_decode_step_compiles_and_no_owned_slot_changed():
    model = small_model("moneta", seed=2, chunk_size=CHUNK, n_layers=1)
    pool = model.init_state(SLOTS + 1)  # the last slot is the scratch slot
    # staggered positions 1, 2, 3, 4, 6: sequences start chunks at different steps
    model(torch.randint(3, 200, (SLOTS, 6)), pool, lengths=torch.tensor([1, 2, 3, 4, 6]), slots=torch.arange(SLOTS))
    graphs = DecodeGraphs(model, pool, scratch_slot=SLOTS, max_batch=SLOTS, use_graphs=False,
                          compile_backend="aot_eager")
    before = pool.clone()
    graphs.warm_up()
    assert graphs.compiles and graphs.compiled is not None
    for mine, old in zip(pool.tensors(), before.tensors(), strict=True):  # the scratch row restored too
        assert torch.equal(mine, old)

    eager, built = pool.clone(), counters["stats"]["unique_graphs"]
    rng = random.Random(1)  # a seed whose workload has every kind of step (checked below)
    running, seen, sizes = [0], set(), set()
    for _ in range(80):  # sequences join (some forked) and leave; each crosses several chunk boundaries
        if rng.random() < 0.35 and len(running) < SLOTS:
            joining = rng.choice([s for s in range(SLOTS) if s not in running])
            if rng.random() < 0.5:  # a fork (n > 1): the same position as a running sequence
                source = rng.choice(running)
                for state in (pool, eager):
                    state.assign([joining], state.select([source]))
            running.append(joining)
        elif rng.random() < 0.25 and len(running) > 1:
            running.remove(rng.choice(running))
        slots = torch.tensor(running)
        ids = torch.randint(3, 200, (len(running), 1))
        first = graphs.known_step(slots).first
        seen.add(kind(len(running), 0 if first is None else first.numel()))
        sizes.add(len(running))
        torch.testing.assert_close(graphs.run(ids, slots), model(ids, eager, slots=slots)[0], rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == built, "a decode step compiled after the warm-up"
    assert sizes == set(range(1, SLOTS + 1))
    assert seen == {kind(b, s) for b, s, _ in warm_up_steps(SLOTS, CHUNK)}  # every kind of step came up


def test_the_server_warms_up_before_it_listens(tiny_checkpoint):
    """A real server (the CLI, compiled steps on, traced with aot_eager): the warm-up is logged before uvicorn
    starts, and so is the freeze of the start-up heap (server.cli.freeze_startup_heap); the warm-up's compiles
    are counted in /metrics when /health first answers, and requests at several concurrencies (batch 1, 2 and
    more, crossing chunk boundaries) compile nothing more."""
    port = free_port()
    command = serve_command(tiny_checkpoint, port, "--compile-backend", "aot_eager", "--max-num-seqs", "6",
                            "--log-level", "info")
    server = ServerProcess(command, url=f"http://127.0.0.1:{port}", env={**os.environ, "OMP_NUM_THREADS": "1"},
                           cwd=tiny_checkpoint.parent, timeout=300)
    try:
        log = server.output()
        warmed = re.search(r"compiled decode steps warmed up: (\d+) graphs in", log)
        assert warmed and int(warmed.group(1)) > 0, log[-3000:]
        assert warmed.start() < log.index("Application startup complete")
        frozen = re.search(r"froze (\d+) start-up objects", log)  # the heap the collector skips from now on
        assert frozen and int(frozen.group(1)) > 100_000, log[-3000:]
        assert frozen.start() < log.index("Application startup complete")
        compiles = metric(metric_values(server.url), "miras:decode_graph_compiles_total")
        assert compiles == int(warmed.group(1))
        assert metric(metric_values(server.url), "miras:decode_compile_seconds_total") > 0

        def complete(prompt: str, n: int) -> None:
            body = {"model": "tiny-moneta-h", "prompt": prompt, "max_tokens": 9, "ignore_eos": True, "n": n}
            response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text

        complete("Shall I", 1)
        with ThreadPoolExecutor(3) as pool:  # prompts of different lengths decode together: 1 to 5 sequences
            list(pool.map(complete, ["Shall I compare thee", "From fairest creatures we desire", "Thou art"],
                          [2, 1, 2]))
        assert metric(metric_values(server.url), "miras:decode_graph_compiles_total") == compiles
        assert "decode step compiled" not in server.output()[len(log):]
    finally:
        server.stop()


@torch.inference_mode()
def test_a_step_that_fails_to_compile_in_the_warm_up_decodes_eagerly(caplog):
    def failing(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        raise RuntimeError("no code for this")

    model = small_model("moneta", seed=2, chunk_size=CHUNK, n_layers=1)
    pool = model.init_state(3)
    model(torch.randint(3, 200, (2, 3)), pool, slots=torch.tensor([0, 1]))
    graphs = DecodeGraphs(model, pool, scratch_slot=2, max_batch=2, use_graphs=False, compile_backend=failing)
    before = pool.clone()
    graphs.warm_up()
    assert graphs.compiled is None and "compiling the decode step failed; decoding eagerly" in caplog.text
    for mine, old in zip(pool.tensors(), before.tensors(), strict=True):
        assert torch.equal(mine, old)
    ids, slots = torch.tensor([[5], [6]]), torch.tensor([1, 0])
    torch.testing.assert_close(graphs.run(ids, slots), model(ids, before, slots=slots)[0])
