"""Model loading for the server and the offline API: name or directory, device and dtype choices."""

from __future__ import annotations

from pathlib import Path

import torch

from miras_serve import models

DEFAULT_MODEL = "moneta-tiny"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (fastest and exact there), bfloat16 on GPU. Memory state is always fp32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(model: str | Path = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto"
               ) -> tuple[models.MirasLM, models.MirasTokenizer]:
    """Load a model directory or shipped model; raises models.CheckpointError/ConfigError or ValueError."""
    target = resolve_device(device)
    return models.load_pretrained(model, device=target, dtype=resolve_dtype(dtype, target))


def default_served_name(model: str | Path) -> str:
    path = Path(model)
    return path.name if path.is_dir() else str(model)
