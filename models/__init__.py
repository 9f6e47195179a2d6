"""Miras language models (Moneta, Yaad, Memora and relatives) in plain PyTorch."""

from __future__ import annotations

from typing import Any

from .checkpoint import CheckpointError, load_pretrained, save_pretrained, shipped_models
from .config import PRESETS, ConfigError, MirasConfig, preset_config
from .model import MirasLM, ModelState
from .tokenizer import MirasTokenizer, train_tokenizer


def from_preset(name: str, **overrides: Any) -> MirasLM:
    """A randomly initialised model of preset ``name``; any config field can be overridden."""
    return MirasLM(preset_config(name, **overrides))


__all__ = [
    "PRESETS", "CheckpointError", "ConfigError", "MirasConfig", "MirasLM", "MirasTokenizer", "ModelState",
    "from_preset", "load_pretrained", "preset_config", "save_pretrained", "shipped_models", "train_tokenizer",
]
