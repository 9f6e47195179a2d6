"""The shipped models' numerics on held-out text (models/SPEC.md §3, the LayerNorm's eps): in fp32 one parallel
pass and a prompt (in pieces that cut chunks) followed by token-by-token decoding agree over 2K+ tokens, and
the memory's products with operands rounded to tf32 stay within a stated bound of exact fp32."""

from __future__ import annotations

import pytest
import torch

from miras_serve import models
from miras_serve.models.corpus import load_documents, split_documents
from miras_serve.models.memory import emulate_dots
from miras_serve.models.train import encode_stream

TOKENS = 2048 + 64  # the last 64 decoded one at a time, crossing a chunk boundary (64-token chunks)
PROMPT_PIECES = (1000, 1048)  # cut at positions that are not chunk boundaries
PARALLEL_VS_DECODE = 1e-4  # the bound: per token, |logits difference| / |logits| (2-norms)
TF32 = 2e-3  # emulated tf32 operands (10 mantissa bits) in the memory's chunk products, same measure
# Memora's KL retention updates log M and takes a softmax (models/SPEC.md §5), so a product's rounding lands in
# an exponent, and its worst token is chaotic: 1-ulp perturbations of the fp32 inputs (the embeddings moved one
# ulp; products of other strides) moved the two Memora models' worst token between 8.5e-3 and 2.7e-2 while the
# 99th percentile stayed at 4-6e-3. The bound is twice the worst seen. (The GPU default, tf32x3, is near fp32:
# docs/precision.md.)
TF32_BY_RETENTION = {"kl": 5e-2}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per token: ||a - b|| / ||b|| over the vocabulary."""
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


@pytest.fixture(scope="module")
def held_out_texts():
    return split_documents(load_documents(None))[1]


@pytest.mark.parametrize("name", models.shipped_models())
def test_parallel_equals_prompt_then_decode_in_fp32(name, held_out_texts):
    model, tokenizer = models.load_pretrained(name)
    ids = encode_stream(tokenizer, held_out_texts)[:TOKENS].unsqueeze(0)
    with torch.no_grad():
        parallel, _ = model(ids)
        parts, state, start = [], None, 0
        for length in PROMPT_PIECES:
            logits, state = model(ids[:, start:start + length], state)
            parts.append(logits)
            start += length
        for t in range(start, TOKENS):
            logits, state = model(ids[:, t:t + 1], state)
            parts.append(logits)
        stepped = torch.cat(parts, dim=1)
        with emulate_dots("tf32"):
            rounded, _ = model(ids)
    error = relative_error(stepped[0], parallel[0])
    assert error.max() <= PARALLEL_VS_DECODE, f"worst token {int(error.argmax())}: {float(error.max()):.2e}"
    tf32_error = relative_error(rounded[0], parallel[0])
    bound = TF32_BY_RETENTION.get(model.config.retention, TF32)
    assert tf32_error.max() <= bound, f"worst token {int(tf32_error.argmax())}: {float(tf32_error.max()):.2e}"
