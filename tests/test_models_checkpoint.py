"""Checkpoint directories: bit-exact round trip, sharded weights, and a clear error for every bad case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SMALL, small_model
from safetensors.torch import load_file, save_file

from miras_serve import models


@pytest.fixture()
def saved(tmp_path, tokenizer) -> Path:
    path = tmp_path / "model"
    models.save_pretrained(small_model("memora-h", seed=3), tokenizer, path)
    return path


def test_round_trip_is_bit_exact(saved, tokenizer):
    original = small_model("memora-h", seed=3)
    loaded, loaded_tokenizer = models.load_pretrained(saved)
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, SMALL["vocab_size"], (2, 11))
    with torch.no_grad():
        assert torch.equal(original(ids)[0], loaded(ids)[0])
    text = "Shall I compare thee?"
    assert loaded_tokenizer.encode(text) == tokenizer.encode(text)
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "miras" and config["chunk_size"] == SMALL["chunk_size"]
    assert config["preset"] == "memora-h"


def test_sharded_weights_load(saved):
    tensors = load_file(str(saved / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(saved / file))
    (saved / "model.safetensors").unlink()
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = models.load_pretrained(saved)
    assert torch.equal(model.state_dict()["embed.weight"], tensors["embed.weight"])


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def drop_tensor(path: Path, name: str) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(path / "model.safetensors"))


def resize_tensor(path: Path, name: str) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(path / "model.safetensors"))


BAD_CASES = {
    "missing config": (lambda p: (p / "config.json").unlink(), models.CheckpointError, r"config\.json: file not found"),
    "config not json": (lambda p: (p / "config.json").write_text("{oops"), models.CheckpointError,
                        r"config\.json: not valid JSON"),
    "missing weights": (lambda p: (p / "model.safetensors").unlink(), models.CheckpointError,
                        r"model\.safetensors: file not found"),
    "corrupt weights": (lambda p: (p / "model.safetensors").write_bytes(b"garbage"), models.CheckpointError,
                        r"model\.safetensors: not a readable safetensors file"),
    "missing tokenizer": (lambda p: (p / "tokenizer.json").unlink(), models.CheckpointError,
                          r"tokenizer\.json: file not found"),
    "unknown variant": (lambda p: edit_config(p, model_type="mamba"), models.ConfigError,
                        r"config\.json: config field 'model_type'"),
    "unknown memory rule": (lambda p: edit_config(p, retention="elastic"), models.ConfigError,
                            r"config\.json: config field 'retention'"),
    "field out of range": (lambda p: edit_config(p, chunk_size=0), models.ConfigError,
                           r"config\.json: config field 'chunk_size'"),
    "unknown field": (lambda p: edit_config(p, flux_capacitor=1), models.ConfigError,
                      r"config\.json: config field 'flux_capacitor'"),
    "shape mismatch": (lambda p: edit_config(p, d_model=48), models.CheckpointError,
                       r"model\.safetensors: tensor '.*' has shape"),
    "resized tensor": (lambda p: resize_tensor(p, "blocks.0.mixer.mem_ln_bias"), models.CheckpointError,
                       r"tensor 'blocks\.0\.mixer\.mem_ln_bias' has shape \(3, 3\)"),
    "missing tensor": (lambda p: drop_tensor(p, "norm.weight"), models.CheckpointError,
                       r"tensor 'norm\.weight' is missing"),
    "vocab too small": (lambda p: edit_config(p, vocab_size=100), models.CheckpointError,
                        r"tokenizer\.json: tokenizer has \d+ tokens .* 'vocab_size' is 100"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_checkpoint_fails_with_a_clear_error(saved, case):
    damage, error, message = BAD_CASES[case]
    damage(saved)
    with pytest.raises(error, match=message):
        models.load_pretrained(saved)


def test_unknown_name_lists_shipped_models(tmp_path):
    with pytest.raises(models.CheckpointError, match="no such model directory or shipped model"):
        models.load_pretrained("no-such-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(models.CheckpointError, match="file not found"):
        models.load_pretrained(empty)


def test_dtype_and_device_arguments(saved):
    model, _ = models.load_pretrained(saved, device="cpu", dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits, state = model(torch.randint(0, SMALL["vocab_size"], (1, 6)))
    assert logits.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in state.layers[0].values() if t.is_floating_point())
    shutil.rmtree(saved)
