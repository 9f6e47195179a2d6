"""Randomly initialised model directories (``python -m models.random_init``) load and serve."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from miras_serve import models
from miras_serve.models.random_init import main
from miras_serve.server import LLM, SamplingParams


def test_random_model_directory_has_bf16_weights_a_full_vocabulary_and_serves(tmp_path):
    out = tmp_path / "linear-micro"
    assert main(["--preset", "linear", "--size", "micro", "--vocab-size", "400", "--out", str(out),
                 "--set", "n_layers=1"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 400 and config["n_layers"] == 1 and config["d_model"] == 32
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}  # noqa: SIM118
    model, tokenizer = models.load_pretrained(out)
    assert tokenizer.vocab_size == 400
    llm = LLM(out, max_num_seqs=2, max_num_batched_tokens=64)
    (result,) = llm.generate(["hello"], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(result.outputs[0].token_ids) == 3


def test_unknown_size_is_a_clear_error(tmp_path, capsys):
    assert main(["--preset", "moneta", "--size", "huge", "--out", str(tmp_path / "x")]) == 2
    assert "unknown size 'huge'" in capsys.readouterr().err
