"""The invariant: a parallel pass, or a prefill then token-by-token decoding, in any batch, gives the same logits."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL, small_model

from miras_serve import models
from miras_serve.models.layers import state_layout
from miras_serve.models.memory import FactoredMemory, fold_rows

CHUNK = SMALL["chunk_size"]
PREFILLS = [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]  # across chunk boundaries
T = 3 * CHUNK + 9


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("preset", sorted(models.PRESETS))
def test_parallel_pass_equals_prefill_then_decode(preset):
    model = small_model(preset, seed=hash(preset) % 1000)
    ids = torch.randint(0, SMALL["vocab_size"], (3, T))
    lengths = torch.tensor([T, T - 5, T - 11])  # a batch of different lengths (right padding)
    with torch.no_grad():
        full, _ = model(ids, lengths=lengths)
        for prefill in PREFILLS:
            logits, state = model(ids[:, :prefill], lengths=lengths.clamp(max=prefill))
            steps = [logits]
            for t in range(prefill, T):
                step_lengths = (lengths > t).long()  # finished rows take a no-op step
                logits, state = model(ids[:, t:t + 1], state, lengths=step_lengths)
                steps.append(logits)
            incremental = torch.cat(steps, dim=1)
            for row, n in enumerate(lengths.tolist()):
                err = relative_error(incremental[row, :n], full[row, :n])
                assert err <= 1e-4, f"{preset}: prefill {prefill}, row {row}: relative error {err:.2e}"
            assert state.pos.tolist() == lengths.tolist()


@pytest.mark.parametrize("preset", ["moneta", "yaad-h"])
def test_last_only_logits_are_each_rows_last_and_the_state_is_the_same(preset):
    """``last_only`` (what a prefill samples from): [B, 1, vocab] at each row's last real token, equal to the full
    pass's there, through a pool too; the state is the one the full pass leaves."""
    model = small_model(preset, seed=3)
    ids = torch.randint(0, SMALL["vocab_size"], (3, T))
    lengths = torch.tensor([T, CHUNK + 1, 1])
    with torch.no_grad():
        full, full_state = model(ids, lengths=lengths)
        last, last_state = model(ids, lengths=lengths, last_only=True)
        pool = model.init_state(4)
        pooled, _ = model(ids, pool, lengths=lengths, slots=torch.tensor([2, 0, 3]), last_only=True)
    assert last.shape == pooled.shape == (3, 1, full.shape[-1])
    for row, n in enumerate(lengths.tolist()):
        assert relative_error(last[row, 0], full[row, n - 1]) <= 1e-5
        assert relative_error(pooled[row, 0], full[row, n - 1]) <= 1e-5
    for mine, theirs in zip(last_state.tensors(), full_state.tensors(), strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("preset", ["moneta", "memora-h"])
def test_rows_at_different_positions_batch_together(preset):
    """Continuing sequences whose chunk phases differ, in one batch, equals continuing each alone."""
    model = small_model(preset)
    with torch.no_grad():
        states = [model(torch.randint(0, SMALL["vocab_size"], (1, n)))[1] for n in (3, 8, 13)]
        more = torch.randint(0, SMALL["vocab_size"], (3, 6))
        batched, batched_state = model(more, models.ModelState.cat(states))
        for row, state in enumerate(states):
            alone, alone_state = model(more[row:row + 1], state)
            assert relative_error(batched[row], alone[0]) <= 1e-5
            for mine, theirs in zip(batched_state.select([row]).tensors(), alone_state.tensors(), strict=True):
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_state_size_does_not_grow_with_context():
    model = small_model("moneta-h")
    with torch.no_grad():
        _, short = model(torch.randint(0, SMALL["vocab_size"], (2, 3)))
        _, long = model(torch.randint(0, SMALL["vocab_size"], (2, 5 * SMALL["swa_window"] + 7)))
    assert short.nbytes() == long.nbytes() > 0
    assert short.nbytes_per_sequence() * 2 == short.nbytes()


def test_state_fork_copy_and_pool():
    model = small_model("yaad-h")
    prompt = torch.randint(0, SMALL["vocab_size"], (1, 7))
    nxt = torch.randint(0, SMALL["vocab_size"], (2, 1))
    with torch.no_grad():
        _, state = model(prompt)
        forked = state.select([0, 0])  # one prefill, two continuations
        forked_logits, _ = model(nxt, forked)
        for row in range(2):
            alone, _ = model(nxt[row:row + 1], state.clone())
            torch.testing.assert_close(forked_logits[row], alone[0])
        # A pool: rows continue in place through slot indices; other rows stay bit-identical.
        pool = model.init_state(5)
        model.reset_slots(pool, [1, 3])
        pool.assign([3], state)
        before = pool.clone()
        pooled_logits, same_pool = model(nxt, pool, slots=torch.tensor([3, 1]))
        assert same_pool is pool
        expected, expected_state = model(nxt[:1], state)
        torch.testing.assert_close(pooled_logits[0], expected[0])
        torch.testing.assert_close(pool.select([3]).tensors()[1], expected_state.tensors()[1])
        for untouched in (0, 2, 4):
            for a, b in zip(pool.select([untouched]).tensors(), before.select([untouched]).tensors(), strict=True):
                assert torch.equal(a, b)
        assert state.to("cpu").nbytes() == state.nbytes()


def test_bad_calls_raise_clear_errors():
    model = small_model("moneta")
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.zeros(1, 0, dtype=torch.long))
    _, state = model(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="state holds 2 sequences"):
        model(torch.zeros(3, 1, dtype=torch.long), state)
    with pytest.raises(models.ConfigError, match="unknown preset"):
        models.from_preset("mamba")
    with pytest.raises(models.ConfigError, match="'chunk_size'"):
        models.from_preset("moneta", chunk_size=0)
    with pytest.raises(models.ConfigError, match="'no_such_field'"):
        models.from_preset("moneta", no_such_field=1)


@pytest.mark.parametrize("slots", [[4, 2, 3], [5, 1, 3]])  # one run of slots (in any order), or scattered
def test_pool_forward_equals_plain_forward(slots):
    model = small_model("moneta-h")
    ids = torch.randint(0, SMALL["vocab_size"], (3, 2 * CHUNK + 3))
    with torch.no_grad():
        plain, plain_state = model(ids[:, :-1])
        plain_next, plain_state = model(ids[:, -1:], plain_state)
        pool = model.init_state(7)
        model.reset_slots(pool, slots)
        before = pool.clone()
        index = torch.tensor(slots)
        pooled, _ = model(ids[:, :-1], pool, slots=index)
        pooled_next, _ = model(ids[:, -1:], pool, slots=index)
    torch.testing.assert_close(pooled, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled_next, plain_next, rtol=1e-5, atol=1e-6)
    for a, b in zip(pool.select(index).tensors(), plain_state.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    others = [s for s in range(7) if s not in slots]
    for a, b in zip(pool.select(others).tensors(), before.select(others).tensors(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("preset", ["moneta", "yaad", "memora", "yaad-h"])
def test_factored_and_running_layouts_decode_alike(preset):
    """Through a state pool on the PyTorch backend, the factored layout (the default for the MLP memories)
    and the running-memory layout give the same logits and memories: prompts of different lengths into
    scattered slots, then decode steps across chunk boundaries with rows at different phases, a finished
    row taking no-op steps and the batch order shuffled; slots outside the batch stay bit-identical."""
    model = small_model(preset, seed=7)
    slots = torch.tensor([5, 1, 3])
    lengths = torch.tensor([CHUNK + 2, 1, 2 * CHUNK])
    ids = torch.randint(0, SMALL["vocab_size"], (3, int(lengths.max()) + 2 * CHUNK + 1))
    pools, logits = {}, {}
    with torch.no_grad():
        for layout in ("running", "factored"):
            pool = pools[layout] = model.init_state(7, layout=layout)
            assert pool.layout == layout
            before = pool.clone()
            prefill = model(ids[:, : int(lengths.max())], pool, lengths, slots=slots)[0]
            steps = [prefill[row, :n] for row, n in enumerate(lengths.tolist())]  # padding has no meaning
            order = torch.tensor([2, 0, 1])
            for t in range(2 * CHUNK + 1):
                step_ids = (ids.gather(1, (lengths + t).view(-1, 1)))[order]
                active = torch.tensor([1, 1, int(t < CHUNK)])  # row 2 finishes after a chunk
                step = model(step_ids, pool, active[order], slots=slots[order])[0][order.argsort()]
                steps.append(step[active.bool()])
            logits[layout] = steps
            others = torch.tensor([0, 2, 4, 6])
            for a, b in zip(pool.select(others).tensors(), before.select(others).tensors(), strict=True):
                assert torch.equal(a, b)
    for running, factored in zip(logits["running"], logits["factored"], strict=True):
        assert relative_error(factored, running) <= 1e-5
    assert pools["running"].pos.tolist() == pools["factored"].pos.tolist()
    for mine, ref in zip(pools["factored"].layers, pools["running"].layers, strict=True):
        if "rows" not in mine:
            continue
        state = FactoredMemory((mine["anchor_w_in"], mine["anchor_w_out"]), mine["rows"], mine["row_coef"],
                               mine["row_decay"])
        for got, want in zip((*state.anchor, *fold_rows(state)),
                             (ref["anchor_w_in"], ref["anchor_w_out"], ref["mem_w_in"], ref["mem_w_out"]), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_state_layout_is_chosen_per_memory_and_backend():
    """models.layers.state_layout is the one choice: factored for the MLP memories on the PyTorch backend,
    running for the linear memory (and, for now, the Triton kernels); init_state follows it or an explicit
    layout, and refuses a layout the memory cannot hold."""
    mlp, linear = small_model("moneta"), small_model("linear")
    assert state_layout(mlp.config, "torch") == "factored" and state_layout(linear.config, "torch") == "running"
    assert mlp.init_state(2).layout == "factored" and linear.init_state(2).layout == "running"
    assert mlp.init_state(2, layout="running").layout == "running"
    factored = mlp.init_state(3).layers[0]
    d, D, b = SMALL["head_dim"], 4 * SMALL["head_dim"], CHUNK
    assert factored["rows"].shape == (3, SMALL["n_heads"], b, 2 * (D + d))
    assert not factored["row_coef"].any() and bool((factored["row_decay"] == 1).all())
    with pytest.raises(ValueError, match="factored state layout needs the mlp memory"):
        linear.init_state(1, layout="factored")
    with pytest.raises(ValueError, match="layout must be one of"):
        mlp.init_state(1, layout="rows")
