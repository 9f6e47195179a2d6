"""Building blocks: RMSNorm, SwiGLU, the causal short convolution, RoPE, the Miras token mixer and
the sliding-window attention mixer of the hybrids. Each mixer takes its own per-layer state dict
and returns the new one (it never mutates its input)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import factored_scan, factored_scan_pool, memory_scan, memory_scan_pool
from .config import MirasConfig
from .memory import FactoredMemory, KnownStep, factored_fresh, initial_memory, l2_normalise

LayerState = dict[str, Tensor]
LAYOUTS = ("running", "factored")
# The layer-state entries of a factored memory besides its anchor (models/SPEC.md §7).
FACTOR_ENTRIES = ("rows", "row_coef", "row_decay")


def state_layout(cfg: MirasConfig, backend: str) -> str:
    """The one place that chooses how a Miras layer keeps its memory between tokens (models/SPEC.md §7):
    "factored" (the chunk anchor + one factor row per token of the chunk) for the MLP memories, on both
    backends (``backend``: "torch" or "triton"), else "running" (the chunk anchor + the running memory).
    The linear memory stays "running": its d x d matrix is smaller than a chunk of factor rows."""
    if backend not in ("torch", "triton"):
        raise ValueError(f"unknown backend {backend!r}")
    return "factored" if cfg.memory == "mlp" else "running"


def compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the memory, its state, the attention ring and the logits: fp32 whatever the weights'
    dtype (bf16, fp16, fp32), and fp64 for fp64 weights (the truth that precision studies compare against)."""
    return torch.promote_types(torch.float32, weight_dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def short_conv(x: Tensor, weight: Tensor, cache: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Causal depthwise convolution continuing from ``cache`` (the last width-1 inputs).

    x: [B, T, C]; weight: [C, width]; cache: [B, C, width-1]; lengths: [B] valid tokens per row.
    Returns the outputs [B, T, C] and the new cache (the last width-1 *valid* inputs).
    """
    T, C = x.shape[1:]
    width = weight.shape[1]
    # In the tokens' layout [B, width-1+T, C], in the cache's dtype (fp32 state), whatever the weights' dtype.
    full = torch.cat([cache.transpose(1, 2), x.to(cache.dtype)], dim=1)
    taps = weight.to(cache.dtype).t()  # [width, C]
    if T == 1:  # a decode step (a compiled step fuses it)
        out = (full * taps).sum(1, keepdim=True)
    else:
        # One multiply-add per tap over whole rows of channels: on a CPU 2x faster than oneDNN's depthwise
        # convolution in the channels-first layout with its transposes (a 266-token prompt of moneta-tiny: a
        # layer's 0.46 -> 0.22 ms with the SiLU after it), exact to the same sums.
        taps = taps.contiguous()
        out = full[:, :T] * taps[0]
        for j in range(1, width):
            out.addcmul_(full[:, j:j + T], taps[j])
    index = (lengths.view(-1, 1) + torch.arange(width - 1, device=x.device)).unsqueeze(1)  # [B, 1, width-1]
    new_cache = full.transpose(1, 2).gather(2, index.expand(-1, C, -1))
    return out.to(x.dtype), new_cache


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary embedding (rotate-half form). x: [B, H, T, d]; positions: [B, T]."""
    half = x.shape[-1] // 2
    dtype = compute_dtype(x.dtype)
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=dtype) / half)
    angles = positions.to(dtype).unsqueeze(-1) * freqs  # [B, T, half]
    cos, sin = angles.cos().unsqueeze(1).to(x.dtype), angles.sin().unsqueeze(1).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MirasMixer(nn.Module):
    """q/k/v -> short conv -> SiLU -> l2-normalised q, k (-> RoPE, with memory_rope) -> memory write/read ->
    norm, gate, out."""

    def __init__(self, cfg: MirasConfig):
        super().__init__()
        self.cfg = cfg
        H, d, D = cfg.n_heads, cfg.head_dim, cfg.memory_hidden
        inner = cfg.inner_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(3 * inner, cfg.conv_width))
        self.n_gates = 3 if cfg.attentional_bias == "huber" else 2  # eta, alpha (, delta)
        self.gate_down = nn.Linear(cfg.d_model, cfg.gate_rank, bias=False)
        self.gate_up = nn.Linear(cfg.gate_rank, self.n_gates * H, bias=True)
        self.out_norm_weight = nn.Parameter(torch.ones(d))
        self.out_gate = nn.Linear(cfg.d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.d_model, bias=False)
        if cfg.memory == "linear":
            self.mem_init = nn.Parameter(torch.zeros(H, d, d))
        else:
            if cfg.retention == "kl":
                self.mem_logits_in = nn.Parameter(torch.empty(H, D, d))
                self.mem_logits_out = nn.Parameter(torch.empty(H, d, D))
            else:
                self.mem_init_in = nn.Parameter(torch.empty(H, D, d))
                self.mem_init_out = nn.Parameter(torch.empty(H, d, D))
            self.mem_ln_weight = nn.Parameter(torch.full((H, d), cfg.memory_ln_init))
            self.mem_ln_bias = nn.Parameter(torch.zeros(H, d))
        self.reset_memory_parameters()

    @torch.no_grad()
    def reset_memory_parameters(self) -> None:
        cfg = self.cfg
        nn.init.normal_(self.conv_weight, std=1.0 / math.sqrt(cfg.conv_width))
        bias = self.gate_up.bias.view(self.n_gates, cfg.n_heads)
        bias[0].zero_()
        bias[1].fill_(cfg.alpha_bias_init)
        if self.n_gates == 3:
            bias[2].fill_(math.log(math.expm1(cfg.delta_init)))
        if cfg.memory == "mlp":
            self.mem_ln_weight.fill_(cfg.memory_ln_init)
            if cfg.retention == "kl":
                nn.init.normal_(self.mem_logits_in, std=0.5)
                nn.init.normal_(self.mem_logits_out, std=0.5)
            else:
                std_in, std_out = cfg.memory_rule().init_std
                nn.init.normal_(self.mem_init_in, std=std_in)
                nn.init.normal_(self.mem_init_out, std=std_out)

    @property
    def memory_names(self) -> tuple[str, ...]:
        """The memory's matrices, as named in the layer state (``anchor_<name>``, ``mem_<name>``)."""
        return ("w",) if self.cfg.memory == "linear" else ("w_in", "w_out")

    def memory_params(self) -> dict[str, Tensor]:
        return {name: p for name, p in self.named_parameters() if name.startswith("mem_")}

    def ln_params(self) -> tuple[Tensor | None, Tensor | None]:
        if self.cfg.memory == "linear":
            return None, None
        dtype = compute_dtype(self.mem_ln_weight.dtype)
        return self.mem_ln_weight.to(dtype).unsqueeze(1), self.mem_ln_bias.to(dtype).unsqueeze(1)  # [H, 1, d]

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype, layout: str) -> LayerState:
        """A fresh state (position 0) in ``layout`` (see :func:`state_layout`)."""
        cfg = self.cfg
        if layout == "factored" and cfg.memory != "mlp":
            raise ValueError("the factored state layout needs the mlp memory")
        state = {"conv": torch.zeros(batch, 3 * cfg.inner_dim, cfg.conv_width - 1, device=device, dtype=dtype)}
        init = tuple(w.to(device=device, dtype=dtype).unsqueeze(0).expand(batch, *w.shape).clone()
                     for w in initial_memory(cfg, self.memory_params()))
        for name, w in zip(self.memory_names, init, strict=True):
            state[f"anchor_{name}"] = w
            if layout == "running":
                state[f"mem_{name}"] = w.clone()
        if layout == "factored":
            state.update(zip(FACTOR_ENTRIES, factored_fresh(cfg, init)[1:], strict=True))
        return state

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """eta, log alpha (and delta) per head: [B, H, T] each, from a low-rank projection of x."""
        cfg = self.cfg
        raw = self.gate_up(self.gate_down(x.to(self.gate_down.weight.dtype))).to(compute_dtype(x.dtype))
        raw = raw.view(*x.shape[:2], self.n_gates, cfg.n_heads)
        raw = raw.permute(2, 0, 3, 1)  # [gates, B, H, T]
        eta = cfg.eta_max * torch.sigmoid(raw[0])
        log_alpha = F.logsigmoid(raw[1])
        delta = F.softplus(raw[2]) if self.n_gates == 3 else None
        return eta, log_alpha, delta

    def rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        """RoPE on a unit-norm q or k [B, H, T, d] whose first token is at ``pos`` [B], at its position in
        its chunk: chunks sit at absolute positions (models/SPEC.md §5), so every residue is trained and no
        context length rotates by an unseen angle (models/SPEC.md §2)."""
        positions = pos.view(-1, 1) + torch.arange(x.shape[2], device=x.device)
        return rope(x, torch.remainder(positions, self.cfg.chunk_size), self.cfg.rope_theta)

    def forward(self, x: Tensor, state: LayerState, pos: Tensor, valid: Tensor, lengths: Tensor,
                slots: Tensor | None = None, surprise: Tensor | None = None,
                known: KnownStep | None = None) -> tuple[Tensor, LayerState]:
        """With ``slots``, the memory entries of ``state`` are the whole pool, updated in place at rows
        ``slots`` (the other entries are this batch's rows, as without). ``surprise`` [B, T], if given, takes
        each token's memory loss at its chunk's anchor, averaged over the heads (models/SPEC.md §4).
        ``known``: a pool decode step's shape from the host (:func:`models.backend.memory_scan_pool`)."""
        cfg = self.cfg
        B, T, _ = x.shape
        qkv, conv = short_conv(self.qkv(x), self.conv_weight, state["conv"], lengths)
        qkv = F.silu(qkv).view(B, T, 3, cfg.n_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
        # The memory runs in fp32 whatever the weights' dtype (its state is fp32; fp64 weights: fp64).
        qkv = qkv.to(compute_dtype(x.dtype))
        q, k, v = l2_normalise(qkv[0]), l2_normalise(qkv[1]), qkv[2]  # [B, H, T, d]
        if cfg.memory_rope:
            q, k = self.rotate(q, pos), self.rotate(k, pos)
        eta, log_alpha, delta = self.gates(x.to(qkv.dtype))
        names = self.memory_names
        anchor = tuple(state[f"anchor_{n}"] for n in names)
        ln_weight, ln_bias = self.ln_params()
        gates = (q, k, v, eta, log_alpha, delta)
        per_head = None if surprise is None else eta.new_empty(eta.shape)  # [B, H, T]
        new_state = {"conv": conv}
        if "rows" in state:  # the factored layout
            factored = FactoredMemory(anchor, *(state[n] for n in FACTOR_ENTRIES))
            if slots is None:
                out, factored = factored_scan(cfg, factored, pos, *gates, valid, ln_weight, ln_bias, per_head)
            else:
                out = factored_scan_pool(cfg, factored, slots, pos, *gates, lengths, ln_weight, ln_bias, per_head,
                                         known)
            new_state.update(zip((f"anchor_{n}" for n in names), factored.anchor, strict=True))
            new_state.update(zip(FACTOR_ENTRIES, factored[1:], strict=True))
        else:
            memory = tuple(state[f"mem_{n}"] for n in names)
            if slots is None:
                out, anchor, memory = memory_scan(cfg, anchor, memory, pos, *gates, valid, ln_weight, ln_bias,
                                                  per_head)
            else:
                out = memory_scan_pool(cfg, anchor, memory, slots, pos, *gates, lengths, ln_weight, ln_bias, per_head,
                                       known)
            for n, a, m in zip(names, anchor, memory, strict=True):
                new_state[f"anchor_{n}"] = a
                new_state[f"mem_{n}"] = m
        if surprise is not None:
            surprise.copy_(per_head.mean(1))
        out = out.transpose(1, 2)  # [B, T, H, d]
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * self.out_norm_weight
        out = out.to(x.dtype).reshape(B, T, cfg.inner_dim) * F.silu(self.out_gate(x))
        return self.o_proj(out), new_state


class SlidingWindowAttention(nn.Module):
    """Causal attention over the last ``swa_window`` tokens; decode state is a KV ring buffer."""

    def __init__(self, cfg: MirasConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.inner_dim, bias=False)
        self.o_proj = nn.Linear(cfg.inner_dim, cfg.d_model, bias=False)

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype, layout: str) -> LayerState:
        cfg = self.cfg
        shape = (batch, cfg.n_heads, cfg.swa_window, cfg.head_dim)
        return {"k": torch.zeros(shape, device=device, dtype=dtype),
                "v": torch.zeros(shape, device=device, dtype=dtype)}

    def forward(self, x: Tensor, state: LayerState, pos: Tensor, valid: Tensor,
                lengths: Tensor) -> tuple[Tensor, LayerState]:
        cfg = self.cfg
        B, T, _ = x.shape
        W = cfg.swa_window
        device = x.device
        # Attention runs in the ring buffer's dtype (fp32 state), whatever the weights' dtype.
        qkv = self.qkv(x).view(B, T, 3, cfg.n_heads, cfg.head_dim).permute(2, 0, 3, 1, 4).to(state["k"].dtype)
        positions = pos.view(-1, 1) + torch.arange(T, device=device)  # [B, T]
        q = rope(qkv[0], positions, cfg.rope_theta)
        k = rope(qkv[1], positions, cfg.rope_theta)
        v = qkv[2]
        # Ring slot s holds the latest position p < pos with p = s (mod W); it is empty if p < 0.
        slots = torch.arange(W, device=device)
        last = (pos - 1).view(-1, 1)
        slot_pos = last - torch.remainder(last - slots, W)  # [B, W]
        cached = (slot_pos >= 0).unsqueeze(1) & (slot_pos.unsqueeze(1) > positions.unsqueeze(-1) - W)
        t = torch.arange(T, device=device)
        fresh = (t.view(1, -1) <= t.view(-1, 1)) & (t.view(1, -1) > t.view(-1, 1) - W)  # [T, T]
        # Fresh prompts: the ring is empty, attend to the new tokens only. (Decode, T == 1, never asks:
        # reading a device value on the host would break CUDA-graph capture.)
        if T > 1 and bool((pos == 0).all()):
            mask, keys, values = fresh.unsqueeze(0).unsqueeze(0), k, v
        else:
            mask = torch.cat([cached, fresh.unsqueeze(0).expand(B, -1, -1)], dim=-1).unsqueeze(1)
            keys = torch.cat([state["k"], k], dim=2)
            values = torch.cat([state["v"], v], dim=2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        # New ring: slot s takes the latest valid new token j = s - pos (mod W), if there is one.
        lens = lengths.view(-1, 1)
        newest = lens - 1 - torch.remainder(lens - 1 - (slots - pos.view(-1, 1)), W)  # [B, W]
        takes = (newest >= 0).view(B, 1, W, 1)
        gather = newest.clamp(min=0).view(B, 1, W, 1).expand(-1, cfg.n_heads, -1, cfg.head_dim)
        new_state = {"k": torch.where(takes, k.gather(2, gather), state["k"]),
                     "v": torch.where(takes, v.gather(2, gather), state["v"])}
        out = out.transpose(1, 2).reshape(B, T, cfg.inner_dim).to(x.dtype)
        return self.o_proj(out), new_state
