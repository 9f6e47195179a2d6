"""Miras Serve: an inference server for recurrent Miras language models (Moneta, Yaad, Memora).

The import root of the project's folders (pyproject.toml maps each one here): ``miras_serve.kernels`` (Triton
kernels on plain tensors and a rule descriptor), ``miras_serve.models`` (configs, layers, memory rules,
checkpoints, training), ``miras_serve.server`` (engine and OpenAI-compatible HTTP server) and
``miras_serve.loadtest`` (an HTTP load generator)."""
