"""The memory rule as the kernels see it: plain, frozen data (built from a model config by
``models.config.MirasConfig.memory_rule``). The kernels take this and tensors, nothing of the model."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Codes of the config's categorical choices, as the kernels' compile-time switches (Triton constexprs, the
# native CPU kernel's arguments).
MEMORY_CODES = {"mlp": 0, "linear": 1}
BIAS_CODES = {"l2": 0, "lp": 1, "huber": 2}
RETENTION_CODES = {"l2": 0, "lq": 1, "kl": 2}


@dataclass(frozen=True)
class MemoryRule:
    # memory architecture: "mlp" (M(x) = x + LN(W_out gelu(W_in x))) or "linear" (M(x) = W x)
    memory: str
    attentional_bias: str  # "l2", "lp" (exponent p) or "huber" (data-dependent delta)
    retention: str  # "l2" decay, "lq" (decay + lq-ball normalisation, exponent q) or "kl" (softmax)
    n_heads: int
    head_dim: int
    memory_hidden: int  # the MLP memory's hidden width D (unused by the linear memory)
    chunk_size: int  # tokens per chunk: gradients are taken at the chunk's anchor
    p: float
    lp_knee: float  # lp's knee r: beyond |e_j| = r its gradient grows linearly (+inf: no knee)
    q: float
    lq_radius: float  # radius of the lq ball, in units of each matrix's initial entry std
    abs_eps: float  # |x| ~ sqrt(x^2 + eps)
    sign_sharpness: float  # Sign(x) ~ tanh(c x)
    memora_eps: float  # clamp before log in Memora's lag step
    memory_ln_eps: float

    @property
    def init_std(self) -> tuple[float, ...]:
        """Entry scale of each memory matrix at initialisation: W_in (and the linear W) read unit-norm keys,
        so std 1 gives O(1) pre-activations; W_out reads D hidden units, so std 1/sqrt(D)."""
        if self.memory == "linear":
            return (1.0,)
        return (1.0, 1.0 / math.sqrt(self.memory_hidden))
