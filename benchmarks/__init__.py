"""Benchmarks, GPU / compile checks and report generators, run from a checkout (``python -m benchmarks.<name>``).

Not part of the wheel: they drive the runtime packages (models, kernels, server) and a server over HTTP
(loadtest), and write their reports under ``--out`` (default: ``docs/benchmarks/`` of this checkout)."""
