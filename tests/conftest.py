"""Shared fixtures: small random models and a checkpoint directory with a real trained tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Before anything imports triton: without a GPU its kernels (and its builtins) must run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from miras_serve import models  # noqa: E402

# One thread: the suite's shapes are small, and on a 2-core machine a test process and a server process
# each spinning two OpenMP threads slow each other down by orders of magnitude.
torch.set_num_threads(1)

# Small shapes that still cross chunk boundaries quickly (chunk_size 4) and exercise every code path.
SMALL = dict(vocab_size=320, d_model=32, n_layers=2, n_heads=2, head_dim=8, mlp_hidden=48, gate_rank=8,
             chunk_size=4, swa_window=6)

TOKENIZER_TEXT = (
    "From fairest creatures we desire increase, that thereby beauty's rose might never die, "
    "but as the riper should by time decease, his tender heir might bear his memory. "
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
) * 20


def small_model(preset: str, seed: int = 0, **overrides) -> models.MirasLM:
    torch.manual_seed(seed)
    return models.from_preset(preset, **{**SMALL, **overrides}).eval()


@pytest.fixture(scope="session")
def tokenizer() -> models.MirasTokenizer:
    return models.train_tokenizer([TOKENIZER_TEXT], vocab_size=SMALL["vocab_size"])


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A saved random ``moneta-h`` model (one Miras + one attention layer) with a BPE tokenizer."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-moneta-h"
    models.save_pretrained(small_model("moneta-h", seed=1234), tokenizer, path)
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report carries the log tails of the server processes alive during it (every process
    started with loadtest/process.py: miras-serve, redis-server, nginx)."""
    outcome = yield
    report = outcome.get_result()
    process = sys.modules.get("miras_serve.loadtest.process")
    if report.failed and process is not None:
        for server in process.ServerProcess.STARTED:
            if server.alive() or (server.ended_at or 0.0) >= call.start:
                report.sections.append((f"{server.name} log", server.output()[-20_000:]))
