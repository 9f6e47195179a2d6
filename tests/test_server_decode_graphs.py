"""The engine's graph-replayed decode: batches padded to captured sizes with a scratch pool row. On CPU
the padded steps run eagerly (the same code, without capture), which is what these tests exercise."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest
from conftest import small_model

from miras_serve import models
from miras_serve.models.backend import environment, forced_backend
from miras_serve.server import EngineConfig, LLMEngine, SamplingParams
from miras_serve.server.cli import parse_args
from miras_serve.server.decode_graphs import DecodeGraphs, capture_sizes

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")


def test_capture_sizes_cover_every_batch():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    for max_batch in (1, 3, 6, 64, 100):
        sizes = capture_sizes(max_batch)
        assert all(any(s >= b for s in sizes) for b in range(1, max_batch + 1)) and max(sizes) == max_batch


def generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int]) -> dict[str, list[int]]:
    """Greedy completions of concurrent requests of different lengths: the decode batch shrinks from
    len(prompts) to 1 as they finish, so it crosses several padded sizes."""
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].token_ids
    return tokens


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_decode_matches_eager(tiny_checkpoint, backend):
    """Five concurrent greedy requests (batches 5, 4, 3, 2, 1 padded to 8, 4, 4, 2, 1, the padding in
    the scratch row) give exactly what the unpadded engine gives."""
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20], [30, 31, 32, 33, 34], [40, 41]]
    max_tokens = [9, 3, 7, 5, 11] if backend == "torch" else [4, 2, 3, 1, 5]
    results = []
    with forced_backend(backend):
        for graphs in (False, True):
            model, tokenizer = models.load_pretrained(tiny_checkpoint)
            engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=6, cuda_graphs=graphs))
            assert (engine.decode_graphs is not None) == graphs
            assert engine.pool.batch_size == 6 + graphs  # the scratch row
            results.append(generate(engine, prompts, max_tokens))
    assert results[0] == results[1]
    assert [len(results[1][f"r{i}"]) for i in range(5)] == max_tokens


@torch.inference_mode()
def test_padding_rows_touch_only_the_scratch_slot():
    model = small_model("moneta", seed=3)
    pool = model.init_state(6)
    model(torch.randint(3, 300, (6, 5)), pool, slots=torch.arange(6))  # every slot holds a real state
    graphs = DecodeGraphs(model, pool, scratch_slot=5, max_batch=5, use_graphs=False)
    before = pool.clone()
    ids, slots = torch.tensor([[7], [8], [9]]), torch.tensor([3, 0, 2])
    logits = graphs.run(ids, slots)  # batch 3, padded to 4: one row in the scratch slot
    expected, _ = model(ids, before.clone(), slots=slots)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)  # a 4-row matmul, not bitwise a 3-row one
    assert pool.pos.tolist() == [6, 5, 6, 6, 5, 6]  # slot 1 and 4 untouched, scratch 5 advanced
    for layer, layer_before in zip(pool.layers, before.layers, strict=True):
        for name, t in layer.items():
            for s in (1, 4):
                assert torch.equal(t[s], layer_before[name][s]), f"slot {s} of {name} changed"


def test_scratch_slot_must_be_in_the_pool():
    model = small_model("moneta")
    with pytest.raises(ValueError, match="scratch slot 4"):
        DecodeGraphs(model, model.init_state(4), scratch_slot=4, max_batch=4, use_graphs=False)


def test_enforce_eager_flag():
    assert EngineConfig.from_args(parse_args(["--max-num-seqs", "8"])).cuda_graphs is None  # graphs wherever CUDA is
    assert EngineConfig.from_args(parse_args(["--enforce-eager"])).cuda_graphs is False


@pytest.mark.parametrize("native", [True, False])
def test_the_compiled_step_reads_one_row_through_linears_that_share_the_models(native):
    """with_one_row_linears: every nn.Linear of the copy is a OneRowLinear on the model's own parameters (the
    model itself is untouched); one row goes through the native kernel or, without it, a contiguous W^T, more
    rows through the linear."""
    import torch.nn.functional as F
    from torch import nn

    from miras_serve.server.decode_graphs import OneRowLinear, with_one_row_linears

    model = small_model("yaad-h")
    with environment("MIRAS_CPU_NATIVE", "1" if native else "0"):
        clone = with_one_row_linears(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    swapped = [m for m in clone.modules() if isinstance(m, OneRowLinear)]
    assert linears and len(swapped) == len(linears)
    assert not any(isinstance(m, OneRowLinear) for m in model.modules())
    assert {id(p) for p in clone.parameters()} == {id(p) for p in model.parameters()}
    for linear, mine in zip(linears, swapped, strict=True):
        assert mine.weight is linear.weight and mine.native == native
        assert native or mine.weight_t.is_contiguous()
        one, rows = torch.randn(1, 1, linear.in_features), torch.randn(3, 1, linear.in_features)
        torch.testing.assert_close(mine(one), F.linear(one, linear.weight, linear.bias), rtol=1e-5, atol=1e-6)
        assert torch.equal(mine(rows), F.linear(rows, linear.weight, linear.bias))
