"""GPU check of the Triton kernels: correctness on the device, then prefill and decode timings, side by
side in one run, written as a Markdown table into docs/benchmarks/.

    python -m kernels.gpu_check              # on an H100/H200: a few minutes, no network
    python -m kernels.gpu_check --smoke      # CPU, Triton interpreter: tiny shapes, proves it runs end to end

1. Correctness: every rule against the fp64 reference (padded prefill with phases and padding, decode
   through pool slots with a padding slot, varlen prefill), q/k/v stored in fp32 and bf16, TF32 tolerance;
   the model-level invariant (parallel pass == prefill + decode) for two presets.
2. Prefill of one Miras layer at the 340M shape (d_model 1024, 16 heads x 64, expansion 4, chunk 64):
   Triton vs the PyTorch reference vs a causal SDPA (FlashAttention) layer of the same width, and fla's
   chunk_gated_delta_rule where fla is importable.
3. Decode of the whole 24-layer model through the slot pool under CUDA graphs, cold L2: time per step,
   tokens/s and achieved bandwidth (bytes that must move / time) against the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# The paper's 340M shape.
FULL = dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, head_dim=64, memory_expansion=4,
            mlp_hidden=2816, chunk_size=64)
# CPU smoke run: shapes the interpreter gets through in seconds.
TINY = dict(vocab_size=320, d_model=32, n_layers=2, n_heads=2, head_dim=8, mlp_hidden=48, gate_rank=8,
            chunk_size=4, swa_window=6)
L2_FLUSH_BYTES = 512 << 20  # > 4x the L2 of an H100 (50 MB) or H200 (60 MB)


class Report:
    def __init__(self) -> None:
        self.sections: list[str] = []

    def table(self, title: str, header: list[str], rows: list[list[str]], note: str = "") -> None:
        lines = [f"## {title}", ""]
        if note:
            lines += [note, ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        self.sections.append("\n".join(lines))
        print("\n" + self.sections[-1], flush=True)


def commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timed(fn: Callable[[], object], device: torch.device, reps: int, flush: torch.Tensor | None = None) -> float:
    """Median seconds per call after one warm-up call; ``flush`` is rewritten before each call (cold L2)."""
    fn()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_correctness(report: Report, device: torch.device, smoke: bool) -> bool:
    import models
    from kernels.scan import dot_is_ieee
    from kernels.testing import (
        check_decode_slots,
        check_model_invariant,
        check_padded_prefill,
        check_varlen_prefill,
        rule_config,
        tolerance,
    )

    ieee = dot_is_ieee(device)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    dev = device.type
    cases: list[tuple[str, Callable[[], dict[str, float]], float]] = []
    rules = ["moneta", "memora"] if smoke else ["moneta", "yaad", "memora", "linear"]
    shapes = {"d8 c4": {}} if smoke else {"d8 c4": {}, "d64 c64": dict(head_dim=64, chunk_size=64)}
    for rule in rules:
        for shape, overrides in shapes.items():
            cfg = rule_config(rule, **overrides)
            T = 150 if cfg.chunk_size > 16 else 11
            cases.append((f"{rule} {shape} prefill fp32", lambda c=cfg, t=T: check_padded_prefill(c, gen, dev, T=t),
                          tolerance(cfg, ieee)))
            cases.append((f"{rule} {shape} decode slots", lambda c=cfg: check_decode_slots(c, gen, dev),
                          tolerance(cfg, True)))
        cfg = rule_config(rule)
        if not smoke:
            cases.append((f"{rule} d8 c4 varlen", lambda c=cfg: check_varlen_prefill(c, gen, dev),
                          tolerance(cfg, ieee)))
            cases.append((f"{rule} d8 c4 prefill bf16 q/k/v",
                          lambda c=cfg: check_padded_prefill(c, gen, dev, torch.bfloat16), tolerance(cfg, ieee)))
    for preset in ["moneta-h"] if smoke else ["moneta", "memora-h"]:
        torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
        model = models.from_preset(preset, **TINY).to(device).eval()
        ids = torch.randint(3, TINY["vocab_size"], (2, 10), generator=gen).to(device)
        tol = tolerance(model.config, ieee) * (1 if ieee else 4)
        cases.append((f"model {preset}: parallel == prefill + decode",
                      lambda m=model, i=ids: check_model_invariant(m, i, prompt=5), tol))
    rows, ok = [], True
    for name, run, tol in cases:
        errors = run()
        worst = max(errors, key=lambda k: errors[k])
        passed = errors[worst] < tol
        ok &= passed
        verdict = "pass" if passed else "**FAIL**"
        if not passed and not ieee:
            # Tells TF32 rounding from a bug: the same case with exact fp32 dots.
            from kernels import environment

            with environment("MIRAS_DOT_PRECISION", "ieee"):
                exact = max(run().values())
            verdict += f" (ieee dots: {exact:.1e})"
        rows.append([name, f"{errors[worst]:.2e}", worst, f"{tol:.0e}", verdict])
    report.table("Correctness against the fp64 reference", ["case", "worst rel. RMS error", "where", "tolerance",
                                                             "result"], rows,
                 f"fp32 dot precision: {'ieee' if ieee else 'tf32'}; fresh random inputs, outputs NaN-poisoned.")
    return ok


class AttentionLayer(nn.Module):
    """A causal attention layer of the Miras layer's width (projections + SDPA/FlashAttention)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.qkv = nn.Linear(d_model, 3 * n_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def memory_flops_per_token(cfg) -> float:
    """Useful FLOPs of the memory per token and head: forward, backward and read at the anchor
    (14 d D) plus the dual form's intra-chunk terms (4 b (D + d)); recomputation not counted."""
    d, D, b = cfg.head_dim, cfg.memory_hidden, cfg.chunk_size
    return cfg.n_heads * (14 * d * D + 4 * b * (D + d))


def bench_prefill(report: Report, device: torch.device, smoke: bool) -> None:
    import models
    from kernels import forced_backend
    from models.layers import MirasMixer

    shape = TINY if smoke else FULL
    cfg = models.preset_config("moneta", **shape)
    dtype = torch.float32 if smoke else torch.bfloat16
    layer = MirasMixer(cfg).to(device=device, dtype=dtype).eval()
    attention = AttentionLayer(cfg.d_model, cfg.n_heads, cfg.head_dim).to(device=device, dtype=dtype).eval()
    proj_flops = 2 * cfg.d_model * (5 * cfg.inner_dim) + 2 * cfg.d_model * cfg.gate_rank
    mem_flops = memory_flops_per_token(cfg)
    lengths_t = [16] if smoke else [2048, 8192, 32768]
    batches = [1, 2] if smoke else [1, 8]
    rows = []
    for T in lengths_t:
        for B in batches:
            x = torch.randn(B, T, cfg.d_model, device=device, dtype=dtype)
            state = layer.init_state(B, device, torch.float32)
            pos = torch.zeros(B, dtype=torch.long, device=device)
            valid = torch.ones(B, T, dtype=torch.bool, device=device)
            lengths = torch.full((B,), T, dtype=torch.long, device=device)
            times = {}
            with torch.inference_mode():
                for backend in ("triton", "torch"):
                    with forced_backend(backend):
                        times[backend] = timed(partial(layer, x, state, pos, valid, lengths), device,
                                               reps=1 if backend == "torch" else 3)
                times["sdpa"] = timed(partial(attention, x), device, reps=3)
            tokens = B * T
            miras_tflops = tokens * (proj_flops + mem_flops) / times["triton"] / 1e12
            attn_flops = tokens * (2 * cfg.d_model * 4 * cfg.inner_dim + 2 * T * cfg.head_dim * cfg.n_heads)
            rows.append([str(T), str(B), f"{B * cfg.n_heads}",
                         f"{times['triton'] * 1e3:.2f}", f"{tokens / times['triton'] / 1e3:.1f}", f"{miras_tflops:.1f}",
                         f"{times['torch'] * 1e3:.2f}", f"{times['torch'] / times['triton']:.1f}x",
                         f"{times['sdpa'] * 1e3:.2f}", f"{attn_flops / times['sdpa'] / 1e12:.1f}",
                         f"{times['sdpa'] / times['triton']:.2f}x"])
    report.table(
        "Prefill of one Miras layer (Moneta)",
        ["T", "batch", "batch x heads", "Triton ms", "Triton ktok/s", "Triton TFLOP/s", "PyTorch ms",
         "Triton speed-up", "SDPA layer ms", "SDPA TFLOP/s", "Triton vs SDPA (>1: faster)"], rows,
        f"Layer = q/k/v/gate projections, short conv, memory scan, output gate and projection; weights "
        f"{str(dtype).removeprefix('torch.')}. Shape: d_model {cfg.d_model}, {cfg.n_heads} heads x "
        f"{cfg.head_dim}, expansion {cfg.memory_expansion}, chunk {cfg.chunk_size}. TFLOP/s counts "
        f"{memory_flops_per_token(cfg) / cfg.n_heads / 1e3:.0f} kFLOP/token/head of memory work plus the "
        f"projections; the SDPA layer counts causal attention (2 T d per token per head) plus its projections.")
    bench_fla(report, device, cfg, lengths_t, batches, smoke)


def bench_fla(report: Report, device: torch.device, cfg, lengths_t: list[int], batches: list[int],
              smoke: bool) -> None:
    if smoke or device.type != "cuda":
        return
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as exc:  # fla is optional: a yardstick only
        report.sections.append(f"## fla yardstick\n\nfla not importable here ({type(exc).__name__}); skipped.")
        return
    rows = []
    H, d = cfg.n_heads, cfg.head_dim
    for T in lengths_t:
        for B in batches:
            q, k, v = (torch.randn(B, T, H, d, device=device, dtype=torch.bfloat16) for _ in range(3))
            k = F.normalize(k.float(), dim=-1).to(torch.bfloat16)
            g = F.logsigmoid(torch.randn(B, T, H, device=device))
            beta = torch.rand(B, T, H, device=device, dtype=torch.bfloat16)
            try:
                with torch.inference_mode():
                    t = timed(partial(chunk_gated_delta_rule, q, k, v, g, beta), device, reps=3)
            except Exception as exc:  # a yardstick must not stop the check
                rows.append([str(T), str(B), f"failed: {type(exc).__name__}", "-"])
                continue
            rows.append([str(T), str(B), f"{t * 1e3:.2f}", f"{B * T / t / 1e3:.1f}"])
    report.table("fla chunk_gated_delta_rule (yardstick: a 64x64 matrix memory)",
                 ["T", "batch", "ms", "ktok/s"], rows)


def copy_bandwidth(device: torch.device) -> float:
    n = (1 << 30) // 4 if device.type == "cuda" else 1 << 20
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), device, reps=10)


def bench_decode(report: Report, device: torch.device, smoke: bool) -> None:
    import models
    from kernels import forced_backend

    shape = TINY if smoke else FULL
    model = models.from_preset("moneta", **shape).to(device=device, dtype=torch.float32 if smoke else torch.bfloat16)
    model.eval()
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_miras = cfg.layer_kinds.count("M")
    # Per sequence and step: read the anchor, read and write the running memory (fp32).
    state_bytes = n_miras * cfg.n_heads * 3 * (2 * cfg.head_dim * cfg.memory_hidden) * 4
    bandwidth = copy_bandwidth(device)
    flush = torch.empty(L2_FLUSH_BYTES // 4 if device.type == "cuda" else 1, device=device)
    rows = []
    for B in [1, 2] if smoke else [1, 8, 64, 256]:
        try:
            pool = model.init_state(B)
        except torch.OutOfMemoryError:
            rows.append([str(B)] + ["out of memory"] * 6)
            continue
        ids = torch.randint(3, cfg.vocab_size, (B, 1), device=device)
        slots = torch.arange(B, device=device)
        with torch.inference_mode(), forced_backend("triton"):
            step = capture(partial(model, ids, pool, slots=slots), device)
            t = timed(step, device, reps=5 if smoke else 20, flush=flush)
            eager = {}
            if B <= 8:
                for backend in ("triton", "torch"):
                    with forced_backend(backend):
                        eager[backend] = timed(partial(model, ids, pool, slots=slots), device, reps=3)
        moved = weight_bytes + B * state_bytes
        rows.append([str(B), f"{t * 1e3:.3f}", f"{B / t:,.0f}", f"{moved / t / 1e9:,.0f}",
                     f"{moved / t / bandwidth:.0%}",
                     f"{eager['triton'] * 1e3:.2f}" if eager else "-", f"{eager['torch'] * 1e3:.2f}" if eager else "-"])
    report.table(
        "Decode: whole model, one token per sequence, through the slot pool",
        ["batch", "ms/step (graph, cold L2)", "tokens/s", "achieved GB/s", "of copy bandwidth",
         "eager Triton ms", "eager PyTorch ms"], rows,
        f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads x {cfg.head_dim}, chunk "
        f"{cfg.chunk_size}; weights {weight_bytes / 1e9:.2f} GB; fp32 memory {state_bytes / 3 / 1e6:.1f} MB per "
        f"sequence, held twice (anchor + running memory) and moved three times per step (anchor read, memory "
        f"read + write): bytes that must move = weights + batch x {state_bytes / 1e6:.0f} MB. "
        f"Measured copy bandwidth {bandwidth / 1e9:,.0f} GB/s. "
        + ("CUDA graph replay; L2 flushed before each step." if device.type == "cuda" else
           "CPU interpreter: no graphs, not a measurement."))


def capture(step: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """A CUDA graph of ``step`` (warmed up on a side stream first); on CPU the step itself."""
    if device.type != "cuda":
        return step
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU run under the Triton interpreter, tiny shapes")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "benchmarks",
                        help="directory for the Markdown report")
    parser.add_argument("--skip", nargs="*", default=[], choices=["correctness", "prefill", "decode"])
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no CUDA device: run with --smoke for the CPU interpreter pass")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    now = datetime.datetime.now(datetime.timezone.utc)
    import triton

    report = Report()
    header = (f"# Miras kernels GPU check{' (smoke)' if args.smoke else ''}\n\n- card: {card}\n"
              f"- date: {now:%Y-%m-%d %H:%M} UTC\n- commit: {commit()}\n"
              f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")
    print(header, flush=True)
    started = time.perf_counter()
    ok = True
    if "correctness" not in args.skip:
        ok = check_correctness(report, device, args.smoke)
    if "prefill" not in args.skip:
        bench_prefill(report, device, args.smoke)
    if "decode" not in args.skip:
        bench_decode(report, device, args.smoke)
    footer = f"Total wall time: {time.perf_counter() - started:.0f} s."
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "smoke" if args.smoke else "".join(c if c.isalnum() else "-" for c in card).strip("-").lower()
    path = args.out / f"gpu_check_{slug}_{now:%Y%m%d-%H%M}.md"
    path.write_text("\n\n".join([header, *report.sections, footer]) + "\n")
    print(f"\n{footer}\nwrote {path}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
