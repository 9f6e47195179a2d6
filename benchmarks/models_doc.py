"""Write models.md into ``--out`` (default: docs/ of this checkout) from trained model directories (their
training.json, config.json, long_context.json and, for shipped models, samples from their weights).

    python -m benchmarks.models_doc models/pretrained/* models/baselines/* models/ablations/*

Hand-written text after the line ``<!-- notes -->`` in an existing output file is kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from benchmarks import long_context as long_context_bench
from benchmarks import report
from miras_serve.models.checkpoint import load_pretrained
from miras_serve.models.train import sample

SAMPLE_PROMPT = "KING.\n"
NOTES_MARKER = "<!-- notes -->"


ROLES = {"pretrained": "shipped", "baselines": "baseline", "ablations": "ablation"}


def role(directory: Path) -> str:
    """shipped (models/pretrained), baseline (models/baselines) or ablation (models/ablations)."""
    return ROLES.get(directory.resolve().parent.name, "baseline")


def numerics(config: dict) -> str:
    """The memory's numerics choices of a config (models/SPEC.md §2-§4), '-' where the model has no memory."""
    if "M" not in config.get("layer_pattern", "M"):
        return "-"
    parts = [f"RoPE {'on' if config.get('memory_rope') else 'off'}"]
    if config.get("memory") == "mlp":
        parts.append(f"eps {config['memory_ln_eps']:g}")
    if config.get("attentional_bias") == "lp":
        knee = config.get("lp_knee")
        parts.append(f"knee {knee:g}" if knee is not None else "no knee")
    return ", ".join(parts)


def side_by_side(trained: dict[str, dict], long_context: dict[str, dict]) -> list[str]:
    """Each ablation against the shipped model whose name it extends (same recipe, one choice changed)."""
    lines = []
    for name, training in trained.items():
        if training["role"] != "ablation":
            continue
        bases = [b for b in trained if trained[b]["role"] == "shipped" and name.startswith(b + "-")]
        if not bases:
            continue
        base = max(bases, key=len)
        ppl, base_ppl = training["validation"]["perplexity"], trained[base]["validation"]["perplexity"]
        far = ""
        if name in long_context and base in long_context:
            last, base_last = long_context[name]["bands"][-1], long_context[base]["bands"][-1]
            ratio = last["full_ppl"] / base_last["full_ppl"]
            far = f"{last['full_ppl']:.1f} vs {base_last['full_ppl']:.1f} ({ratio:.3f})"
        lines.append(f"| `{name}` | `{base}` | {training['numerics']} vs {trained[base]['numerics']} | "
                     f"{ppl:.1f} vs {base_ppl:.1f} ({ppl / base_ppl:.3f}) | {far or 'n/a'} |")
    if not lines:
        return []
    return ["## Side by side: one choice changed, same recipe", "",
            "Validation perplexity and the long-context perplexity of the last band (full context), the ablation "
            "against the shipped model (ratio < 1: the ablation is better).", "",
            "| ablation | shipped | numerics | val ppl | last band ppl |", "|---|---|---|---|---|", *lines, ""]


RECIPE_KEYS = ("vocab_size", "seq_len", "batch_size", "steps", "lr", "min_lr_ratio", "warmup", "weight_decay",
               "grad_clip", "seed")


def recipe_changes(args: dict, recipe: dict) -> str:
    """What a model's training arguments change in the shared recipe ("same" when nothing)."""
    changes = [f"{key.replace('_', ' ')} {args[key]}" for key in RECIPE_KEYS if args[key] != recipe[key]]
    return ", ".join(changes) or "same"


def long_context_section(results: dict[str, dict]) -> list[str]:
    """The per-position table of ``benchmarks.long_context`` (from each directory's long_context.json)."""
    if not results:
        return []
    first = next(iter(results.values()))
    return ["## Long context: per-position perplexity, full context / state reset every training window", "",
            f"`python -m benchmarks.long_context` on the held-out split cut into {first['sequences']} sequences of "
            f"{first['tokens']} tokens. Each cell: perplexity over the band of positions with the full context / "
            "with the state reset at every training-window start (ratio; < 1: the context beyond the window "
            "helps). A held-out tail is about 2K tokens of one work; past it a sequence continues with another "
            "work.", "", *long_context_bench.table(list(results.values())), ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", help="model directories (shipped ones, baselines and ablations)")
    p.add_argument("--out", type=Path, default=report.CHECKOUT / "docs", metavar="DIR",
                   help="directory to write models.md into (default: docs/ of this checkout)")
    args = p.parse_args(argv)
    rows, samples, trained, long_context = [], [], {}, {}
    first = json.loads((Path(args.dirs[0]) / "training.json").read_text())
    recipe = first["args"]
    for raw in args.dirs:
        directory = Path(raw)
        training_path = directory / "training.json"
        if not training_path.is_file():
            continue
        training = json.loads(training_path.read_text())
        config = json.loads((directory / "config.json").read_text())
        training.update(role=role(directory), numerics=numerics(config))
        trained[directory.name] = training
        if (directory / long_context_bench.RESULT_FILE).is_file():
            long_context[directory.name] = json.loads((directory / long_context_bench.RESULT_FILE).read_text())
        val = training["validation"]
        rows.append((val["loss"], f"| `{directory.name}` | {training['role']} | "
                                  f"`{training['preset']}` | {training['numerics']} | "
                                  f"{recipe_changes(training['args'], recipe)} | "
                                  f"{training['parameters'] / 1e6:.2f} M | "
                                  f"{training['tokens_seen'] / 1e6:.2f} M | {training['wall_time_s'] / 60:.0f} min | "
                                  f"{val['loss']:.3f} | {val['perplexity']:.1f} | {val['bits_per_byte']:.3f} |"))
        if training["role"] == "shipped":
            model, tokenizer = load_pretrained(directory)
            text = sample(model, tokenizer, SAMPLE_PROMPT, max_new_tokens=80, temperature=0.8, seed=0)
            samples.append(f"### `{directory.name}`\n\n```text\n{text.strip()}\n```\n")
    rows.sort()
    lines = [
        "# Trained models",
        "",
        f"Generated by `{report.command(__spec__.name, argv)}` on {datetime.date.today()} (commit "
        f"{report.git_commit()}). Every model below was trained "
        f"with one recipe on the same data: the complete works of Shakespeare (42 works; the last 5% of every work "
        f"held out), a byte-level BPE of {recipe['vocab_size']} tokens trained on the training split, "
        f"{recipe['steps']} steps of {recipe['batch_size']} x {recipe['seq_len']} tokens, AdamW (lr "
        f"{recipe['lr']}, warmup {recipe['warmup']}, cosine to {recipe['min_lr_ratio']}x, weight decay "
        f"{recipe['weight_decay']}, clip {recipe['grad_clip']}), seed {recipe['seed']}, one CPU thread each "
        f"({first['hardware']}). Validation: the first {first['eval']['windows']} windows of "
        f"{first['eval']['seq_len']} tokens of the held-out split, each from a fresh state. Bits per byte "
        f"divide the total loss by the UTF-8 bytes the target tokens stand for, so it compares across "
        f"tokenizers. The exact command of each model is in its `MODEL_CARD.md`; *recipe* names what a model "
        f"changes in the recipe (the notes below say why).",
        "",
        "| model | role | preset | memory numerics | recipe | parameters | tokens seen | training time | val loss "
        "| val ppl | bits/byte |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[row for _, row in rows],
        "",
        *side_by_side(trained, long_context),
        *long_context_section(long_context),
        f"## Samples (prompt `{SAMPLE_PROMPT.strip()}`, temperature 0.8, seed 0)",
        "",
        *samples,
    ]
    out = args.out / "models.md"
    notes = out.read_text().split(NOTES_MARKER, 1)[1] if out.is_file() and NOTES_MARKER in out.read_text() else "\n"
    print("\n".join(lines))
    report.write(args.out, "models.md", "\n".join(lines) + "\n" + NOTES_MARKER + notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
