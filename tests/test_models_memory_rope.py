"""RoPE on the Miras memory's q/k (``memory_rope``, models/SPEC.md §2): the invariant holds with it for every
preset with a Miras layer on each state layout, it changes the model, and it rotates by the position in the
chunk, not the absolute position."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL, small_model

from miras_serve import models
from miras_serve.models.config import MirasConfig, preset_config
from miras_serve.models.layers import LAYOUTS, MirasMixer
from miras_serve.models.memory import l2_normalise

CHUNK = SMALL["chunk_size"]
T = 3 * CHUNK + 5  # odd, across three chunk boundaries
MIRAS_PRESETS = [name for name in sorted(models.PRESETS) if "M" in preset_config(name).layer_pattern]
CASES = [(name, layout) for name in MIRAS_PRESETS
         for layout in (LAYOUTS if preset_config(name).memory == "mlp" else ("running",))]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("pool", [False, True], ids=["state", "pool"])
@pytest.mark.parametrize(("preset", "layout"), CASES)
def test_parallel_pass_equals_prompt_then_decode(preset, layout, pool):
    """Prompts of 1, b + 1 and 2b + 3 tokens, then one token per step in one batch (rows at different chunk
    phases, finished rows taking no-op steps), give the logits of one parallel pass over each sequence; with
    ``pool`` the batch continues scattered slots of a state pool (the engine's path)."""
    model = small_model(preset, seed=hash(preset) % 1000, memory_rope=True)
    prompts = torch.tensor([1, CHUNK + 1, 2 * CHUNK + 3])
    ids = torch.randint(0, SMALL["vocab_size"], (3, T))
    slots = torch.tensor([4, 0, 2]) if pool else None
    with torch.no_grad():
        full, _ = model(ids, model.init_state(3, layout=layout))
        state = model.init_state(5 if pool else 3, layout=layout)
        logits, state = model(ids[:, : int(prompts.max())], state, prompts, slots=slots)
        got = [[logits[row, :n]] for row, n in enumerate(prompts.tolist())]
        for t in range(T - int(prompts.min())):
            at = prompts + t  # each row's next position
            active = at < T
            step_ids = ids.gather(1, at.clamp(max=T - 1).view(-1, 1))
            logits, state = model(step_ids, state, active.long(), slots=slots)
            for row in active.nonzero().flatten().tolist():
                got[row].append(logits[row])
    for row in range(3):
        err = relative_error(torch.cat(got[row]), full[row])
        assert err <= 1e-4, f"{preset} ({layout}), row {row}: relative error {err:.2e}"


def test_rotation_changes_the_logits():
    """Same weights (RoPE adds no parameter): the first token (angle 0) is unchanged, the rest are not."""
    plain, rotated = small_model("moneta", seed=3), small_model("moneta", seed=3, memory_rope=True)
    for a, b in zip(plain.state_dict().values(), rotated.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 2 * CHUNK + 1))
    with torch.no_grad():
        before, after = plain(ids)[0], rotated(ids)[0]
    torch.testing.assert_close(after[:, 0], before[:, 0])
    assert relative_error(after[:, 1:], before[:, 1:]) > 1e-3


def test_rotation_is_by_the_position_in_the_chunk():
    mixer = MirasMixer(preset_config("moneta", **SMALL, memory_rope=True))
    x = l2_normalise(torch.randn(1, SMALL["n_heads"], 3, SMALL["head_dim"])).expand(3, -1, -1, -1)
    rotated = mixer.rotate(x, torch.tensor([1, 1 + 5 * CHUNK, 2]))
    torch.testing.assert_close(rotated[1], rotated[0])  # a whole number of chunks apart: the same angles
    assert relative_error(rotated[2], rotated[0]) > 1e-2  # one token apart: not
    torch.testing.assert_close(rotated.norm(dim=-1), torch.ones(3, SMALL["n_heads"], 3))  # still unit norm


def test_continuations_a_whole_number_of_chunks_apart_agree():
    """A Miras-only model sees a position only through its chunk phase: the same state moved 2b positions on
    continues with the same logits (absolute positions would rotate the new keys by other angles)."""
    model = small_model("moneta", memory_rope=True)
    more = torch.randint(0, SMALL["vocab_size"], (1, 2 * CHUNK + 1))
    with torch.no_grad():
        _, state = model(torch.randint(0, SMALL["vocab_size"], (1, 3)))
        later = state.clone()
        later.pos += 2 * CHUNK
        torch.testing.assert_close(model(more, later)[0], model(more, state)[0])


def test_config_field():
    assert MirasConfig().memory_rope is False
    old = preset_config("moneta").to_dict()
    del old["memory_rope"]  # a config.json from before the field: no rotation
    assert MirasConfig.from_dict(old).memory_rope is False
    on = preset_config("moneta", memory_rope=True)
    assert MirasConfig.from_dict(on.to_dict()).memory_rope is True
    with pytest.raises(models.ConfigError, match="'memory_rope'"):
        MirasConfig.from_dict({**on.to_dict(), "memory_rope": 1})
    with pytest.raises(models.ConfigError, match="'head_dim'.*memory_rope"):
        preset_config("moneta", head_dim=7, memory_rope=True)
    assert preset_config("moneta", head_dim=7).head_dim == 7  # odd is fine without any rotation
