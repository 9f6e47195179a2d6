"""Checkpoint directories: config.json + model.safetensors (or a sharded index) + tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, MirasConfig
from .model import MirasLM
from .tokenizer import MirasTokenizer

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file (and the field or tensor)."""


def shipped_models() -> list[str]:
    """Names of the trained models shipped inside the package."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def resolve(path_or_name: str | Path) -> Path:
    path = Path(path_or_name)
    if path.is_dir():
        return path
    if isinstance(path_or_name, str) and (PRETRAINED_DIR / path_or_name).is_dir():
        return PRETRAINED_DIR / path_or_name
    raise CheckpointError(f"{path_or_name}: no such model directory or shipped model "
                          f"(shipped: {', '.join(shipped_models()) or 'none'})")


def load_config(directory: Path) -> MirasConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    try:
        return MirasConfig.from_dict(data, source=str(path))
    except ConfigError:
        raise
    except TypeError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _load_tensors(directory: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' field") from exc
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        raise CheckpointError(f"{single}: file not found (nor a sharded {INDEX_FILE})")
    tensors: dict[str, tuple[torch.Tensor, Path]] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: file not found (listed in {INDEX_FILE})")
        try:
            loaded = load_file(str(file))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
        tensors.update({name: (t, file) for name, t in loaded.items()})
    return tensors


def load_pretrained(path_or_name: str | Path, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> tuple[MirasLM, MirasTokenizer]:
    """Load a model directory (or a shipped model by name) and its tokenizer."""
    directory = resolve(path_or_name)
    config = load_config(directory)
    tokenizer_path = directory / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise CheckpointError(f"{tokenizer_path}: file not found")
    try:
        tokenizer = MirasTokenizer.load(directory)
    except Exception as exc:  # the tokenizers library raises plain Exceptions
        raise CheckpointError(f"{tokenizer_path}: cannot load tokenizer ({exc})") from exc
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{tokenizer_path}: tokenizer has {tokenizer.vocab_size} tokens but "
                              f"{directory / CONFIG_FILE} field 'vocab_size' is {config.vocab_size}")
    model = MirasLM(config)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    tensors = _load_tensors(directory)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{directory}: tensor '{missing[0]}' is missing from the weights "
                              f"({len(missing)} missing)")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        name = unexpected[0]
        raise CheckpointError(f"{tensors[name][1]}: unexpected tensor '{name}' for this config")
    for name, (tensor, file) in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{file}: tensor '{name}' has shape {tuple(tensor.shape)} but "
                                  f"{CONFIG_FILE} implies {tuple(expected[name].shape)}")
    model.load_state_dict({name: t for name, (t, _) in tensors.items()}, strict=False)
    model.eval()
    model.to(device=device or "cpu", dtype=dtype)
    return model, tokenizer


def save_pretrained(model: MirasLM, tokenizer: MirasTokenizer, path: str | Path) -> Path:
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(model.config.to_json() + "\n")
    weights = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        weights.pop("lm_head.weight")
    save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save(directory)
    return directory
