"""Which operand precision can the memory's tensor-core products afford? Measured on the shipped models.

    python -m benchmarks.precision [--models moneta-tiny ...] [--tokens 16384] [--decode-prefix 512]
                                   [--decode-tail 64] [--out DIR] [--name precision-cpu.md]

Every model reads one long held-out sequence (the validation split of models/corpus.py, the default
corpus the models were trained on) in one parallel chunked pass, in fp64 (the truth) and in fp32 with the
memory's chunk products emulating each kernel dot precision (models.memory.emulate_dots: exact fp32,
tf32x3, tf32, bf16; fp32 accumulation and state in all). Per setting, against fp64, over the first 256,
1K and 4K tokens and the whole sequence: the perplexity's relative change, the mean KL(fp64 || setting) of
the next-token distributions, top-1 agreement, and every layer's relative error (the mixer's output; the
worst layer is reported). The decision rule (``decide``) is applied as filed (the whole sequence) and on
the prefixes where exact fp32 itself passes it (docs/precision.md says why). The
fp64 pass also records how close each memory's LayerNorm inputs sit to the LayerNorm's eps (a variance
near eps amplifies any rounding of the products that feed it). Where it is cheap, on the first
``--decode-prefix`` + ``--decode-tail`` tokens: the tail decoded one token at a time after a prefill of the
prefix, against one parallel pass over both (the model invariant under each setting; decode runs its
one-token products in exact fp32, as the kernels do, and only its chunk-start folds are rounded).

A study, not part of serving: on the CPU, 16K tokens take about 10 minutes per model on one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from benchmarks import report
from miras_serve.models import memory
from miras_serve.models.checkpoint import load_pretrained, shipped_models
from miras_serve.models.model import MirasLM
from miras_serve.models.train import held_out_stream

SETTINGS = memory.DOT_EMULATIONS
# The decision rule of issue 11: the cheapest setting that moves perplexity by less than this, relatively,
# and agrees with fp64 on the top-1 token at least this often, on every model.
MAX_PERPLEXITY_CHANGE = 1e-3
MIN_TOP1_AGREEMENT = 0.999
CHEAPEST_FIRST = ("bf16", "tf32", "tf32x3", "ieee")


@dataclass
class Pass:
    """One parallel pass: log-probabilities [T, V] and every layer's mixer output [T, d_model]."""

    log_probs: Tensor
    layer_outputs: list[Tensor]
    seconds: float


@dataclass
class LayerNormInputs:
    """Per Miras layer, the per-token, per-head standard deviation of the memory's LayerNorm inputs."""

    stds: dict[int, list[Tensor]] = field(default_factory=dict)
    layer: int = -1

    def record(self, u: Tensor) -> None:
        std = (u - u.mean(-1, keepdim=True)).pow(2).mean(-1).sqrt()
        self.stds.setdefault(self.layer, []).append(std.flatten().double())


@contextlib.contextmanager
def layer_outputs(model: MirasLM, sink: list[Tensor], norm_inputs: LayerNormInputs | None) -> Iterator[None]:
    """Collect each block's mixer output into ``sink`` (in layer order); with ``norm_inputs``, also the
    memory's LayerNorm inputs (the reads' and the keys'), by wrapping models.memory.layer_norm."""
    hooks = []
    for i, block in enumerate(model.blocks):
        def pre(module, args, i=i):
            if norm_inputs is not None:
                norm_inputs.layer = i

        def post(module, args, output):
            sink.append(output[0][0].detach())

        hooks.append(block.mixer.register_forward_pre_hook(pre))
        hooks.append(block.mixer.register_forward_hook(post))
    original = memory.layer_norm
    if norm_inputs is not None:
        def recording(u: Tensor, weight: Tensor, bias: Tensor, eps: float):
            norm_inputs.record(u)
            return original(u, weight, bias, eps)

        memory.layer_norm = recording
    try:
        yield
    finally:
        memory.layer_norm = original
        for hook in hooks:
            hook.remove()


@torch.inference_mode()
def parallel_pass(model: MirasLM, ids: Tensor, setting: str, norm_inputs: LayerNormInputs | None = None) -> Pass:
    outputs: list[Tensor] = []
    start = time.perf_counter()
    with memory.emulate_dots(setting), layer_outputs(model, outputs, norm_inputs):
        logits, _ = model(ids.unsqueeze(0))
    return Pass(torch.log_softmax(logits[0], dim=-1), outputs, time.perf_counter() - start)


def relative_error(got: Tensor, ref: Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def compare(truth: Pass, run: Pass, targets: Tensor, end: int, rows: int = 2048) -> dict:
    """The run against the fp64 truth over the first ``end`` tokens: perplexities, mean KL(truth || run),
    top-1 agreement, every layer's relative error and the worst layer."""
    nll_truth = -truth.log_probs[:end].gather(1, targets[:end, None]).sum().item()
    nll_run = -run.log_probs[:end].double().gather(1, targets[:end, None]).sum().item()
    kl = 0.0
    for r in range(0, end, rows):  # in blocks: [T, V] in fp64 is large
        p_log = truth.log_probs[r:min(r + rows, end)]
        kl += float((p_log.exp() * (p_log - run.log_probs[r:min(r + rows, end)].double())).sum())
    top1 = float((truth.log_probs[:end].argmax(-1) == run.log_probs[:end].argmax(-1)).double().mean())
    layers = [relative_error(got[:end], ref[:end])
              for got, ref in zip(run.layer_outputs, truth.layer_outputs, strict=True)]
    ppl_truth, ppl_run = math.exp(nll_truth / end), math.exp(nll_run / end)
    return {"perplexity": ppl_run, "perplexity_fp64": ppl_truth, "perplexity_change": ppl_run / ppl_truth - 1.0,
            "kl": kl / end, "top1": top1, "layer_errors": layers,
            "worst_layer": max(range(len(layers)), key=layers.__getitem__)}


def horizons(tokens: int) -> list[int]:
    """The prefixes measured: 256, 1K, 4K, ... tokens below the sequence's length, and the whole sequence."""
    return [h for h in (256, 1024, 4096) if h < tokens] + [tokens]


@torch.inference_mode()
def decode_consistency(model: MirasLM, ids: Tensor, setting: str, tail: int) -> dict:
    """Prefill all but the last ``tail`` of ``ids``, decode those one at a time, against one parallel pass
    over ``ids`` in the same setting: the worst relative error of a decoded token's log-probabilities, and
    the top-1 agreement."""
    parallel = parallel_pass(model, ids, setting).log_probs
    with memory.emulate_dots(setting):
        _, state = model(ids[None, :-tail])
        steps = []
        for t in range(ids.numel() - tail, ids.numel()):
            logits, state = model(ids[None, t:t + 1], state)
            steps.append(torch.log_softmax(logits[0, 0], dim=-1))
    decoded = torch.stack(steps)
    ref = parallel[-tail:]
    worst = float(((decoded - ref).norm(dim=-1) / ref.norm(dim=-1)).max())
    return {"decode_error": worst, "decode_top1": float((decoded.argmax(-1) == ref.argmax(-1)).double().mean())}


def held_out_ids(tokenizer, tokens: int, corpus: list[str] | None = None) -> Tensor:
    """BOS and the first ``tokens`` tokens of the held-out split of ``corpus`` (default: the models' training
    corpus), its documents joined by EOS as training evaluates them: ``tokens + 1`` ids, inputs and targets."""
    stream = held_out_stream(tokenizer, corpus)
    if stream.numel() < tokens:
        raise ValueError(f"the held-out split has {stream.numel()} tokens, fewer than --tokens {tokens}")
    return torch.cat([torch.tensor([tokenizer.bos_token_id]), stream[:tokens]])


def layer_norm_summary(model: MirasLM, norm_inputs: LayerNormInputs) -> list[dict]:
    eps = model.config.memory_ln_eps
    rows = []
    for layer, parts in sorted(norm_inputs.stds.items()):
        std = torch.cat(parts)
        rows.append({"layer": layer, "median_std": float(std.median()), "p01_std": float(std.quantile(0.01)),
                     "below_eps": float((std.pow(2) < eps).double().mean()), "sqrt_eps": math.sqrt(eps)})
    return rows


def study_model(name: str, tokens: int, prefix: int, tail: int, settings: tuple[str, ...],
                corpus: list[str] | None = None) -> dict:
    model, tokenizer = load_pretrained(name, dtype=torch.float64)
    ids = held_out_ids(tokenizer, tokens, corpus)
    inputs, targets = ids[:-1], ids[1:]
    norm_inputs = LayerNormInputs()
    truth = parallel_pass(model, inputs, "ieee", norm_inputs)
    result = {"name": name, "config": model.config, "layer_kinds": model.config.layer_kinds,
              "layer_norm": layer_norm_summary(model, norm_inputs), "fp64_seconds": truth.seconds, "settings": {}}
    del norm_inputs
    model.float()
    for setting in settings:
        run = parallel_pass(model, inputs, setting)
        row = {"horizons": {end: compare(truth, run, targets, end) for end in horizons(tokens)},
               "seconds": run.seconds}
        if tail:
            row.update(decode_consistency(model, inputs[:prefix + tail], setting, tail))
        result["settings"][setting] = row
        for end, m in row["horizons"].items():
            print(f"{name} {setting} first {end}: ppl change {m['perplexity_change']:+.2e}, KL {m['kl']:.2e}, "
                  f"top-1 {m['top1']:.5f}, worst layer {m['worst_layer']} ({max(m['layer_errors']):.2e})", flush=True)
        print(f"{name} {setting}: {row['seconds']:.0f} s", flush=True)
    return result


def passes(metrics: dict) -> bool:
    return abs(metrics["perplexity_change"]) < MAX_PERPLEXITY_CHANGE and metrics["top1"] >= MIN_TOP1_AGREEMENT


def decide(results: list[dict], whole: bool = False) -> str | None:
    """The cheapest setting that passes on every model (None: none measured passes). ``whole``: judged on the
    whole sequence (the rule as filed); otherwise on every prefix on which exact fp32 passes (a trained memory
    is chaotic: over a long enough sequence any rounding, fp32's included, ends on another trajectory than
    fp64's, so a setting can only be asked to be as faithful as exact fp32 is)."""
    judged = [judged_horizons(r, whole) for r in results]
    if not all(judged):  # exact fp32 passes on no prefix of some model: nothing to judge against
        return None
    for setting in CHEAPEST_FIRST:
        if all(setting in r["settings"] and all(passes(r["settings"][setting]["horizons"][end]) for end in ends)
               for r, ends in zip(results, judged, strict=True)):
            return setting
    return None


def judged_horizons(result: dict, whole: bool = False) -> list[int]:
    """The prefixes a model's settings are judged on: the whole sequence, or those where exact fp32 passes."""
    ends = list(next(iter(result["settings"].values()))["horizons"])
    if whole:
        return ends[-1:]
    exact = result["settings"].get("ieee")
    return [end for end in ends if exact is not None and passes(exact["horizons"][end])]


def report_lines(results: list[dict], args: argparse.Namespace, argv: list[str] | None, seconds: float) -> list[str]:
    literal, decision = decide(results, whole=True), decide(results)
    ends = horizons(args.tokens)
    n_layers = max(len(r["layer_kinds"]) for r in results)
    lines = [
        *report.header("Dot precision of the memory's chunk products, measured on the shipped models (CPU emulation)",
                       __spec__.name, argv, f"{torch.get_num_threads()} torch threads; {seconds / 60:.1f} min in all"),
        f"One sequence of {args.tokens:,} held-out tokens per model, parallel chunked pass. Truth: the whole model "
        "in fp64. Settings: fp32 model, the memory's chunk products (the kernels' `tl.dot`s) with operands rounded "
        "as each input precision does (models.memory.emulate_dots), fp32 accumulation and state. Perplexity "
        "change: relative to fp64's. KL: mean over tokens of KL(fp64 || setting). Layer error: relative error of "
        "the layer's mixer output. Each over the first N tokens of the sequence.",
        "",
        "## The whole sequence",
        "",
        "| model | setting | perplexity | change vs fp64 | mean KL | top-1 agreement | worst layer (rel. error) | "
        "passes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for setting, row in r["settings"].items():
            m = row["horizons"][args.tokens]
            lines.append(
                f"| {r['name']} | {setting} | {m['perplexity']:.4f} (fp64 {m['perplexity_fp64']:.4f}) | "
                f"{m['perplexity_change']:+.2e} | {m['kl']:.2e} | {m['top1']:.5f} | "
                f"{m['worst_layer']} {r['layer_kinds'][m['worst_layer']]} ({max(m['layer_errors']):.1e}) | "
                f"{'yes' if passes(m) else 'no'} |")
    lines += ["", "## Over the first N tokens: top-1 agreement / perplexity change / worst layer's error", "",
              "| model | setting | " + " | ".join(f"first {end:,}" for end in ends) + " |",
              "|---|---|" + "---|" * len(ends)]
    for r in results:
        for setting, row in r["settings"].items():
            cells = []
            for end in ends:
                m = row["horizons"][end]
                cells.append(f"{m['top1']:.2%} / {m['perplexity_change']:+.1e} / {max(m['layer_errors']):.0e}"
                             + ("" if passes(m) else " (fails)"))
            lines.append(f"| {r['name']} | {setting} | " + " | ".join(cells) + " |")
    lines += ["", f"## Every layer's relative error, first {ends[0]:,} tokens and whole sequence", "",
              "M: Miras memory, A: sliding-window attention.", "",
              "| model | setting | tokens | " + " | ".join(f"layer {i}" for i in range(n_layers)) + " |",
              "|---|---|---|" + "---|" * n_layers]
    for r in results:
        for setting, row in r["settings"].items():
            for end in (ends[0], ends[-1]) if len(ends) > 1 else ends:
                cells = [f"{e:.1e} {k}" for e, k in zip(row["horizons"][end]["layer_errors"], r["layer_kinds"],
                                                        strict=True)]
                lines.append(f"| {r['name']} | {setting} | {end:,} | " + " | ".join(cells) + " |")
    if args.decode_tail:
        lines += ["", "## Decode against the parallel pass, same setting (first "
                  f"{args.decode_prefix + args.decode_tail} tokens: the last {args.decode_tail} decoded one at a time "
                  "after a prefill of the "
                  f"{args.decode_prefix} before)", "",
                  "| model | setting | worst token's relative error (log-probabilities) | top-1 agreement |",
                  "|---|---|---|---|"]
        for r in results:
            for setting, row in r["settings"].items():
                lines.append(f"| {r['name']} | {setting} | {row['decode_error']:.1e} | {row['decode_top1']:.4f} |")
    lines += ["", "## The memory's LayerNorm inputs (fp64 pass; per token and head, the reads' and the keys')", "",
              "| model | layer | median std | 1st percentile std | sqrt(eps) | variance below eps |",
              "|---|---|---|---|---|---|"]
    for r in results:
        for row in r["layer_norm"]:
            lines.append(f"| {r['name']} | {row['layer']} | {row['median_std']:.2e} | {row['p01_std']:.2e} | "
                         f"{row['sqrt_eps']:.2e} | {row['below_eps']:.2%} |")
    rule = (f"perplexity moves less than {MAX_PERPLEXITY_CHANGE:.1%} and top-1 agreement is at least "
            f"{MIN_TOP1_AGREEMENT:.1%}")
    lines += ["", "## Decision", "",
              f"- Rule as filed ({rule}, whole sequence, every model): "
              f"**{literal or 'no setting passes, exact fp32 included'}**.",
              "- Judged on the prefixes where exact fp32 itself passes (per model: "
              + "; ".join(f"{r['name']} {', '.join(f'{e:,}' for e in judged_horizons(r)) or 'none'}" for r in results)
              + f"): **{decision or 'no setting passes'}**."]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=shipped_models())
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--decode-prefix", type=int, default=512, help="tokens prefilled before the decode check")
    p.add_argument("--decode-tail", type=int, default=64, help="tokens decoded one at a time (0: skip)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--corpus", nargs="+", help="text files or directories (default: the training corpus)")
    p.add_argument("--threads", type=int, default=2)
    report.add_out_argument(p)
    p.add_argument("--name", default="precision-cpu.md", help="the report's file name in --out")
    args = p.parse_args(argv)
    if args.decode_tail < 0 or args.decode_prefix < 1 or args.decode_prefix + args.decode_tail > args.tokens:
        p.error("--decode-prefix (>= 1) and --decode-tail (>= 0) must add up to at most --tokens")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = [study_model(name, args.tokens, args.decode_prefix, args.decode_tail, tuple(args.settings),
                           args.corpus) for name in args.models]
    lines = report_lines(results, args, argv, time.perf_counter() - start)
    print("\n".join(lines))
    report.write(args.out, args.name, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
