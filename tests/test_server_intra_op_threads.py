"""The engine thread is the server's only user of torch's intra-op (OpenMP) threads: the main thread, which
loads the model and then runs the event loop, keeps one, so that it never starts an OpenMP team of its own
(each team's workers live as long as their thread, and more of them than cores made GNU OpenMP stop
spin-waiting: a prefill in the engine thread ran 1.3-1.9x slower). Run in a fresh interpreter: OpenMP teams
that this test process made earlier cannot be undone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import asyncio, json, os, sys, time, torch

    def os_threads() -> int:
        return len(os.listdir("/proc/self/task"))

    def settled_threads() -> int:
        # an ended thread, and its team's worker, leave /proc a moment after the join: the count once it holds
        # still for 0.3 s (at most 10 s)
        count, since, deadline = os_threads(), time.monotonic(), time.monotonic() + 10
        while time.monotonic() - since < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
            if os_threads() != count:
                count, since = os_threads(), time.monotonic()
        return count

    reserve = sys.argv[2] == "reserve"
    if reserve:
        from miras_serve.server.async_engine import reserve_intra_op_threads
        engine_threads = reserve_intra_op_threads()
    else:
        engine_threads = None
    before = os_threads()
    torch.randn(1 << 22).exp_()  # a parallel op (4M elements) on the main thread, as loading a model runs
    spawned = os_threads() - before

    from miras_serve import models
    from miras_serve.server import EngineConfig, LLMEngine, SamplingParams
    from miras_serve.server.async_engine import AsyncEngine

    model, tokenizer = models.load_pretrained(sys.argv[1])
    # compiled decode steps: warmed up in a thread of their own, on the engine thread's count (aot_eager: the
    # same graphs, run by ATen's ops, without generating code)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, step_threads=engine_threads,
                                                      compiled_steps=True, compile_backend="aot_eager"))
    before_warm_up = settled_threads()  # (the engine's own warm-up's threads gone)
    engine.decode_graphs.warm_up(2)  # again on 2 threads (nothing left to compile), from this (1-thread) thread
    warm_up_left = settled_threads() - before_warm_up
    seen = []
    step = engine.step
    engine.step = lambda: seen.append(torch.get_num_threads()) or step()
    async_engine = AsyncEngine(engine)

    async def generate() -> None:
        async_engine.start()
        async for _ in async_engine.submit([([5, 6, 7], None)], SamplingParams(max_tokens=2)):
            pass
        await asyncio.to_thread(async_engine.stop)

    asyncio.run(generate())
    print(json.dumps({"engine_threads": engine_threads, "main_spawned": spawned, "main_threads":
                      torch.get_num_threads(), "engine_step_threads": sorted(set(seen)), "warm_up_left": warm_up_left,
                      "warm_up_compiles": len(engine.decode_graphs.compiles)}))
""")


def run_child(checkpoint, mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint), mode], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_the_main_thread_starts_no_openmp_team_and_the_engine_thread_runs_every_core(tiny_checkpoint):
    reserved = run_child(tiny_checkpoint, "reserve")
    assert reserved.pop("warm_up_compiles") >= 2, reserved  # the warm-up compiled (batch 1 and 2)
    # the warm-up ran on 2 threads in a thread of its own: it left no thread behind (any OpenMP team went with its
    # thread) and this thread's count as it was (run inline here, it would have set it to 2)
    assert reserved == {"engine_threads": 2, "main_spawned": 0, "main_threads": 1, "engine_step_threads": [2],
                        "warm_up_left": 0}
    # the measurement can fail: without the reservation the same op starts a team (one more OS thread)
    unreserved = run_child(tiny_checkpoint, "default")
    assert unreserved["main_spawned"] >= 1 and unreserved["main_threads"] == 2
