"""Prometheus metrics: vLLM's names under the ``miras:`` prefix, plus the state-slot view of capacity.

Each engine owns its registry (so several engines can live in one process, as in the tests); the HTTP
app serves it at /metrics. Bucket boundaries follow vLLM so its dashboards port with a rename.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .sampling_params import MAX_TOKENS_LIMIT

FINISH_REASONS = ("stop", "length", "abort")
REJECT_REASONS = ("queue_full", "draining")
STATE_TIERS = ("memory", "disk", "redis")  # where a restored state came from
STATE_REJECT_REASONS = ("corrupt", "missing")  # why a saved state was not used (it is recomputed)
RESTORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# A token's surprise (its memory loss, docs/surprise.md) spans decades: log-spaced buckets.
SURPRISE_BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
SURPRISE_SAMPLE_EVERY = 16  # the histogram takes one token position in 16 (of the requests that ask)
N_BUCKETS = (1, 2, 5, 10, 20)
# vLLM's cache_config_info labels where they have a meaning here, and the state cache's own
CACHE_CONFIG_LABELS = ("num_gpu_blocks", "enable_prefix_caching", "gpu_memory_utilization", "state_bytes_per_sequence",
                       "state_cache_bytes", "state_disk_bytes")


def one_two_five(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (vLLM's buckets for per-request token counts)."""
    buckets, scale = [], 1
    while True:
        for step in (1, 2, 5):
            if step * scale > limit:
                return tuple(buckets)
            buckets.append(step * scale)
        scale *= 10


class EngineMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"miras:{name}", doc, labels, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"miras:{name}", doc, labels, registry=self.registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"miras:{name}", doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Number of requests holding state slots.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Number of requests waiting to be admitted.")
        # never "..._total": that suffix is for counters (promtool check metrics)
        self.state_slots_capacity = gauge("state_slots_capacity", "State slots in the pool (--max-num-seqs).")
        self.state_slots_used = gauge("state_slots_used", "State slots held by running sequences.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "Fraction of state slots in use, 0 to 1 (vLLM's "
                                         "KV-cache usage: a recurrent model's whole cache is its state slots).")
        self.num_preemptions = counter("num_preemptions", "Requests preempted (vLLM's counter; admission holds a "
                                       "state slot until the request ends, so this server never preempts).")
        self.state_bytes_per_sequence = gauge(
            "state_bytes_per_sequence", "Bytes of recurrent state per sequence (constant in context length).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests (restored from the state "
                                     "cache or prefilled, as vLLM counts them).")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens of admitted requests looked up "
                                            "in the state cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens restored from the state cache "
                                         "instead of prefilled.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        success = Counter("miras:request_success", "Count of finished requests by finish reason.",
                          labels + ["finished_reason"], registry=self.registry)
        self.request_success = {r: success.labels(model_name, r) for r in FINISH_REASONS}
        rejected = Counter("miras:request_rejected", "Requests refused before admission (429 queue full, "
                           "503 draining).", labels + ["reason"], registry=self.registry)
        self.request_rejected = {r: rejected.labels(model_name, r) for r in REJECT_REASONS}
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Histogram of time to first token "
                                             "in seconds (from arrival).", TTFT_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in "
                                             "seconds.", ITL_BUCKETS)
        self.time_per_output_token = histogram("time_per_output_token_seconds", "Histogram of time per output "
                                               "token in seconds (vLLM's name before 0.11 for "
                                               "inter_token_latency_seconds: the same observations).", ITL_BUCKETS)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "Histogram of end-to-end request "
                                             "latency in seconds.", REQUEST_LATENCY_BUCKETS)
        self.request_queue_time = histogram("request_queue_time_seconds", "Histogram of time spent waiting for "
                                            "a state slot.", REQUEST_LATENCY_BUCKETS)
        self.request_prefill_time = histogram("request_prefill_time_seconds", "Histogram of time from admission "
                                              "to first token.", REQUEST_LATENCY_BUCKETS)
        self.request_decode_time = histogram("request_decode_time_seconds", "Histogram of time from first to "
                                             "last token.", REQUEST_LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens", "Generated tokens per request.",
                                                   TOKEN_BUCKETS)
        self.request_params_n = histogram("request_params_n", "The n request parameter of finished requests.",
                                          N_BUCKETS)
        self.request_params_max_tokens = histogram("request_params_max_tokens", "The max_tokens request parameter "
                                                   "of finished requests.", one_two_five(MAX_TOKENS_LIMIT))
        self.engine_step_duration = histogram("engine_step_duration_seconds", "Wall time of one engine step.",
                                              STEP_BUCKETS)
        self.engine_batch_size = histogram("engine_batch_size", "Sequences in one engine step (decodes + prefill "
                                           "chunks).", BATCH_BUCKETS)
        self.decode_graph_compiles = counter("decode_graph_compiles", "Graphs of the CPU's compiled decode step "
                                             "built (at start-up: a compile later stalls every stream).")
        self.decode_compile_seconds = counter("decode_compile_seconds", "Seconds spent compiling the CPU's decode "
                                              "step (at start-up, before the server listens).")
        self.decode_compile_failures = counter("decode_compile_failures", "Compiles of the CPU's decode step "
                                               "that failed: the engine decodes eagerly from then on (several "
                                               "times slower); alert on any.")
        def per_tier(metric: Counter | Gauge | Histogram, names: tuple[str, ...]) -> dict:
            return {name: metric.labels(model_name, name) for name in names}

        tier = labels + ["tier"]
        self.state_tier_hits = per_tier(Counter(
            "miras:state_tier_hits", "Saved states restored into a slot, by the tier they came from.", tier,
            registry=self.registry), STATE_TIERS)
        self.state_tier_bytes = per_tier(Counter(
            "miras:state_tier_restored_bytes", "Bytes of saved states restored into slots, by tier.", tier,
            registry=self.registry), STATE_TIERS)
        self.state_tier_stored_bytes = per_tier(Gauge(
            "miras:state_tier_stored_bytes", "Bytes of saved states each tier holds.", tier,
            registry=self.registry), STATE_TIERS)
        self.state_restore_seconds = per_tier(Histogram(
            "miras:state_restore_seconds", "Time to restore a saved state into a slot (read and decode from "
            "the tier, then copy), by tier.", tier, buckets=RESTORE_BUCKETS, registry=self.registry), STATE_TIERS)
        self.state_tier_rejected = per_tier(Counter(
            "miras:state_tier_rejected", "Saved states found unusable (corrupt, truncated, another model's or "
            "gone) and recomputed instead.", labels + ["reason"], registry=self.registry), STATE_REJECT_REASONS)
        surprise = Histogram("miras:token_surprise", "Surprise of consumed tokens (the memory's attentional-bias "
                             f"loss at the token, before its update) per Miras layer: sampled, one position in "
                             f"{SURPRISE_SAMPLE_EVERY}, of requests with return_surprise.", labels + ["layer"],
                             buckets=SURPRISE_BUCKETS, registry=self.registry)
        self.surprise_sample_every = SURPRISE_SAMPLE_EVERY

        def token_surprise(layer: int) -> Histogram:
            return surprise.labels(model_name, str(layer))

        self.token_surprise = token_surprise
        self.cache_config_info = Gauge("miras:cache_config_info", "Information of the state cache and slot pool "
                                       "(always 1; the configuration is in the labels).",
                                       labels + list(CACHE_CONFIG_LABELS), registry=self.registry)
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens processed in one engine step.",
                                          TOKEN_BUCKETS)

    def set_cache_config(self, model_name: str, **config: object) -> None:
        """``cache_config_info``: one series, valued 1, whose labels are ``config`` (CACHE_CONFIG_LABELS)."""
        self.cache_config_info.labels(model_name, *(str(config[name]) for name in CACHE_CONFIG_LABELS)).set(1)
