"""Does the memory use context beyond its training window? Per-position loss to 16K tokens, full vs reset.

    python -m benchmarks.long_context models/pretrained/* models/baselines/* [--tokens 16384]

Every model reads the held-out split (models/corpus.py: the last 5% of every work, in corpus order, the
works joined by EOS as training evaluates them) cut into consecutive sequences of ``--tokens`` tokens, all
of them in one batch. Two readings of the same tokens, in the same segments of the model's training window
(``training.json``'s ``seq_len``): with the full context (the state carried from segment to segment) and
with the state reset at every segment start (what the model saw in training). Per band of positions the
mean next-token loss of both and their perplexities; the result goes to ``long_context.json`` in the model
directory, which ``benchmarks.models_doc`` turns into the table of docs/models.md.

Caveat, stated with the numbers: a held-out tail is about 2K tokens of one work, so past ~2K tokens a
sequence continues with another work; what the full context can still carry there is the author's
vocabulary, names that recur across works and the verse layout.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from miras_serve.models.checkpoint import load_pretrained
from miras_serve.models.model import MirasLM
from miras_serve.models.train import held_out_stream

RESULT_FILE = "long_context.json"
BAND_EDGES = (0, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def bands(tokens: int) -> list[tuple[int, int]]:
    """The position bands [lo, hi) that fit in ``tokens``, doubling in width."""
    return [(lo, hi) for lo, hi in zip(BAND_EDGES, BAND_EDGES[1:], strict=False) if hi <= tokens]


@torch.no_grad()
def per_position_loss(model: MirasLM, batch: torch.Tensor, window: int, carry: bool) -> torch.Tensor:
    """Next-token loss [B, T] of ``batch`` [B, T + 1], read in segments of ``window`` tokens, the state carried
    across segments (``carry``) or fresh at each segment start."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    losses, state = [], None
    for start in range(0, inputs.shape[1], window):
        logits, next_state = model(inputs[:, start:start + window], state if carry else None)
        state = next_state
        part = targets[:, start:start + window]
        losses.append(F.cross_entropy(logits.transpose(1, 2), part, reduction="none"))
    return torch.cat(losses, dim=1)


def measure(directory: Path, tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    training = json.loads((directory / "training.json").read_text())
    window = int(training["args"]["seq_len"])
    model, tokenizer = load_pretrained(directory)
    stream = held_out_stream(tokenizer)
    count = (len(stream) - 1) // tokens
    if count < 1:
        raise SystemExit(f"the held-out split has {len(stream)} tokens, fewer than one sequence of {tokens}")
    batch = torch.stack([stream[i * tokens:i * tokens + tokens + 1] for i in range(count)])
    full = per_position_loss(model, batch, window, carry=True)
    reset = per_position_loss(model, batch, window, carry=False)
    rows = []
    for lo, hi in bands(tokens):
        f, r = full[:, lo:hi].mean().item(), reset[:, lo:hi].mean().item()
        rows.append({"from": lo, "to": hi, "full_loss": f, "reset_loss": r,
                     "full_ppl": math.exp(f), "reset_ppl": math.exp(r)})
    return {"model": directory.name, "window": window, "sequences": count, "tokens": tokens, "bands": rows}


def table(results: list[dict]) -> list[str]:
    """Markdown: one row per model, per band the full-context perplexity over the reset one (and the ratio)."""
    if not results:
        return []
    spans = [(row["from"], row["to"]) for row in results[0]["bands"]]
    label = [f"{lo // 1024}K-{hi // 1024}K" if lo >= 1024 else f"{lo}-{hi if hi < 1024 else '1K'}" for lo, hi in spans]
    lines = ["| model | window | " + " | ".join(label) + " |", "|---|---|" + "---|" * len(spans)]
    for result in results:
        cells = [f"{b['full_ppl']:.1f} / {b['reset_ppl']:.1f} ({b['full_ppl'] / b['reset_ppl']:.3f})"
                 for b in result["bands"]]
        lines.append(f"| `{result['model']}` | {result['window']} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="model directories with weights and training.json")
    p.add_argument("--tokens", type=int, default=16384, help="length of each held-out sequence")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    results = []
    for directory in args.dirs:
        result = measure(directory, args.tokens, args.threads)
        (directory / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        results.append(result)
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
