"""Model configuration: the paper's four design axes plus the Llama macro block.

A config is plain data: it round-trips through ``config.json`` and every field is checked by
:meth:`MirasConfig.validate`, which names the offending field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from miras_serve.kernels.rule import MemoryRule

MODEL_TYPE = "miras"

MEMORY_ARCHITECTURES = ("mlp", "linear")
ATTENTIONAL_BIASES = ("l2", "lp", "huber")
RETENTIONS = ("l2", "lq", "kl")
LEARNING_ALGORITHMS = ("gd",)
LAYER_KINDS = ("M", "A")  # M: Miras memory layer, A: sliding-window attention layer


class ConfigError(ValueError):
    """A config field is missing, unknown or out of range. ``field`` names it."""

    def __init__(self, field_name: str, message: str, source: str | None = None):
        self.field = field_name
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config field '{field_name}': {message}")


@dataclass
class MirasConfig:
    # --- vocabulary and macro block ---
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    mlp_hidden: int = 688  # SwiGLU hidden width
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # --- token mixer shape ---
    n_heads: int = 4
    head_dim: int = 64
    conv_width: int = 4
    gate_rank: int = 32
    # --- axis 1: memory architecture ---
    memory: str = "mlp"  # "mlp": M(x) = x + LN(W_out gelu(W_in x)); "linear": M(x) = W x
    memory_expansion: int = 4
    memory_ln_eps: float = 1e-5
    # Small LN gain at init keeps the memory's first errors (and the lp / huber gradients) O(|v|):
    # with gain 1 the LN output dominates and the outer-loop gradients explode.
    memory_ln_init: float = 0.1
    # --- axis 2: attentional bias ---
    attentional_bias: str = "l2"  # "l2", "lp" (with p), "huber" (with data-dependent delta)
    p: float = 3.0
    # lp's knee r (in units of v's entries): beyond |e_j| = r the gradient grows linearly, not as |e|^(p-1)
    # (models/SPEC.md §4). None: no knee (the unbounded gradient; checkpoints from before the field).
    lp_knee: float | None = None
    # --- axis 3: retention ---
    retention: str = "l2"  # "l2" decay, "lq" (decay + lq-ball normalisation, with q), "kl" (softmax)
    q: float = 4.0
    lq_radius: float = 3.0  # radius of the lq ball, in units of each matrix's initial entry std
    # --- axis 4: learning algorithm ---
    learning_algorithm: str = "gd"
    eta_max: float = 0.1  # eta_t = eta_max * sigmoid(.)
    alpha_bias_init: float = 4.0  # alpha_t = sigmoid(. + bias); 4.0 gives alpha ~ 0.98 at init
    delta_init: float = 1.0  # Yaad's delta_t = softplus(.) with this initial value
    # --- chunked semantics (part of the model: serving must use the training value) ---
    chunk_size: int = 16
    # --- smoothing constants (Moneta's sign and |x| approximations) ---
    sign_sharpness: float = 10.0  # Sign(x) ~ tanh(c x)
    abs_eps: float = 1e-6  # |x| ~ sqrt(x^2 + eps)
    memora_eps: float = 1e-6  # clamp before log in Memora's lag step
    # --- hybrids ---
    layer_pattern: str = "M"  # repeated to n_layers, e.g. "MA" alternates Miras and attention
    swa_window: int = 128
    rope_theta: float = 10000.0  # the RoPE base of the attention layers and of memory_rope
    # RoPE on the Miras memory's q and k, at positions modulo chunk_size (models/SPEC.md §2). False: none, as
    # in the checkpoints that predate the field.
    memory_rope: bool = False
    # --- bookkeeping ---
    preset: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def memory_hidden(self) -> int:
        return self.memory_expansion * self.head_dim

    def memory_rule(self) -> MemoryRule:
        """The memory rule's fields, as the kernels take them."""
        return MemoryRule(memory=self.memory, attentional_bias=self.attentional_bias, retention=self.retention,
                          n_heads=self.n_heads, head_dim=self.head_dim, memory_hidden=self.memory_hidden,
                          chunk_size=self.chunk_size, p=self.p,
                          lp_knee=math.inf if self.lp_knee is None else float(self.lp_knee), q=self.q,
                          lq_radius=self.lq_radius,
                          abs_eps=self.abs_eps, sign_sharpness=self.sign_sharpness, memora_eps=self.memora_eps,
                          memory_ln_eps=self.memory_ln_eps)

    @property
    def inner_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def layer_kinds(self) -> list[str]:
        pattern = self.layer_pattern
        return [pattern[i % len(pattern)] for i in range(self.n_layers)]

    def validate(self, source: str | None = None) -> MirasConfig:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(name, msg, source)

        for name in ("vocab_size", "d_model", "n_layers", "mlp_hidden", "n_heads", "head_dim",
                     "conv_width", "gate_rank", "memory_expansion", "chunk_size", "swa_window"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool), name,
                 f"must be an integer, got {value!r}")
            need(value >= 1, name, f"must be >= 1, got {value}")
        need(self.vocab_size >= 3, "vocab_size", "must be >= 3 (pad, bos, eos)")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            need(isinstance(value, int) and 0 <= value < self.vocab_size, name,
                 f"must be a token id in [0, {self.vocab_size}), got {value!r}")
        need(self.memory in MEMORY_ARCHITECTURES, "memory", f"must be one of {MEMORY_ARCHITECTURES}")
        need(self.attentional_bias in ATTENTIONAL_BIASES, "attentional_bias",
             f"must be one of {ATTENTIONAL_BIASES}")
        need(self.retention in RETENTIONS, "retention", f"must be one of {RETENTIONS}")
        need(self.learning_algorithm in LEARNING_ALGORITHMS, "learning_algorithm",
             f"must be one of {LEARNING_ALGORITHMS}")
        need(1.0 < self.p <= 8.0, "p", f"must be in (1, 8], got {self.p}")
        need(self.lp_knee is None or (isinstance(self.lp_knee, (int, float)) and not isinstance(self.lp_knee, bool)
                                      and math.isfinite(self.lp_knee) and self.lp_knee > 0), "lp_knee",
             f"must be null or a finite number > 0, got {self.lp_knee!r}")
        need(self.lp_knee is None or self.attentional_bias == "lp", "lp_knee", "applies to the 'lp' bias only")
        need(2.0 <= self.q <= 8.0, "q", f"must be in [2, 8], got {self.q}")
        for name in ("lq_radius", "eta_max", "memory_ln_init", "delta_init", "sign_sharpness", "abs_eps", "memora_eps",
                     "norm_eps", "memory_ln_eps", "rope_theta"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and value > 0, name, f"must be > 0, got {value!r}")
        need(self.memory != "linear" or self.retention != "kl", "retention",
             "'kl' (softmax) retention needs the mlp memory")
        need(self.memory != "linear" or self.attentional_bias == "l2", "attentional_bias",
             "the linear memory supports only the 'l2' bias")
        need(self.retention != "kl" or self.attentional_bias == "l2", "attentional_bias",
             "'kl' retention (Memora) is defined with the 'l2' bias")
        need(bool(self.layer_pattern) and all(c in LAYER_KINDS for c in self.layer_pattern),
             "layer_pattern", f"must be a non-empty string of {LAYER_KINDS}, got {self.layer_pattern!r}")
        need(self.head_dim % 2 == 0 or "A" not in self.layer_pattern, "head_dim",
             "must be even for attention layers (RoPE)")
        need(self.conv_width >= 2, "conv_width", "must be >= 2")
        need(isinstance(self.memory_rope, bool), "memory_rope", f"must be a bool, got {self.memory_rope!r}")
        need(self.head_dim % 2 == 0 or not self.memory_rope, "head_dim",
             f"must be even with memory_rope (RoPE rotates pairs), got {self.head_dim}")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = {"model_type": MODEL_TYPE}
        out.update(dataclasses.asdict(self))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> MirasConfig:
        data = dict(data)
        model_type = data.pop("model_type", None)
        if model_type != MODEL_TYPE:
            raise ConfigError("model_type", f"must be '{MODEL_TYPE}', got {model_type!r}", source)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], "unknown field", source)
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, value in data.items():
            if types[name] in ("float", "float | None") and isinstance(value, int) and not isinstance(value, bool):
                data[name] = float(value)
        return cls(**data).validate(source)


# The presets settle the paper's choices for each variant (models/SPEC.md explains each one).
# The Miras presets' numerics (models/SPEC.md §2-§4): a LayerNorm eps that bounds the norm's gain (1/sqrt(eps)
# = 10) and Moneta's gradient linear beyond |e| = 1; no RoPE on the memory's q/k (memory_rope: measured worse at
# this scale, docs/models.md). The dataclass defaults keep the behaviour of the checkpoints that predate these fields.
MIRAS_NUMERICS: dict[str, Any] = dict(memory_ln_eps=1e-2)
PRESETS: dict[str, dict[str, Any]] = {
    "moneta": dict(memory="mlp", attentional_bias="lp", p=3.0, retention="lq", q=4.0, lp_knee=1.0, **MIRAS_NUMERICS),
    "yaad": dict(memory="mlp", attentional_bias="huber", retention="l2", **MIRAS_NUMERICS),
    "memora": dict(memory="mlp", attentional_bias="l2", retention="kl", eta_max=1.0, **MIRAS_NUMERICS),
    "linear": dict(memory="linear", attentional_bias="l2", retention="l2", eta_max=1.0),
}
for _name in ("moneta", "yaad", "memora"):
    PRESETS[f"{_name}-h"] = dict(PRESETS[_name], layer_pattern="MA")
# Baseline only: Transformer++ (full causal attention, the window exceeds every training context).
PRESETS["transformer"] = dict(layer_pattern="A", swa_window=4096)


def preset_config(name: str, **overrides: Any) -> MirasConfig:
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    values = dict(PRESETS[name], preset=name)
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(MirasConfig)}
    for key in values:
        if key not in known:
            raise ConfigError(key, "unknown field")
    return MirasConfig(**values).validate()
