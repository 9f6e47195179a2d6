"""The engine: a model, a pool of state slots, a scheduler and a sampler. It knows nothing of HTTP.

``step()`` runs one scheduler step: one batched decode (T=1) for every decoding sequence and one padded
batch of prefill chunks, each sequence continuing its own row of the state pool in place. A request with
n > 1 is prefilled once; its state is then forked into its other slots. ``step()`` returns what each
touched request produced in this step (deltas).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from miras_serve.kernels import set_dot_precision
from miras_serve.models import MirasLM, MirasTokenizer
from miras_serve.models.backend import native_kernels_enabled
from miras_serve.models.memory import KnownStep

from .decode_graphs import ENGINE_COMPILE_MAX_BATCH, DecodeGraphs
from .detokenizer import IncrementalDetokenizer
from .engine_args import DEFAULTS, EngineArgs, GiB
from .metrics import EngineMetrics
from .outputs import CompletionOutput, RequestOutput, TokenLogprob
from .pool_sizing import CPU_MAX_NUM_SEQS, MAX_AUTO_SEQS, plan_pool
from .request import Request, RequestStatus, Sequence, StateContext
from .sampler import Sampler, token_logprob
from .sampling_params import ParamError, SamplingParams
from .scheduler import PrefillChunk, Scheduler, SchedulerOutput
from .state_cache import CachedState, StateCache
from .state_tier_redis import RedisStateTier, redis_client
from .state_tiers import DiskStateTier, StackedTiers, StateTier, model_identity
from .structured import GrammarCompiler
from .structured import available as structured_available

logger = logging.getLogger("miras.engine")


@dataclass
class EngineConfig:
    """What the engine runs with, in its own units (bytes, not GB); defaults and meanings are EngineArgs'
    (server/engine_args.py), which ``from_args`` converts."""

    # State slots (sequences decoding at once). None: sized from device memory on a GPU (see
    # server/pool_sizing.py), 64 on a CPU.
    max_num_seqs: int | None = DEFAULTS.max_num_seqs
    max_num_batched_tokens: int = DEFAULTS.max_num_batched_tokens
    max_prompt_tokens: int = DEFAULTS.max_prompt_tokens
    seed: int = DEFAULTS.seed  # for requests without their own seed
    # Replay decode steps from CUDA graphs (None: on CUDA devices). True on a CPU runs the same padded
    # steps eagerly (tests the padding without a GPU); False is vLLM's --enforce-eager.
    cuda_graphs: bool | None = None
    # Compile the decode step with torch.compile on a CPU (server/decode_graphs.py); the CLI turns it on
    # unless --enforce-eager. Off here: an embedded engine (and the tests) stays eager.
    compiled_steps: bool = False
    compile_backend: str = DEFAULTS.compile_backend  # torch.compile's backend for them
    # Bytes of recurrent states kept for prompts that repeat or extend earlier ones (server/state_cache.py);
    # 0 turns the cache off.
    state_cache_bytes: int = int(DEFAULTS.state_cache_gb * GiB)
    # A directory for saved states on local disk (server/state_tiers.py), behind the in-memory cache; None: off.
    state_disk_dir: str | None = DEFAULTS.state_disk_dir
    state_disk_bytes: int = int(DEFAULTS.state_disk_gb * GiB)
    state_disk_ttl: float = DEFAULTS.state_disk_ttl
    # Fraction of the GPU's total memory this process may use (weights, state pool, state cache,
    # activations); sizes or checks the state pool on a GPU (vLLM's --gpu-memory-utilization).
    gpu_memory_utilization: float = DEFAULTS.gpu_memory_utilization
    # A shared store every replica reads and writes (redis://host:port/db, server/state_tier_redis.py),
    # below the local tiers; None: off.
    state_redis_url: str | None = DEFAULTS.state_redis_url
    state_redis_bytes: int = int(DEFAULTS.state_redis_gb * GiB)
    state_redis_ttl: float = DEFAULTS.state_redis_ttl
    # Input precision of the Triton kernels' fp32 tensor-core products (kernels.DOT_PRECISIONS), for the whole
    # process; None: MIRAS_DOT_PRECISION or the kernels' default (docs/precision.md).
    dot_precision: str | None = DEFAULTS.dot_precision
    # Torch threads of the thread that will run the steps (the server's engine thread sets it,
    # server/async_engine.py), which the compiled decode steps are compiled for; None: the constructing thread's.
    step_threads: int | None = None

    @classmethod
    def from_args(cls, args: EngineArgs) -> EngineConfig:
        """The server's engine: --enforce-eager turns off both CUDA graphs and the CPU's compiled steps."""
        return cls(args.max_num_seqs, args.max_num_batched_tokens, args.max_prompt_tokens, args.seed,
                   cuda_graphs=False if args.enforce_eager else None, compiled_steps=not args.enforce_eager,
                   compile_backend=args.compile_backend,
                   state_cache_bytes=int(args.state_cache_gb * GiB), state_disk_dir=args.state_disk_dir,
                   state_disk_bytes=int(args.state_disk_gb * GiB), state_disk_ttl=args.state_disk_ttl,
                   gpu_memory_utilization=args.gpu_memory_utilization, state_redis_url=args.state_redis_url,
                   state_redis_bytes=int(args.state_redis_gb * GiB), state_redis_ttl=args.state_redis_ttl,
                   dot_precision=args.dot_precision)


class LLMEngine:
    """``device_memory`` (free, total bytes) stands in for the GPU's memory: tests size a pool without one."""

    def __init__(self, model: MirasLM, tokenizer: MirasTokenizer, config: EngineConfig | None = None,
                 model_name: str = "miras", metrics: EngineMetrics | None = None,
                 device_memory: tuple[int, int] | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.device = model.device
        self.vocab_size = min(tokenizer.vocab_size, model.config.vocab_size)  # ids the tokenizer can decode
        self.eos_token_id = tokenizer.eos_token_id
        config = config or EngineConfig()
        if config.dot_precision is not None:
            set_dot_precision(config.dot_precision)
        use_graphs = config.cuda_graphs if config.cuda_graphs is not None else self.device.type == "cuda"
        compiled = config.compiled_steps and self.device.type == "cpu" and not use_graphs
        padded = use_graphs or compiled
        self.config = replace(config, max_num_seqs=self._size_pool(config, int(padded), device_memory))
        self.state_cache = self._state_cache()
        self.scheduler = Scheduler(self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                   model.config.chunk_size, self._cached_prefix if self.state_cache else None)
        # With graphs or compiled steps, one more pool row that no request owns takes the padding rows of a batch.
        self.pool = model.init_state(self.config.max_num_seqs + (1 if padded else 0))
        if self.pool.layout == "factored":  # the native CPU decode kernel: built or loaded now, not on a first step
            native_kernels_enabled(self.device.type)
        self.metrics = metrics or EngineMetrics(model_name)
        self.decode_graphs = self._capture_decode_graphs(compiled) if padded else None
        if self.decode_graphs is not None:  # every compile now, before the first request, not in the engine loop
            self.decode_graphs.warm_up(self.config.step_threads)
        self.requests: dict[str, Request] = {}
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self.sampler = Sampler(self.pool.batch_size, self.vocab_size, self.eos_token_id, self.device, self.generator)
        # built once at start-up (about a second), not on the first constrained request
        self.grammars = GrammarCompiler(tokenizer.tokenizer.to_str(), self.vocab_size, self.eos_token_id) \
            if structured_available() else None
        self.metrics.state_slots_capacity.set(self.config.max_num_seqs)
        self.metrics.state_bytes_per_sequence.set(self.pool.nbytes_per_sequence())
        self.miras_layers = model.miras_layers  # the layers a surprise row lists, in order
        self.metrics.set_cache_config(
            model_name, num_gpu_blocks=self.config.max_num_seqs, enable_prefix_caching=self.state_cache is not None,
            gpu_memory_utilization=self.config.gpu_memory_utilization,
            state_bytes_per_sequence=self.pool.nbytes_per_sequence(), state_cache_bytes=self.config.state_cache_bytes,
            state_disk_bytes=self.config.state_disk_bytes if self.config.state_disk_dir is not None else 0)

    def _state_cache(self) -> StateCache | None:
        config = self.config
        tiers: list[StateTier] = []
        on_reject = lambda reason: self.metrics.state_tier_rejected[reason].inc()
        if config.state_disk_dir is not None or config.state_redis_url is not None:
            identity = model_identity(self.model)
        if config.state_disk_dir is not None:
            tiers.append(DiskStateTier(config.state_disk_dir, identity, self.model.init_state(1),
                                       config.state_disk_bytes, config.state_disk_ttl, on_reject=on_reject))
        if config.state_redis_url is not None:
            tiers.append(RedisStateTier(redis_client(config.state_redis_url), identity, self.model.init_state(1),
                                        config.state_redis_bytes, config.state_redis_ttl, on_reject=on_reject))
        if config.state_cache_bytes <= 0 and not tiers:
            return None
        tier = tiers[0] if len(tiers) == 1 else StackedTiers(tiers) if tiers else None
        return StateCache(config.state_cache_bytes, tier)

    def _size_pool(self, config: EngineConfig, extra_slots: int, device_memory: tuple[int, int] | None) -> int:
        """The pool's number of sequences: from the device's free memory on a GPU (checked there when
        given), the CPU default otherwise. Raises PoolSizeError (a ValueError) for a pool that does not fit."""
        if device_memory is None and self.device.type == "cuda":
            device_memory = torch.cuda.mem_get_info(self.device)
        if device_memory is None:
            logger.info("state pool: %d sequences (%s; on a CPU there is no device memory to size it from)",
                        config.max_num_seqs or CPU_MAX_NUM_SEQS, "--max-num-seqs" if config.max_num_seqs else "default")
            return config.max_num_seqs or CPU_MAX_NUM_SEQS
        state_bytes = self.model.init_state(1).nbytes_per_sequence()
        reserved = config.state_cache_bytes + self._prefill_peak_bytes(config.max_num_batched_tokens)
        # a step must fit every decode and a chunk of prefill (the scheduler's rule)
        limit = min(MAX_AUTO_SEQS, config.max_num_batched_tokens - self.model.config.chunk_size)
        plan = plan_pool(state_bytes, self.vocab_size, *device_memory, config.gpu_memory_utilization, reserved,
                         config.max_num_seqs, extra_slots, limit)
        logger.info("%s (%s)", plan.describe(extra_slots),
                    "--max-num-seqs" if config.max_num_seqs else "sized by --gpu-memory-utilization")
        return plan.max_num_seqs

    @torch.inference_mode()
    def _prefill_peak_bytes(self, tokens: int) -> int:
        """Activation memory of a prefill step of ``tokens`` tokens, measured on a CUDA device (0 elsewhere)."""
        if self.device.type != "cuda":
            return 0
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        ids = torch.full((1, tokens), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        self.model(ids, self.model.init_state(1))
        peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def _capture_decode_graphs(self, compiled: bool) -> DecodeGraphs | None:
        try:
            return DecodeGraphs(self.model, self.pool, scratch_slot=self.config.max_num_seqs,
                                max_batch=self.config.max_num_seqs, use_graphs=self.device.type == "cuda",
                                compile_backend=self.config.compile_backend if compiled else None,
                                compile_max_batch=ENGINE_COMPILE_MAX_BATCH,
                                on_compile=self._observe_compile,
                                on_compile_failure=self.metrics.decode_compile_failures.inc)
        except Exception:  # e.g. a model whose step cannot be captured: serve eagerly rather than not at all
            logger.warning("preparing the decode steps failed; decoding eagerly", exc_info=True)
            if compiled:
                self.metrics.decode_compile_failures.inc()
            return None

    def _observe_compile(self, batch: int, known: KnownStep, seconds: float) -> None:
        self.metrics.decode_graph_compiles.inc()
        self.metrics.decode_compile_seconds.inc(seconds)

    # ---- requests -------------------------------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ParamError (naming the field) for a request this engine cannot serve."""
        if not prompt_token_ids:
            raise ParamError("prompt", "prompt must not be empty")
        if len(prompt_token_ids) > self.config.max_prompt_tokens:
            raise ParamError("prompt", f"prompt has {len(prompt_token_ids)} tokens, more than the server's "
                             f"limit of {self.config.max_prompt_tokens} (--max-prompt-tokens)")
        bad = next((t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)), None)
        if bad is not None:
            raise ParamError("prompt", f"token id {bad!r} is out of vocabulary (size {self.vocab_size})")
        if params.n > self.config.max_num_seqs:
            raise ParamError("n", f"n={params.n} is more than the server's --max-num-seqs={self.config.max_num_seqs}")
        params.check_vocab(self.vocab_size)
        if params.guided is not None:
            if self.grammars is None:
                raise ParamError(params.guided.field, f"{params.guided.field} needs structured outputs, and this "
                                 "server lacks the llguidance package (pip install 'miras-serve[structured]')")
            self.grammars.compile(params.guided)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, arrival_time: float | None = None, validated: bool = False,
                    cache_namespace: str = "", context: StateContext | None = None) -> None:
        """Queue a request. ``validated``: the caller already ran :meth:`validate` on these inputs (the
        async engine does, to answer 400 before queueing), so the engine thread does not scan the prompt
        a second time. ``cache_namespace``: the tenant (and salt) whose cached states this request may
        restore and add to; requests of other namespaces never see them. ``context``: the saved state the
        prompt continues (the prompt holds only the tokens after it; needs the state cache)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not validated:
            self.validate(prompt_token_ids, params)
        if context is not None and self.state_cache is None:
            raise ValueError("continuing a saved state needs the state cache")
        request = Request(request_id, list(prompt_token_ids), params, prompt, cache_namespace=cache_namespace,
                          context=context)
        if arrival_time is not None:
            request.arrival_time = arrival_time
        self.requests[request_id] = request
        self.scheduler.add(request)
        self._update_gauges()

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its slots; returns its final delta (finish_reason "abort")."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self.scheduler.remove(request)  # frees the slots of every unfinished sequence
        if not request.sequences:  # still waiting or prefilling
            outputs = [CompletionOutput(i, finish_reason="abort") for i in range(request.params.n)]
            self.metrics.request_success["abort"].inc(request.params.n)
        else:
            for seq in request.sequences:
                if not seq.finished:
                    seq.finish_reason = "abort"
                    self._last_token_unfed(request, seq)
                    self.sampler.remove(seq.slot)
                    seq.detokenizer.finish(matched_stop=False)
                    self.metrics.request_success["abort"].inc()
            outputs = self._deltas(request)
        self._finish_request(request, time.monotonic())
        self._update_gauges()
        return RequestOutput(request_id, request.prompt_token_ids, outputs, True, request.prompt,
                             prompt_surprise=self._take_prompt_surprise(request))

    def flush_saved_states(self) -> None:
        """Wait until the states saved so far are written to the tier below memory (shutdown, tests)."""
        if self.state_cache is not None and self.state_cache.tier is not None:
            self.state_cache.tier.flush()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_free_slots(self) -> int:
        return len(self.scheduler.free_slots)

    # ---- one step --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        start = time.monotonic()
        plan = self.scheduler.schedule()
        if plan.empty:
            return []
        touched: dict[str, Request] = {}
        if plan.admitted:
            # requests whose whole prompt was cached have their first tokens already
            touched.update((r.request_id, r) for r in self._admit(plan))
        if plan.decodes:
            ids = torch.tensor([[s.token_ids[-1]] for s in plan.decodes], device=self.device)
            slots = torch.tensor([s.slot for s in plan.decodes], device=self.device)
            owners = [self.requests[s.request_id] for s in plan.decodes]
            surprise = self._surprise_buffer(owners, 1)
            if self.decode_graphs is not None and surprise is None:
                logits = self.decode_graphs.run(ids, slots)
            else:  # surprise is an extra output of the eager step (the captured graphs have none)
                logits, _ = self.model(ids, self.pool, None, slots=slots, surprise=surprise)
            if surprise is not None:  # each fed token's surprise is known now: a step after it was sent
                for seq, request, row in zip(plan.decodes, owners, surprise[:, 0].tolist(), strict=True):
                    if request.params.return_surprise:
                        seq.new_surprise.append(row)
                        self._observe_surprise(request.num_prompt_tokens + len(seq.token_ids) - 1, [row])
            self._sample(plan.decodes, owners, logits[:, -1, : self.vocab_size], slots)
            touched.update((r.request_id, r) for r in owners)
        if plan.prefills:
            self._prefill(plan.prefills)
            touched.update((c.request.request_id, c.request) for c in plan.prefills)
        now = time.monotonic()
        outputs = []
        for request in touched.values():
            deltas = self._deltas(request)
            done = all(s.finished for s in request.sequences) and request.status is RequestStatus.DECODING
            if done:
                self._finish_request(request, now)
            # the prompt's logprobs go out with the first tokens (so a stream can echo them) and the final delta
            prompt_logprobs = None
            if request.prompt_logprobs is not None and (done or not request.prompt_logprobs_sent
                                                        and request.status is RequestStatus.DECODING):
                prompt_logprobs, request.prompt_logprobs_sent = request.prompt_logprobs, True
            if deltas or done or prompt_logprobs is not None:
                outputs.append(RequestOutput(request.request_id, request.prompt_token_ids, deltas, done,
                                             request.prompt, prompt_logprobs, request.num_cached_tokens if done else 0,
                                             self._take_prompt_surprise(request)))
        self.metrics.engine_step_duration.observe(now - start)
        self.metrics.engine_batch_size.observe(len(plan.decodes) + len(plan.prefills))
        self.metrics.iteration_tokens.observe(plan.num_tokens)
        self._update_gauges()
        return outputs

    def _cached_prefix(self, request: Request) -> tuple[CachedState | None, int]:
        """The scheduler's question before admitting a request: the saved state it can start from, and how
        many of its prompt tokens that state consumed (0 for a continued context: the prompt follows it)."""
        request.num_cached_tokens = 0
        if request.context is not None and not request.context_length:
            entry = self.state_cache.get(request.context.key)
            if entry is not None:
                request.num_cached_tokens = request.context.length
                return entry, 0
            # the saved state is gone: rebuild it from its tokens (slower, same result)
            history = request.context.token_ids()
            request.prompt_token_ids = history + request.prompt_token_ids
            request.context_length = len(history)
        if request.params.prompt_logprobs is not None or request.params.return_surprise:
            return None, 0  # needs the logits (or the surprise) of every prompt position
        entry = self.state_cache.lookup(request.prompt_token_ids, request.cache_namespace)
        request.num_cached_tokens = 0 if entry is None else entry.length
        return entry, request.num_cached_tokens

    def _admit(self, plan: SchedulerOutput) -> list[Request]:
        """Give admitted requests their starting state: fresh, or the saved state the scheduler chose.
        Returns those whose whole prompt was restored, which sample their first tokens now."""
        fresh = [r.slots[0] for r in plan.admitted if r.request_id not in plan.restored]
        if fresh:
            self.model.reset_slots(self.pool, fresh)
        started = []
        for request in plan.admitted:
            self.metrics.prompt_tokens.inc(request.num_prompt_tokens)
            if self.state_cache is not None:
                self.metrics.prefix_cache_queries.inc(request.num_prompt_tokens)
            entry = plan.restored.get(request.request_id)
            if entry is None:
                continue
            self._restore(request.slots[0], entry)
            self.metrics.prefix_cache_hits.inc(request.num_prefilled)
            if request.num_prefilled == request.num_prompt_tokens:
                self._start_decoding(request, entry.logits)
                started.append(request)
        return started

    def _restore(self, slot: int, entry: CachedState) -> None:
        start = time.perf_counter()
        self.pool.assign([slot], entry.state)
        m = self.metrics
        m.state_restore_seconds[entry.tier].observe(entry.load_seconds + time.perf_counter() - start)
        m.state_tier_hits[entry.tier].inc()
        m.state_tier_bytes[entry.tier].inc(entry.nbytes)

    def _prefill(self, chunks: list[PrefillChunk]) -> None:
        lengths = [c.end - c.start for c in chunks]
        ids = torch.full((len(chunks), max(lengths)), self.tokenizer.pad_token_id, dtype=torch.long)
        for row, c in enumerate(chunks):
            ids[row, : lengths[row]] = torch.tensor(c.request.prompt_token_ids[c.start: c.end])
        slots = torch.tensor([c.request.slots[0] for c in chunks], device=self.device)
        surprise = self._surprise_buffer([c.request for c in chunks], max(lengths))
        # logits at every prompt position only for prompt logprobs; else each row's last (all a prefill samples)
        every = any(c.request.params.prompt_logprobs is not None for c in chunks)
        logits, _ = self.model(ids.to(self.device), self.pool, torch.tensor(lengths, device=self.device), slots=slots,
                               surprise=surprise, last_only=not every)
        logits = logits[..., : self.vocab_size]
        for row, c in enumerate(chunks):
            request = c.request
            if request.params.return_surprise:
                rows = surprise[row, : lengths[row]].tolist()
                request.prompt_surprise = (request.prompt_surprise or []) + rows
                self._observe_surprise(c.start, rows)
            request.num_prefilled = c.end
            if request.params.prompt_logprobs is not None:
                self._prompt_logprobs(c, logits[row, : lengths[row]])
            if c.last:
                last_logits = logits[row, lengths[row] - 1 if every else 0]
                if self.state_cache is not None:
                    self._save(request, request.prompt_token_ids, [request.slots[0]], last_logits.clone())
                self._start_decoding(request, last_logits)

    def _surprise_buffer(self, requests: list[Request], length: int) -> Tensor | None:
        """The model's surprise output for a batch [rows, length, Miras layers], if any of its rows asks."""
        if not any(r.params.return_surprise for r in requests):
            return None
        return torch.empty(len(requests), length, len(self.miras_layers), device=self.device)

    def _observe_surprise(self, start: int, rows: list[list[float]]) -> None:
        """Sample the surprise of a sequence's tokens at positions start, start + 1, ... into the histogram."""
        every = self.metrics.surprise_sample_every
        for position in range(-start % every, len(rows), every):
            for layer, value in zip(self.miras_layers, rows[position], strict=True):
                self.metrics.token_surprise(layer).observe(value)

    def _take_prompt_surprise(self, request: Request) -> list[list[float]] | None:
        """The prompt's surprise, once: in the first output that carries generated tokens."""
        if request.prompt_surprise is None or request.prompt_surprise_reported or not request.sequences:
            return None
        request.prompt_surprise_reported = True
        return request.prompt_surprise

    def _prompt_logprobs(self, chunk: PrefillChunk, logits: Tensor) -> None:
        """Logprob of each prompt token under the model, given the tokens before it."""
        request = chunk.request
        if request.prompt_logprobs is None:
            request.prompt_logprobs = [None]
        rows = torch.log_softmax(logits, dim=-1)
        targets = request.prompt_token_ids[chunk.start + 1: chunk.end + 1]
        for row, token in enumerate(targets):
            request.prompt_logprobs.append(token_logprob(rows[row], token, request.params.prompt_logprobs))

    def _start_decoding(self, request: Request, last_logits: Tensor) -> None:
        """The prompt is consumed: fork its state into the request's other slots and sample first tokens."""
        params, n = request.params, request.params.n
        if n > 1:
            self.pool.assign(request.slots[1:], self.pool.select([request.slots[0]] * (n - 1)))
        for i, slot in enumerate(request.slots):
            matcher = self.grammars.matcher(params.guided) if params.guided is not None else None
            self.sampler.add(slot, params, i, request.prompt_token_ids, matcher)
            detok = IncrementalDetokenizer(self.tokenizer, params.stop, params.include_stop_str_in_output,
                                           params.skip_special_tokens)
            logprobs = [] if params.logprobs is not None else None
            request.sequences.append(Sequence(request.request_id, i, slot, detok, logprobs=logprobs, matcher=matcher))
        request.status = RequestStatus.DECODING
        if params.max_tokens == 0:
            for seq in request.sequences:
                self._finish_sequence(request, seq, "length", None)
            return
        self._sample(request.sequences, [request] * n, last_logits.unsqueeze(0).expand(n, -1))

    def _sample(self, seqs: list[Sequence], owners: list[Request], logits: Tensor, slots: Tensor | None = None
                ) -> None:
        """``slots``: the sequences' slots as a tensor on the device, if the caller has one."""
        tokens, logprobs = self.sampler.sample(logits, [s.slot for s in seqs], slots)
        now = time.monotonic()
        self.metrics.generation_tokens.inc(len(tokens))
        for seq, request, token, logprob in zip(seqs, owners, tokens, logprobs, strict=True):
            self._append(request, seq, token, logprob, now)

    def _append(self, request: Request, seq: Sequence, token: int, logprob: TokenLogprob | None, now: float) -> None:
        params = request.params
        seq.token_ids.append(token)
        seq.new_token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
            seq.new_logprobs.append(logprob)
        if request.first_token_time is None:
            request.first_token_time = now
            self.metrics.time_to_first_token.observe(now - request.arrival_time)
        if seq.last_token_time:
            self.metrics.inter_token_latency.observe(now - seq.last_token_time)
            self.metrics.time_per_output_token.observe(now - seq.last_token_time)
        seq.last_token_time = now
        count = len(seq.token_ids)
        if seq.matcher is not None and not seq.matcher.accept(token):  # cannot happen: the mask allowed it
            logger.error("request %s: grammar rejected sampled token %d: %s", request.request_id, token,
                         seq.matcher.error)
            self._finish_sequence(request, seq, "stop", None)
        elif token == self.eos_token_id and not params.ignore_eos:
            self._finish_sequence(request, seq, "stop", None)
        elif token in params.stop_token_ids:
            self._finish_sequence(request, seq, "stop", token)
        else:
            matched = seq.detokenizer.add(token, check_stop=count >= params.min_tokens)
            if matched is not None:
                self._finish_sequence(request, seq, "stop", matched)
            elif seq.matcher is not None and seq.matcher.done:  # the grammar is complete: nothing may follow
                self._finish_sequence(request, seq, "stop", None)
            elif count >= params.max_tokens:
                self._finish_sequence(request, seq, "length", None)

    def _finish_sequence(self, request: Request, seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self._last_token_unfed(request, seq)
        seq.detokenizer.finish(matched_stop=isinstance(stop_reason, str))
        self.sampler.remove(seq.slot)
        if self.state_cache is not None:
            # The slot has consumed the prompt and every generated token but the last (sampled, never fed):
            # exactly what the next turn of a conversation starts with.
            self._save(request, request.prompt_token_ids + seq.token_ids[:-1], [seq.slot], None)
        self.scheduler.free_sequence(seq)
        self.metrics.request_success[reason].inc()

    @staticmethod
    def _last_token_unfed(request: Request, seq: Sequence) -> None:
        """A finished sequence's last token was sampled but never fed: its surprise is null."""
        if request.params.return_surprise and seq.token_ids:
            seq.new_surprise.append(None)

    def _save(self, request: Request, token_ids: list[int], slot: list[int], logits: Tensor | None) -> None:
        """Keep the state of ``slot`` (after ``token_ids``) in the state cache, under the request's key for it."""
        entry = CachedState(len(token_ids), self.pool.select(slot), logits, prefix=request.context is None)
        self.state_cache.put(request.cache_key(token_ids), entry)

    def _deltas(self, request: Request) -> list[CompletionOutput]:
        """What each sequence produced since the last call (a finished one reports its finish once)."""
        deltas = []
        for seq in request.sequences:
            text = seq.detokenizer.take()
            if not (text or seq.new_token_ids or seq.new_surprise or (seq.finished and not seq.finish_reported)):
                continue
            logprobs = seq.new_logprobs if seq.logprobs is not None else None
            surprise = seq.new_surprise if request.params.return_surprise else None
            deltas.append(CompletionOutput(seq.index, text, seq.new_token_ids, logprobs, seq.finish_reason,
                                           seq.stop_reason, surprise))
            seq.new_token_ids, seq.new_logprobs, seq.new_surprise = [], [], []
            seq.finish_reported = seq.finished
        return deltas

    def _finish_request(self, request: Request, now: float) -> None:
        self.requests.pop(request.request_id, None)
        if request.status is not RequestStatus.FINISHED:
            self.scheduler.remove(request)
        m = self.metrics
        m.e2e_request_latency.observe(now - request.arrival_time)
        if request.scheduled_time is not None:
            m.request_queue_time.observe(request.scheduled_time - request.arrival_time)
            if request.first_token_time is not None:
                m.request_prefill_time.observe(request.first_token_time - request.scheduled_time)
                last = max(s.last_token_time for s in request.sequences)
                m.request_decode_time.observe(last - request.first_token_time)
        m.request_prompt_tokens.observe(request.num_prompt_tokens)
        m.request_generation_tokens.observe(request.num_generated_tokens)
        m.request_params_n.observe(request.params.n)
        m.request_params_max_tokens.observe(request.params.max_tokens)

    def _update_gauges(self) -> None:
        self.metrics.num_requests_running.set(self.scheduler.num_running)
        self.metrics.num_requests_waiting.set(self.scheduler.num_waiting)
        self.metrics.state_slots_used.set(self.scheduler.num_slots_used)
        self.metrics.kv_cache_usage_perc.set(self.scheduler.num_slots_used / self.config.max_num_seqs)
        if self.state_cache is not None:
            self.metrics.state_tier_stored_bytes["memory"].set(self.state_cache.nbytes)
            tier = self.state_cache.tier
            for t in (tier.tiers if isinstance(tier, StackedTiers) else [tier] if tier is not None else []):
                self.metrics.state_tier_stored_bytes[t.name].set(t.nbytes)
