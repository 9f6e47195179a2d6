"""Randomly initialised model directories: serve a model of any preset and size without training one.

    python -m models.random_init --preset moneta --size 340m --vocab-size 32000 --out /tmp/moneta-340m

writes config.json, model.safetensors (bfloat16 weights by default; the recurrent state is always fp32 at
run time) and a byte-level BPE tokenizer with exactly ``vocab_size`` tokens, trained on synthetic text, so
the sampler and the output head work on the full vocabulary. The text is generated, not downloaded, so
this works on a machine without network access. The model's outputs are noise: it is for measuring
speed and memory, not quality.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from .checkpoint import save_pretrained
from .config import ConfigError, preset_config
from .model import MirasLM
from .tokenizer import train_tokenizer
from .train import SIZES, parse_overrides

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def synthetic_text(vocab_size: int, seed: int = 0) -> str:
    """Random letter strings from a lexicon twice the vocabulary: enough distinct pairs for BPE to learn
    ``vocab_size`` tokens (32K in about 4 s)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lexicon = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(2 * vocab_size)]
    return " ".join(rng.choices(lexicon, k=30 * vocab_size))


def random_pretrained(preset: str, out: str | Path, size: str = "tiny", vocab_size: int = 4096,
                      dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides: object) -> Path:
    """Write a randomly initialised ``preset`` model of ``size`` (``models.train.SIZES``; any config field
    can be overridden) with its tokenizer to ``out``; returns the directory."""
    if size not in SIZES:
        raise ConfigError("size", f"unknown size {size!r}; choose from {sorted(SIZES)}")
    tokenizer = train_tokenizer([synthetic_text(vocab_size, seed)], vocab_size)
    fields = dict(SIZES[size], vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = MirasLM(preset_config(preset, **{**fields, **overrides})).to(dtype)
    return save_pretrained(model, tokenizer, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.random_init", description=__doc__.split("\n")[0])
    p.add_argument("--preset", required=True, help="model preset (moneta, yaad, memora, *-h, linear, transformer)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--size", default="tiny", help=f"model size: {', '.join(SIZES)}")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokens of the tokenizer and the model")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="weights on disk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field (repeatable)")
    args = p.parse_args(argv)
    try:
        if args.vocab_size < 260:
            raise ConfigError("vocab_size", "must be at least 260 (256 bytes, 3 special tokens and one merge)")
        out = random_pretrained(args.preset, args.out, args.size, args.vocab_size, DTYPES[args.dtype], args.seed,
                                **parse_overrides(args.overrides))
    except ConfigError as exc:
        print(f"random_init: error: {exc}", file=sys.stderr)
        return 2
    print(f"random {args.preset} ({args.size}) written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
