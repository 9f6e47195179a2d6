"""The model side of the kernel tests and of the GPU check (benchmarks/gpu_check.py): the rules they run (small
configs of the presets and combinations the presets do not use), the reference every kernel check compares
against, and the whole-model invariant on the Triton backend. kernels/testing.py holds the kernel-level checks,
which know nothing of the model."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from miras_serve.kernels import naive
from miras_serve.kernels.testing import RuleCase, rel_err
from miras_serve.models.backend import forced_backend
from miras_serve.models.config import MirasConfig, preset_config
from miras_serve.models.memory import memory_scan
from miras_serve.models.model import MirasLM

# Every rule and boundary step, plus combinations the presets do not use.
RULES = {
    # the preset's bounded lp gradient: the random errors (entries ~N(0, 2)) lie on both sides of its knee (1.0)
    "moneta": dict(preset="moneta"),
    # the unbounded lp gradient of the checkpoints that predate the knee
    "moneta-no-knee": dict(preset="moneta", lp_knee=None),
    "yaad": dict(preset="yaad"),
    "memora": dict(preset="memora"),
    "linear": dict(preset="linear"),
    "mlp-lp-l2": dict(preset="moneta", retention="l2"),
    "mlp-huber-lq": dict(preset="yaad", retention="lq", q=3.0),
    "linear-lq": dict(preset="linear", retention="lq", lq_radius=0.5),
}

# The padded prompt checks of every rule run one head: the interpreter runs the slab-parallel prefill a program per
# (slab, head, row) and phase. Two heads run the same kernels in the decode and varlen checks and in every preset's
# model test (tests/test_kernels_model.py).
PROMPT_HEADS = 1


def rule_config(name: str, **overrides) -> MirasConfig:
    """Rule ``name`` of :data:`RULES` at the interpreter's shapes (head dim 8, 2 heads, chunk 4)."""
    spec = dict(RULES[name])
    return preset_config(spec.pop("preset"), **{**dict(head_dim=8, n_heads=2, chunk_size=4), **spec, **overrides})


def reference_scan(cfg: MirasConfig) -> Callable[..., tuple]:
    """The reference every kernel test compares against (the one place that chooses it): the plain per-token
    recurrence written from the equations (kernels/naive.py, itself held to the chunked spec models.memory by
    tests/test_kernels_naive.py), with the rule bound."""
    return partial(naive.memory_scan, cfg.memory_rule())


def rule_case(cfg: MirasConfig) -> RuleCase:
    """What the kernel checks take for a config: its memory rule, its gates' learning-rate scale, the reference."""
    return RuleCase(cfg.memory_rule(), cfg.eta_max, reference_scan(cfg))


def spec_case(cfg: MirasConfig) -> RuleCase:
    """:func:`rule_case` with the chunked spec (models.memory.memory_scan, held to the per-token reference by
    tests/test_kernels_naive.py) as the reference: for the GPU check's 340M-shape sections, where a loop over
    rows, heads and tokens would launch millions of tiny GPU ops."""
    return RuleCase(cfg.memory_rule(), cfg.eta_max, partial(memory_scan, cfg))


@torch.inference_mode()
def check_model_invariant(model: MirasLM, ids: Tensor, prompt: int) -> dict[str, float]:
    """With the Triton backend: one parallel pass equals a prefill of ``prompt`` tokens followed by
    one-token decode steps (logits and final state), and equals the PyTorch backend's parallel pass."""
    with forced_backend("triton"):
        full, full_state = model(ids)
        logits, state = model(ids[:, :prompt])
        steps = [logits]
        for t in range(prompt, ids.shape[1]):
            logits, state = model(ids[:, t:t + 1], state)
            steps.append(logits)
    with forced_backend("torch"):
        reference, _ = model(ids)
    errors = {"logits: prefill + decode vs parallel": rel_err(full, torch.cat(steps, dim=1)),
              "logits: triton vs torch": rel_err(reference, full)}
    for i, (layer_a, layer_b) in enumerate(zip(full_state.layers, state.layers, strict=True)):
        for name, t in layer_a.items():
            errors[f"layer {i} {name}"] = rel_err(t, layer_b[name])
    return errors
