"""miras-loadtest: a load generator and benchmark client for OpenAI-compatible streaming servers.

It drives /v1/completions or /v1/chat/completions over SSE at a fixed concurrency or a Poisson request rate,
measures TTFT, ITL, TPOT and end-to-end latency per request, throughput and goodput, counts every error by
kind, and (with --check) verifies that an overloaded server loses nothing.
"""
