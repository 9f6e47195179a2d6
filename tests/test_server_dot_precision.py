"""--dot-precision: the server flag reaches the kernels through the engine's arguments."""

from __future__ import annotations

import pytest
import torch
from conftest import small_model

from miras_serve import kernels
from miras_serve.server.cli import parse_args
from miras_serve.server.engine import EngineConfig, LLMEngine


def test_flag_reaches_the_engine_config():
    assert EngineConfig.from_args(parse_args([])).dot_precision is None
    assert EngineConfig.from_args(parse_args(["--dot-precision", "ieee"])).dot_precision == "ieee"
    with pytest.raises(SystemExit):
        parse_args(["--dot-precision", "fp8"])


def test_engine_sets_the_kernels_precision(monkeypatch, tokenizer):
    pytest.importorskip("triton")
    from miras_serve.kernels.precision import dot_precision

    monkeypatch.setenv("MIRAS_DOT_PRECISION", "")  # restored after the test, whatever the engine sets
    gpu = torch.device("cuda")  # the choice is read per launch; no device is touched
    LLMEngine(small_model("moneta"), tokenizer, EngineConfig(max_num_seqs=2, dot_precision="ieee"))
    assert dot_precision(gpu) == "ieee"
    LLMEngine(small_model("moneta"), tokenizer, EngineConfig(max_num_seqs=2, dot_precision="tf32"))
    assert dot_precision(gpu) == "tf32"
    with pytest.raises(ValueError, match="dot precision"):
        kernels.set_dot_precision("fp8")
