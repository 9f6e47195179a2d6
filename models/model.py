"""The Miras language model (Llama macro block) and its fixed-size decoding state."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backend import backend_for
from .config import MirasConfig
from .layers import (
    FACTOR_ENTRIES,
    LAYOUTS,
    LayerState,
    MirasMixer,
    RMSNorm,
    SlidingWindowAttention,
    SwiGLU,
    compute_dtype,
    state_layout,
)
from .memory import KnownStep


@dataclass
class ModelState:
    """Everything decoding needs, for a batch of sequences; its size does not depend on their length.

    ``pos[b]`` counts the tokens sequence ``b`` has consumed; ``layers[i]`` holds layer ``i``'s
    tensors, each with the batch as its first dim (Miras layers: short-conv cache, chunk anchor and,
    in the "running" layout, the running memory, or in the "factored" layout the chunk's factor rows,
    their coefficients and decay; attention layers: a KV ring buffer of the window).
    """

    pos: Tensor
    layers: list[LayerState]

    @property
    def batch_size(self) -> int:
        return int(self.pos.shape[0])

    @property
    def layout(self) -> str:
        """How the Miras layers keep their memory: "factored" or "running" (models.layers.state_layout)."""
        return "factored" if any("rows" in layer for layer in self.layers) else "running"

    def tensors(self) -> list[Tensor]:
        return [self.pos] + [t for layer in self.layers for t in layer.values()]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def nbytes_per_sequence(self) -> int:
        return self.nbytes() // max(self.batch_size, 1)

    def _map(self, fn) -> ModelState:
        return ModelState(fn(self.pos), [{k: fn(t) for k, t in layer.items()} for layer in self.layers])

    def clone(self) -> ModelState:
        return self._map(lambda t: t.clone())

    def detach(self) -> ModelState:
        return self._map(lambda t: t.detach())

    def to(self, device: torch.device | str) -> ModelState:
        return self._map(lambda t: t.to(device))

    def select(self, index: Tensor | Sequence[int], whole: frozenset[str] = frozenset()) -> ModelState:
        """A new state holding rows ``index`` (repeat a row to fork a sequence); layer entries named in
        ``whole`` are passed through unselected."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.pos.device)
        layers = [{k: t if k in whole else t.index_select(0, index) for k, t in layer.items()}
                  for layer in self.layers]
        return ModelState(self.pos.index_select(0, index), layers)

    def assign(self, index: Tensor | Sequence[int], other: ModelState, skip: frozenset[str] = frozenset()) -> None:
        """In place: rows ``index`` of this state take the rows of ``other`` (a state pool's write);
        layer entries named in ``skip`` are left alone."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.pos.device)
        self.pos.index_copy_(0, index, other.pos)
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            for name, t in mine.items():
                if name not in skip:
                    t.index_copy_(0, index, theirs[name].to(t.dtype))

    @staticmethod
    def cat(states: Sequence[ModelState]) -> ModelState:
        layers = [{k: torch.cat([s.layers[i][k] for s in states]) for k in states[0].layers[i]}
                  for i in range(len(states[0].layers))]
        return ModelState(torch.cat([s.pos for s in states]), layers)


# Layer-state entries that the slot-pool forward updates in place instead of gathering them.
POOLED = frozenset(f"{kind}_{name}" for kind in ("anchor", "mem") for name in ("w", "w_in", "w_out")) | frozenset(
    FACTOR_ENTRIES)


class Block(nn.Module):
    def __init__(self, cfg: MirasConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MirasMixer(cfg) if kind == "M" else SlidingWindowAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x: Tensor, state: LayerState, pos: Tensor, valid: Tensor, lengths: Tensor,
                slots: Tensor | None = None, surprise: Tensor | None = None,
                known: KnownStep | None = None) -> tuple[Tensor, LayerState]:
        # Only the Miras memory is updated in place in a pool (see MirasLM.forward), and only it has a surprise.
        extra = {"slots": slots, "known": known} if slots is not None and self.kind == "M" else {}
        if surprise is not None:
            extra["surprise"] = surprise
        h, state = self.mixer(self.mixer_norm(x), state, pos, valid, lengths, **extra)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), state


class MirasLM(nn.Module):
    def __init__(self, cfg: MirasConfig):
        super().__init__()
        self.config = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in cfg.layer_kinds)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("o_proj", "down")) else 0.02
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            if isinstance(block.mixer, MirasMixer):
                block.mixer.reset_memory_parameters()

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def miras_layers(self) -> list[int]:
        """The indices of the Miras layers (those with a memory, hence a surprise), in order."""
        return [i for i, kind in enumerate(self.config.layer_kinds) if kind == "M"]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   layout: str | None = None) -> ModelState:
        """A fresh state (position 0) for ``batch_size`` sequences; memory state is fp32 (fp64 for fp64
        weights). ``layout`` (default: the one the device's backend runs, :func:`models.layers.state_layout`)
        is "factored" or "running" (both backends run either, e.g. to compare the two)."""
        device = torch.device(device) if device is not None else self.device
        if layout is None:
            layout = state_layout(self.config, backend_for(device.type))
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        dtype = compute_dtype(self.embed.weight.dtype)
        layers = [block.mixer.init_state(batch_size, device, dtype, layout) for block in self.blocks]
        return ModelState(torch.zeros(batch_size, dtype=torch.long, device=device), layers)

    def reset_slots(self, pool: ModelState, slots: Tensor | Sequence[int]) -> None:
        """In place: rows ``slots`` of a state pool become fresh sequences (position 0)."""
        slots = torch.as_tensor(slots, dtype=torch.long, device=pool.pos.device)
        pool.assign(slots, self.init_state(int(slots.numel()), pool.pos.device, pool.layout))

    def forward(self, input_ids: Tensor, state: ModelState | None = None, lengths: Tensor | None = None,
                slots: Tensor | None = None, surprise: Tensor | None = None,
                known: KnownStep | None = None, last_only: bool = False) -> tuple[Tensor, ModelState]:
        """Process ``input_ids`` [B, T] continuing from ``state`` (None: fresh sequences).

        ``lengths[b]`` (default T) is the number of real tokens in row b; the rest of the row is
        padding that changes nothing. Returns logits [B, T, vocab] (fp32; fp64 for fp64 weights) and the new
        state; the input state is not modified.

        With ``slots`` [B], ``state`` is a pool of sequences (``init_state(max_num_seqs)``): row b of
        the batch continues pool row ``slots[b]``, which is updated in place, and the pool is returned.

        ``surprise`` [B, T, len(miras_layers)], if given, takes each token's surprise in each Miras layer: the
        memory's attentional-bias loss on the token before its update, at its chunk's anchor, averaged over
        the heads (models/SPEC.md §4; padding and skipped rows: unspecified). None: nothing is computed.

        ``known`` (a pool decode step: one token per row, every slot live): whether a row starts a chunk and
        how many factor rows to read, from the host (:class:`models.memory.KnownStep`); the step then reads no
        device value on the host, so that it compiles into one graph (server/decode_graphs.py).

        ``last_only``: logits [B, 1, vocab] at each row's last real token only, what a prefill samples from
        (the output projection is the largest product of a small model: a fifth of moneta-tiny's FLOPs per token).
        """
        if known is not None and (slots is None or input_ids.shape[1] != 1):
            raise ValueError("known is for one-token steps through a state pool (slots)")
        if slots is not None:
            if state is None:
                raise ValueError("slots need a state pool")
            slots = slots.to(device=state.pos.device, dtype=torch.long)
            # The Miras memory (most of the state) is read and written in place by the memory scan;
            # the small entries (position, conv cache, attention ring) go through gather and scatter.
            logits, new_state = self._forward(input_ids, state.select(slots, whole=POOLED), lengths, slots, surprise,
                                              known, last_only)
            state.assign(slots, new_state, skip=POOLED)
            return logits, state
        return self._forward(input_ids, state, lengths, None, surprise, last_only=last_only)

    def _forward(self, input_ids: Tensor, state: ModelState | None, lengths: Tensor | None,
                 slots: Tensor | None, surprise: Tensor | None,
                 known: KnownStep | None = None, last_only: bool = False) -> tuple[Tensor, ModelState]:
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids must hold at least one token per row")
        device = input_ids.device
        if state is None:
            state = self.init_state(B, device)
        if state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} sequences but input_ids has {B} rows")
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=device)
        lengths = lengths.to(device=device, dtype=torch.long)
        valid = torch.arange(T, device=device).view(1, -1) < lengths.view(-1, 1)
        x = self.embed(input_ids)
        new_layers = []
        columns = iter(range(len(self.miras_layers)))
        for block, layer_state in zip(self.blocks, state.layers, strict=True):
            mine = surprise[..., next(columns)] if surprise is not None and block.kind == "M" else None
            x, layer_state = block(x, layer_state, state.pos, valid, lengths, slots, mine, known)
            new_layers.append(layer_state)
        if last_only:
            last = (lengths - 1).clamp(min=0).view(B, 1, 1).expand(B, 1, x.shape[-1])
            x = x.gather(1, last)
        logits = self.lm_head(self.norm(x)).to(compute_dtype(x.dtype))
        return logits, ModelState(state.pos + lengths, new_layers)
