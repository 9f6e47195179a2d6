"""The engine's decode step: replayed from CUDA graphs captured once per batch size on a GPU, compiled
with torch.compile on a CPU.

A decode step of a recurrent model is many small kernels per layer (projections, conv, gates, the
memory scan) on fixed-size tensors, so on a GPU its cost at small batches is launch overhead: on an
H200 the 24-layer 340M-shape step took 34 ms eager and 3.8 ms replayed at batch 1. Graphs fix every
address, so the step reads its inputs from persistent buffers and a batch is padded up to the next
captured size. Padding rows point at a scratch row of the state pool that no request owns: they
compute garbage there (several padding rows share it and race), and nothing reads it.

On a CPU the step is compiled instead (torch.compile, inductor's C++ code generation): an eager decode
step of moneta-tiny is ~1,000 operator dispatches, which cost more than the bytes it reads. The compiled
step makes no host synchronisation: what depends on the batch's positions (which rows start a chunk, how
many factor rows to read: :class:`models.memory.KnownStep`) is read here from the pool's positions, which
live on the host (read as Python ints: one op), and passed in. Dynamo specialises on the first value of each
size and, when it changes, recompiles once with it symbolic; sizes 0 and 1 stay specialised (the count of
factor rows is symbolic from the start). So five graphs serve every step: batch 1 with and without a row
starting a chunk, batch > 1 with none, one or several. :meth:`DecodeGraphs.warm_up` compiles all of them
before the server takes a request (vLLM compiles and captures at start-up too), each logged with its time: a
compile inside the engine loop would stall every stream. Inductor's caches live under the project's cache
dir, so a restart recompiles faster (tracing still runs). A step that fails to compile makes the engine
decode eagerly, with a warning. Compiled batches run unpadded.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import threading
import time
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.utils import counters
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from miras_serve.kernels.cpu_native import row_linear
from miras_serve.kernels.graphs import capture
from miras_serve.models import MirasLM
from miras_serve.models.backend import native_kernels_enabled
from miras_serve.models.corpus import cache_dir
from miras_serve.models.memory import KnownStep
from miras_serve.models.model import ModelState

logger = logging.getLogger("miras.engine")

# The engine's policy, by measurement (docs/benchmarks/compiled-cpu.md, moneta-tiny on a shared 2-core CPU):
# with the memory's decode step in the native kernel (kernels/cpu_native.py: no gathered anchors or factor
# rows), the compiled step ran 1.60x faster than the eager one at batch 1 and 1.19x at batch 32 (with the
# PyTorch memory path batch 32 had lost, 0.68x), so batches up to 32 are compiled (one graph family serves
# every size above 1). The steps run on every thread the engine thread has: the native kernels (the memory
# update, the one-row products), the BLAS and inductor's loops split their work (the batch-1 step 1.6x faster on 2
# threads than on 1, batch 32 1.36x: docs/serving.md).
ENGINE_COMPILE_MAX_BATCH = 32
# dynamo's defaults (recompile_limit, accumulated_recompile_limit), which each DecodeGraphs raises
DYNAMO_RECOMPILE_LIMITS = (torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit)


class OneRowLinear(nn.Module):
    """``linear`` as the compiled CPU decode step runs it. One row of x (batch 1): the native kernel's dot
    products along the weight's rows, split over the threads (kernels.cpu_native.row_linear), or, where it is
    not built, ``x @ W^T`` from a contiguous copy of ``W^T``. Both stream the weight in one pass; as F.linear,
    or as inductor's frozen, oneDNN-prepacked products, the BLAS ran moneta-tiny's 29 products on one thread,
    1.6x slower than the transposed copy (docs/benchmarks/compiled-cpu.md). More rows take the linear itself:
    at batch 32 the prepacked products won (the compiled step 0.80x with the copy). ``weight`` stays the
    linear's own."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.native = native_kernels_enabled(linear.weight.device.type) and linear.weight.dtype == torch.float32
        if not self.native:
            self.register_buffer("weight_t", linear.weight.detach().t().contiguous(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if math.prod(x.shape[:-1]) != 1:  # batch sizes 0 and 1 are specialised: decided when tracing
            return F.linear(x, self.weight, self.bias)
        if self.native:
            return row_linear(x, self.weight, self.bias)
        out = x @ self.weight_t
        return out if self.bias is None else out + self.bias


def with_one_row_linears(model: MirasLM) -> MirasLM:
    """A copy of ``model`` that shares its parameters, every nn.Linear a :class:`OneRowLinear` (the compiled
    CPU decode step's; the eager paths keep the model as it is)."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    clone = copy.deepcopy(model, shared)
    for module in list(clone.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, OneRowLinear(child))
    return clone


def capture_sizes(max_batch: int) -> list[int]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return [*sizes, max_batch]


def warm_up_steps(max_batch: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """(batch size, rows that start a chunk, factor rows filled) of decode steps that, run in this order,
    make dynamo build every graph the compiled step needs for batches up to ``max_batch``: batch 1 and the
    rest, with no chunk start, one (a size-1 tensor stays specialised) or several, the batch size, the count
    of chunk starts and of factor rows each seen at two values or more, so that those graphs are symbolic in
    them, and every row starting a chunk (in case dynamo gives equal sizes one symbol).
    ``tests/test_server_warm_up.py`` checks that a decode workload compiles nothing after these."""
    partly = sorted({1, 2, chunk_size - 1} & set(range(1, chunk_size)))  # rows filled when a row goes on
    steps = [(1, 1, 0)] + [(1, 0, n) for n in partly]
    for batch in sorted({2, 3, max_batch} & set(range(2, max_batch + 1))):
        for starts in sorted({0, 1, 2, batch - 1, batch} & set(range(batch + 1))):
            steps += [(batch, batch, 0)] if starts == batch else [(batch, starts, n) for n in partly]
    return steps


def use_project_compile_cache() -> None:
    """Inductor's caches (FX graphs, generated C++) under the project's cache dir unless the environment
    names one: compiled steps survive a restart. Importing torch._dynamo already wrote torch's default (a
    temporary dir) into the environment, so that value counts as unset; inductor reads the variable at each
    use, so setting it now still applies."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


def own_code(method: Callable) -> Callable:
    """``method`` bound to its instance again, with a code object of its own: dynamo keeps its compiled graphs
    and their guards per code object, so the graphs of one instance are never looked up for another (and go
    away with it), whatever guards :func:`guards_on_arguments` leaves."""
    func = method.__func__
    copied = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                                func.__closure__)
    return types.MethodType(copied, method.__self__)


def guards_on_arguments(entries: list) -> list[bool]:
    """Dynamo's guards worth checking on every call of a compiled step (its ``guard_filter_fn``): those on the
    step's arguments (their shapes, dtypes, the symbolic row count) and the global state (grad mode, the thread
    count), not the ~1,000 on the instance's own objects (the model's modules and parameters, the pool's tensors)
    nor the ~100 on module globals (the modules, functions and constants the model's code reads). Those stay the
    same objects while serving (the pool is updated in place), and the step's code is the instance's own
    (:func:`own_code`), so a graph traced for one model is never looked up for another's step. The instance's
    guards took ~0.16 ms of a ~1.7 ms batch-1 step and the globals' ~40 us of the ~80 us left (profiled,
    moneta-tiny, 2 threads)."""
    return [not (entry.is_global or entry.name == "self" or entry.name.startswith(("self.", "self[")))
            for entry in entries]


class DecodeGraphs:
    """Decode steps (one token for each of up to ``max_batch`` sequences) through ``pool`` for every
    size of :func:`capture_sizes`: replayed from CUDA graphs (``use_graphs``), compiled with torch.compile's
    ``compile_backend`` (on a CPU: "inductor"; tests also use "aot_eager", which traces the same graph
    without generating code) for sizes up to ``compile_max_batch``, or eager, which is how the padding is
    tested without a GPU.
    ``on_compile(batch size, step, seconds)`` hears of each graph compiled, ``on_compile_failure()`` of a compile
    that failed (the steps are eager from then on)."""

    def __init__(self, model: MirasLM, pool: ModelState, scratch_slot: int, max_batch: int, use_graphs: bool,
                 compile_backend: str | None = None, compile_max_batch: int | None = None,
                 on_compile: Callable[[int, KnownStep, float], None] | None = None,
                 on_compile_failure: Callable[[], None] | None = None):
        if not 0 <= scratch_slot < pool.batch_size:
            raise ValueError(f"scratch slot {scratch_slot} is outside the pool of {pool.batch_size}")
        if use_graphs and compile_backend is not None:
            raise ValueError("decode steps are either replayed from CUDA graphs or compiled, not both")
        device = pool.pos.device
        self.model, self.pool = model, pool
        self.sizes = capture_sizes(max_batch)
        self.scratch_slot = scratch_slot
        self.ids = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.slots = torch.full((max_batch,), scratch_slot, dtype=torch.long, device=device)
        self.logits: dict[int, Tensor] = {}
        self.steps: dict[int, Callable[[], object]] = {}
        memory_pool = torch.cuda.graph_pool_handle() if use_graphs else None
        for size in sorted(self.sizes, reverse=True):  # the largest first: the others reuse its memory
            def step(size: int = size) -> None:
                self.logits[size] = model(self.ids[:size], pool, slots=self.slots[:size])[0]

            self.steps[size] = capture(step, device, memory_pool) if use_graphs else step
        self.compiled: Callable[[Tensor, Tensor, Tensor | None, int], Tensor] | None = None
        self.compile_max_batch = max_batch if compile_max_batch is None else compile_max_batch
        self.compiles: list[tuple[int, KnownStep, float]] = []  # (batch size, step, seconds) of each compile
        self.on_compile, self.on_compile_failure = on_compile, on_compile_failure
        if compile_backend is not None:
            use_project_compile_cache()
            DecodeGraphs.compiling_instances += 1
            self._configured_threads: set[int] = set()
            # freezing: the weights become constants of the compiled code, the dense products oneDNN's
            # prepacked ones (the weights never change while serving); cpp_wrapper: the code that calls the
            # kernels is C++ too, not Python. Each measured faster (docs/benchmarks/compiled-cpu.md).
            options = {"freezing": True, "cpp_wrapper": True} if compile_backend == "inductor" else {}
            self.compile_model = with_one_row_linears(model)
            self.compiled = torch.compile(own_code(self._pool_step), backend=compile_backend, dynamic=None,
                                          options={**options, "guard_filter_fn": guards_on_arguments},
                                          fullgraph=True)  # a graph break is a host sync: fall back instead

    compiling_instances = 0  # DecodeGraphs that compile, in this process

    def _configure_dynamo(self) -> None:
        """Dynamo's settings for these graphs, in the calling thread: torch's config modules hold a value per
        thread (one set in a thread is not seen by another, which reads the default), and the graphs compile in
        the warm-up's thread, or in whichever thread runs a step that needs a new one."""
        if threading.get_ident() in self._configured_threads:
            return
        # a few graphs per instance (batch 1 and the rest, chunk start or not, specialised then symbolic), all
        # on the code of _pool_step: let dynamo keep those of every instance
        extra = 8 * DecodeGraphs.compiling_instances
        torch._dynamo.config.recompile_limit = DYNAMO_RECOMPILE_LIMITS[0] + extra
        torch._dynamo.config.accumulated_recompile_limit = DYNAMO_RECOMPILE_LIMITS[1] + extra
        # the count of factor rows is symbolic from its first compile: else dynamo compiles a graph for its
        # first value, then another when it changes (one compile more at start-up)
        sources = torch.compiler.config.dynamic_sources
        if "L['filled']" not in sources.split(","):
            torch.compiler.config.dynamic_sources = ",".join(filter(None, [sources, "L['filled']"]))
        self._configured_threads.add(threading.get_ident())

    def _pool_step(self, ids: Tensor, slots: Tensor, first: Tensor | None, filled: int) -> Tensor:
        return self.compile_model(ids, self.pool, slots=slots, known=KnownStep(first, filled))[0]

    def run(self, ids: Tensor, slots: Tensor) -> Tensor:
        """Logits [B, 1, vocab] for ``ids`` [B, 1], row b continuing pool slot ``slots[b]``. The result
        is a view of a graph's output buffer: it is overwritten by the next step."""
        batch = ids.shape[0]
        if self.compiled is not None and batch <= self.compile_max_batch:
            return self._run_compiled(ids, slots)
        size = next(s for s in self.sizes if s >= batch)
        self.ids[:batch].copy_(ids)
        self.slots[:batch].copy_(slots)
        self.slots[batch:size].fill_(self.scratch_slot)
        self.steps[size]()
        return self.logits[size][:batch]

    def known_step(self, slots: Tensor) -> KnownStep:
        """The shape of the next step of the sequences in ``slots`` (a CPU pool's), from the pool's positions
        read as Python ints (one op: 11-21 µs a step in docs/benchmarks/engine-host-cpu-compiled.md, where seven
        tensor ops and a ``nonzero`` took 41-99); the index tensor of the rows that start a chunk is built only on
        a step that has one."""
        positions, chunk = self.pool.pos.tolist(), self.model.config.chunk_size
        rows = [positions[slot] % chunk for slot in slots.tolist()]
        first = [b for b, row in enumerate(rows) if row == 0]
        return KnownStep(torch.tensor(first, device=slots.device) if first else None, max(rows))

    def warm_up(self, threads: int | None = None) -> float:
        """Compile every graph of :func:`warm_up_steps` now, on the scratch slot (no request's state is touched;
        the scratch row is restored): no later decode step compiles. Returns the seconds it took.

        It compiles in a thread of its own, which ends with it, on ``threads`` torch threads (None: the caller's
        count). The steps must run on as many: dynamo's guards hold the thread count (on another count every
        graph compiles again, in the engine loop). And a thread that runs parallel code keeps an OpenMP team as
        long as it lives, which the server's main thread, where the engine is built, must not
        (server/async_engine.py); a finished thread's team goes with it."""
        if self.compiled is None:
            return 0.0
        threads = threads or torch.get_num_threads()
        start, graphs = time.monotonic(), len(self.compiles)
        failure: list[BaseException] = []

        @torch.inference_mode()  # as the engine's steps run: whether an input is an inference tensor is a guard
        def compile_all() -> None:
            torch.set_num_threads(threads)
            scratch = [self.scratch_slot]
            saved = self.pool.select(scratch)
            device = self.pool.pos.device
            try:
                for batch, starts, filled in warm_up_steps(min(len(self.ids), self.compile_max_batch),
                                                           self.model.config.chunk_size):
                    first = torch.arange(starts, device=device) if starts else None
                    slots = torch.full((batch,), self.scratch_slot, dtype=torch.long, device=device)
                    if self._run_known(torch.zeros(batch, 1, dtype=torch.long, device=device), slots,
                                       KnownStep(first, filled)) is None:
                        break  # fell back to eager
                self.pool.assign(scratch, saved)
            except BaseException as error:  # raised in the caller's thread below
                failure.append(error)

        worker = threading.Thread(target=compile_all, name="miras-compile")
        worker.start()
        worker.join()
        if failure:
            raise failure[0]
        seconds = time.monotonic() - start
        logger.info("compiled decode steps warmed up: %d graphs in %.1f s (for %d torch threads)",
                    len(self.compiles) - graphs, seconds, threads)
        return seconds

    def _run_compiled(self, ids: Tensor, slots: Tensor) -> Tensor:
        logits = self._run_known(ids, slots, self.known_step(slots))
        return self.run(ids, slots) if logits is None else logits

    def _run_known(self, ids: Tensor, slots: Tensor, known: KnownStep) -> Tensor | None:
        """The compiled step's logits, each compile it makes recorded and logged; None if it failed to compile
        (the engine decodes eagerly from then on)."""
        self._configure_dynamo()
        graphs, start = counters["stats"]["unique_graphs"], time.monotonic()
        try:
            logits = self.compiled(ids, slots, *known)
        except Exception:  # a model the compiler cannot handle: serve eagerly rather than not at all
            logger.warning("compiling the decode step failed; decoding eagerly", exc_info=True)
            self.compiled = None
            if self.on_compile_failure is not None:
                self.on_compile_failure()
            return None
        if counters["stats"]["unique_graphs"] != graphs:  # this step compiled a graph
            self.compiles.append((ids.shape[0], known, time.monotonic() - start))
            starts = 0 if known.first is None else known.first.numel()
            logger.info("decode step compiled for batch %d (%d factor rows, %d chunk starts) in %.1f s",
                        ids.shape[0], known.filled, starts, self.compiles[-1][2])
            if self.on_compile is not None:
                self.on_compile(*self.compiles[-1])
        return logits
