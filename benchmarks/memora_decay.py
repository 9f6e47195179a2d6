"""What would Eqs. 31-32's in-chunk decay do to a trained Memora? The learned retention gates, measured.

    python -m benchmarks.memora_decay [models/pretrained/memora-tiny] [--tokens 8192]

Memora (models/SPEC.md §5) keeps its retention in the lag step: the chunk's first token maps the memory
through ``c softmax(alpha log(M/c) - eta grad)``, and the chunk's other tokens add their updates undecayed.
Eqs. 31-32 also carry the decay factors ``beta_b / beta_i`` inside the chunk, which would multiply the anchor by
``gamma = prod alpha`` over the chunk's other tokens before the next lag step applies ``alpha log`` again. This
script reads held-out text through the model and reports, per Miras layer, the distribution over (chunk,
head) of that factor: how much of the anchor the in-chunk decay would remove under the gates the model learned.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from miras_serve.models.checkpoint import load_pretrained
from miras_serve.models.train import held_out_stream


def chunk_decays(log_alpha: torch.Tensor, chunk: int) -> torch.Tensor:
    """gamma per (row, head, whole chunk): exp of the sum of log alpha over a chunk's tokens after its first
    (the lag token, whose alpha is its boundary step's). log_alpha: [B, H, T] from position 0."""
    B, H, T = log_alpha.shape
    whole = T // chunk * chunk
    per_chunk = log_alpha[..., :whole].reshape(B, H, -1, chunk)
    return per_chunk[..., 1:].sum(-1).exp().flatten()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default="memora-tiny", help="a Memora model directory or shipped name")
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens to read")
    args = p.parse_args(argv)
    model, tokenizer = load_pretrained(Path(args.model) if Path(args.model).is_dir() else args.model)
    if model.config.retention != "kl":
        raise SystemExit(f"{args.model}: not a Memora model (retention {model.config.retention!r})")
    ids = held_out_stream(tokenizer)[:args.tokens].unsqueeze(0)
    recorded: dict[int, torch.Tensor] = {}
    for index in model.miras_layers:
        mixer = model.blocks[index].mixer

        def gates(x, mixer=mixer, original=mixer.gates, index=index):
            eta, log_alpha, delta = original(x)
            recorded[index] = log_alpha.detach()
            return eta, log_alpha, delta

        mixer.gates = gates
    with torch.no_grad():
        model(ids)
    chunk = model.config.chunk_size
    print(f"{args.model}: in-chunk decay gamma = prod alpha over a chunk's {chunk - 1} tokens after the lag token, "
          f"{args.tokens} held-out tokens")
    print("| layer | mean alpha | gamma p10 | gamma median | gamma p90 |")
    print("|---|---|---|---|---|")
    for index, log_alpha in recorded.items():
        gamma = chunk_decays(log_alpha, chunk)
        p10, p50, p90 = torch.quantile(gamma, torch.tensor([0.1, 0.5, 0.9], dtype=gamma.dtype)).tolist()
        print(f"| {index} | {log_alpha.exp().mean():.4f} | {p10:.3g} | {p50:.3g} | {p90:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
