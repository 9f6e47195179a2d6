"""GPU check of the Triton kernels: correctness on the device, then prefill and decode timings, side by
side in one run, written as a Markdown report into ``--out`` (default docs/benchmarks/).

    python -m benchmarks.gpu_check              # on an H100/H200: a few minutes, no network
    python -m benchmarks.gpu_check --smoke      # CPU, Triton interpreter: tiny shapes, proves it runs end to end

1. Correctness: every rule against the fp64 reference (padded prefill with phases and padding, decode
   through pool slots with a padding slot, varlen prefill), q/k/v stored in fp32 and bf16, TF32 tolerance;
   the model-level invariant (parallel pass == prefill + decode) for two presets. Then (``precision``)
   the kernel's prefill at each dot precision against the reference's emulation of that rounding
   (models.memory.emulate_dots, the basis of docs/precision.md).
2. Prefill of one Miras layer at the 340M shape (d_model 1024, 16 heads x 64, expansion 4, chunk 64):
   Triton vs the PyTorch reference vs a causal SDPA (FlashAttention) layer of the same width, and fla's
   chunk_gated_delta_rule where fla is importable.
3. Decode of the whole 24-layer model through the slot pool under CUDA graphs, cold L2: time per step,
   tokens/s and achieved bandwidth (bytes that must move / time) against the measured copy bandwidth.
4. Launch configurations of the scan kernels side by side (prefill: dot precision, slab width,
   pipeline stages; decode: fused vs split over hidden slabs, slab width, warps), each checked against
   the fp64 reference: the data for choosing ``launch_config``.
5. Serving: ``miras-serve`` on the device with a random 340M-shape model, the load generator over HTTP at
   concurrency 1 / 8 / 64 / 256 with CUDA graphs and with --enforce-eager, against the engine alone and the
   kernel-only decode step at the same batch; ITL after a 32K- vs a 128-token prompt.

A failing section is reported (with its error) and the next one still runs; the report is rewritten
after every section, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.report import SectionedReport as Report
from benchmarks.report import add_out_argument, header

# The paper's 340M shape.
FULL = dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, head_dim=64, memory_expansion=4,
            mlp_hidden=2816, chunk_size=64)
# CPU smoke run: shapes the interpreter gets through in seconds.
TINY = dict(vocab_size=320, d_model=32, n_layers=2, n_heads=2, head_dim=8, mlp_hidden=48, gate_rank=8,
            chunk_size=4, swa_window=6)
PREFILL_LENGTHS = [2048, 8192, 32768]
PREFILL_BATCHES = [1, 8]
DECODE_BATCHES = [1, 8, 64, 256]
L2_FLUSH_BYTES = 512 << 20  # > 4x the L2 of an H100 (50 MB) or H200 (60 MB)
SECTIONS = ["correctness", "precision", "prefill", "decode", "decode-layouts", "launch-prefill", "launch-decode",
            "serve", "fla"]


def timed(fn: Callable[[], object], device: torch.device, reps: int, flush: torch.Tensor | None = None) -> float:
    """Median seconds per call after one warm-up call (on a GPU: the CPU runs only the smoke run, whose times
    are not measurements); ``flush`` is rewritten before each call (cold L2)."""
    if device.type == "cuda":
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
    from benchmarks.kernel_cases import check_model_invariant, rule_case, rule_config
    from miras_serve import models
    from miras_serve.kernels.precision import dot_precision
    from miras_serve.kernels.testing import (
        check_decode_slots,
        check_factored_decode,
        check_factored_prefill,
        check_factored_varlen,
        check_padded_prefill,
        check_varlen_prefill,
        tolerance,
    )

    precision = dot_precision(device)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    dev = device.type
    cases: list[tuple[str, Callable[[], dict[str, float]], float]] = []
    # the smoke run: one rule, prompts across one chunk boundary (every case's code path, in the interpreter)
    rules = ["moneta"] if smoke else ["moneta", "yaad", "memora", "linear"]
    shapes = {"d8 c4": {}} if smoke else {"d8 c4": {}, "d64 c64": dict(head_dim=64, chunk_size=64)}
    for rule in rules:
        for shape, overrides in shapes.items():
            cfg = rule_config(rule, **overrides)
            case = rule_case(cfg)
            tol = tolerance(case.rule, precision)
            T = 150 if cfg.chunk_size > 16 else 6 if smoke else 11
            cases.append((f"{rule} {shape} prefill fp32",
                          lambda c=case, t=T: check_padded_prefill(c, gen, dev, T=t), tol))
            if cfg.memory == "mlp":  # the default prefill is the slab-parallel one; the fused kernel beside it
                cases.append((f"{rule} {shape} prefill fp32, fused kernel (SPLIT_D=0)",
                              lambda c=case, t=T: check_padded_prefill(c, gen, dev, T=t, launch=dict(SPLIT_D=0)),
                              tol))
            cases.append((f"{rule} {shape} decode slots", lambda c=case: check_decode_slots(c, gen, dev),
                          tolerance(case.rule, "ieee")))
            if cfg.memory == "mlp":  # the factored state (the fold's dots run at the shipped precision)
                cases.append((f"{rule} {shape} factored prefill + decode",
                              lambda c=case, t=T: check_factored_prefill(c, gen, dev, T=t), tol))
                cases.append((f"{rule} {shape} factored decode slots",
                              lambda c=case: check_factored_decode(c, gen, dev), tol))
        cfg = rule_config(rule)
        case = rule_case(cfg)
        tol = tolerance(case.rule, precision)
        if not smoke:
            cases.append((f"{rule} d8 c4 varlen", lambda c=case: check_varlen_prefill(c, gen, dev), tol))
            if cfg.memory == "mlp":
                cases.append((f"{rule} d8 c4 factored varlen", lambda c=case: check_factored_varlen(c, gen, dev), tol))
            cases.append((f"{rule} d8 c4 prefill bf16 q/k/v",
                          lambda c=case: check_padded_prefill(c, gen, dev, torch.bfloat16), tol))
    for preset in ["moneta-h"] if smoke else ["moneta", "memora-h"]:
        torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
        model = models.from_preset(preset, **TINY).to(device).eval()
        ids = torch.randint(3, TINY["vocab_size"], (2, 7 if smoke else 10), generator=gen).to(device)
        tol = tolerance(model.config.memory_rule(), precision) * (1 if precision == "ieee" else 4)
        cases.append((f"model {preset}: parallel == prefill + decode",  # decode crosses the chunk boundary at 4
                      lambda m=model, i=ids: check_model_invariant(m, i, prompt=3 if smoke else 5), tol))
    cases.append(("engine decode: graph replay == eager, padded batches", partial(check_decode_graphs, device, gen),
                  tolerance(rule_config("moneta").memory_rule(), precision) * 4))
    rows, ok = [], True
    for name, run, tol in cases:
        errors = run()
        worst = max(errors, key=lambda k: errors[k])
        passed = errors[worst] < tol
        ok &= passed
        verdict = "pass" if passed else "**FAIL**"
        if not passed and precision != "ieee":
            # Tells TF32 rounding from a bug: the same case with exact fp32 dots.
            from miras_serve.models.backend import environment

            with environment("MIRAS_DOT_PRECISION", "ieee"):
                exact = max(run().values())
            verdict += f" (ieee dots: {exact:.1e})"
        rows.append([name, f"{errors[worst]:.2e}", worst, f"{tol:.0e}", verdict])
    report.table("Correctness against the fp64 reference", ["case", "worst rel. RMS error", "where", "tolerance",
                                                             "result"], rows,
                 f"fp32 dot precision: {precision}; fresh random inputs, outputs NaN-poisoned.")
    return ok


@torch.inference_mode()
def check_dot_emulation(report: Report, device: torch.device, smoke: bool) -> None:
    """Does the kernel's prefill round its dots as models.memory.emulate_dots says (the emulation the precision
    study of docs/precision.md rests on)? The same prefill, two chunks and a partial one from a random state,
    by the kernel at each dot precision and by the fp32 reference with each precision emulated."""
    from benchmarks.kernel_cases import rule_case, rule_config
    from miras_serve.kernels import DOT_PRECISIONS
    from miras_serve.kernels.scan import scan_pool
    from miras_serve.kernels.testing import GATE_NAMES, random_inputs, rel_err
    from miras_serve.models.backend import environment
    from miras_serve.models.memory import emulate_dots, memory_scan

    cfg = rule_config("moneta") if smoke else rule_config("moneta", head_dim=64, chunk_size=64)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    batch, T = (2, cfg.chunk_size + 2) if smoke else (4, 2 * cfg.chunk_size + 5)
    x = random_inputs(rule_case(cfg), batch, T, gen, device.type)
    args = [x[n] for n in GATE_NAMES]
    pos = torch.zeros(batch, dtype=torch.long, device=device)
    valid = torch.ones(batch, T, dtype=torch.bool, device=device)
    emulated = {}
    for mode in DOT_PRECISIONS:
        with emulate_dots(mode):
            emulated[mode] = memory_scan(cfg, x["anchor"], x["memory"], pos, *args, valid, x["ln_weight"],
                                         x["ln_bias"])[0]
    rows = []
    for precision in DOT_PRECISIONS:
        anchor, memory = (tuple(w.clone() for w in x[name]) for name in ("anchor", "memory"))
        with environment("MIRAS_DOT_PRECISION", precision):
            out = scan_pool(cfg.memory_rule(), anchor, memory, torch.arange(batch, device=device), pos, *args,
                            x["ln_weight"], x["ln_bias"])
        errors = [rel_err(emulated[mode], out) for mode in DOT_PRECISIONS]
        closest = DOT_PRECISIONS[min(range(len(errors)), key=errors.__getitem__)]
        rows.append([precision] + [f"{e:.1e}" for e in errors] + [closest])
    report.table("Dot rounding: the kernel's prefill against the reference's emulation",
                 ["kernel dots"] + [f"vs emulated {mode}" for mode in DOT_PRECISIONS] + ["closest"], rows,
                 f"Moneta, {cfg.n_heads} heads x {cfg.head_dim}, chunk {cfg.chunk_size}, batch {batch} x {T} tokens "
                 "from a random state; reads' relative RMS error. On a GPU the tf32 kernel should be closest to the "
                 "tf32 emulation, by far (models.memory.emulate_dots rounds to nearest; a tensor core that drops the "
                 "low bits instead lands farther from it), and the ieee and tf32x3 kernels at fp32 noise from both "
                 "fp32-level emulations. The Triton interpreter computes every dot exactly: there every row is at "
                 "fp32 noise from ieee and tf32x3.")


@torch.inference_mode()
def check_decode_graphs(device: torch.device, gen: torch.Generator) -> dict[str, float]:
    """The serving engine's decode runner (server.decode_graphs: CUDA graphs on a GPU, padded to captured
    batch sizes with a scratch pool row) against the eager model step on a copy of the same pool, for
    batches that need padding and crossing a chunk boundary."""
    from miras_serve import models
    from miras_serve.kernels.testing import rel_err
    from miras_serve.server.decode_graphs import DecodeGraphs

    model = models.from_preset("moneta", **TINY).to(device).eval()
    pool = model.init_state(7)
    prompts = torch.randint(3, TINY["vocab_size"], (7, 6), generator=gen).to(device)
    model(prompts, pool, slots=torch.arange(7, device=device))
    runner = DecodeGraphs(model, pool, scratch_slot=6, max_batch=6, use_graphs=device.type == "cuda")
    reference = pool.clone()
    errors = {}
    for step, slots in enumerate(([4, 1, 3], [0, 2, 5, 4, 1], [2], [4, 1, 3], [5, 0])):
        slots = torch.tensor(slots, device=device)
        ids = torch.randint(3, TINY["vocab_size"], (len(slots), 1), generator=gen).to(device)
        expected, _ = model(ids, reference, slots=slots)
        errors[f"step {step}, batch {len(slots)}"] = rel_err(expected, runner.run(ids, slots))
    return errors


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


def memory_prefill_flops(cfg, batch: int, tokens: int) -> float:
    """Useful FLOPs of the memory's matrix products in a prefill of ``batch`` x ``tokens`` tokens from
    position 0 (benchmarks.cost.prefill_flops: what the dual form needs, recomputation not counted)."""
    from benchmarks.cost import prefill_flops

    return prefill_flops(cfg.memory, head_dim=cfg.head_dim, hidden=cfg.memory_hidden, chunk_size=cfg.chunk_size,
                         tokens=tokens, n_heads=cfg.n_heads, batch=batch, retention=cfg.retention)


def bench_prefill(report: Report, device: torch.device, smoke: bool) -> None:
    from miras_serve import models
    from miras_serve.kernels.precision import dot_precision
    from miras_serve.models.layers import MirasMixer

    shape = TINY if smoke else FULL
    cfg = models.preset_config("moneta", **shape)
    dtype = torch.float32 if smoke else torch.bfloat16
    layer = MirasMixer(cfg).to(device=device, dtype=dtype).eval()
    attention = AttentionLayer(cfg.d_model, cfg.n_heads, cfg.head_dim).to(device=device, dtype=dtype).eval()
    proj_flops = 2 * cfg.d_model * (5 * cfg.inner_dim) + 2 * cfg.d_model * cfg.gate_rank  # per token
    rows = []
    for T in [6] if smoke else PREFILL_LENGTHS:  # smoke: across one chunk boundary
        for B in [2] if smoke else PREFILL_BATCHES:
            try:
                rows.append(prefill_row(layer, attention, cfg, B, T, device,
                                        B * T * proj_flops + memory_prefill_flops(cfg, B, T)))
            except Exception as exc:  # one shape failing (out of memory, say) must not lose the others
                traceback.print_exc()
                rows.append([str(T), str(B), f"{B * cfg.n_heads}", f"failed: {type(exc).__name__}"] + ["-"] * 11)
    report.table(
        "Prefill of one Miras layer (Moneta)",
        ["T", "batch", "batch x heads", "Triton slabs ms (graph)", "slabs eager ms", "fused kernel ms",
         "slabs (graph) vs fused", "Triton ktok/s", "Triton TFLOP/s", "PyTorch ms", "Triton speed-up",
         "SDPA layer ms", "SDPA TFLOP/s", "Triton vs SDPA (>1: faster)"], rows,
        f"Layer = q/k/v/gate projections, short conv, memory scan, output gate and projection; weights "
        f"{str(dtype).removeprefix('torch.')}; dot precision {dot_precision(device)}. Shape: d_model {cfg.d_model}, "
        f"{cfg.n_heads} heads x {cfg.head_dim}, expansion {cfg.memory_expansion}, chunk {cfg.chunk_size}. "
        "Triton slabs = the default prefill (kernels.prefill: hidden slabs, one launch per chunk phase), the "
        "whole layer replayed as a CUDA graph (kernels.graphs.capture) and eager; fused = the one-program-per-"
        "(sequence, head) scan kernel (MIRAS_PREFILL=fused), eager (one launch). ktok/s, TFLOP/s, the speed-up "
        f"over PyTorch and the ratio to SDPA use the graph time. TFLOP/s counts the memory's matrix products from "
        f"the prefill FLOP model (benchmarks/cost.py: "
        f"{memory_prefill_flops(cfg, 1, cfg.chunk_size) / cfg.n_heads / cfg.chunk_size / 1e3:.0f} kFLOP/token/head "
        f"per full chunk) plus the projections; the SDPA layer counts causal attention (2 T d per token per head) "
        f"plus its projections."
        + ("" if device.type == "cuda" else " CPU interpreter: no graphs (the graph column repeats the eager time), "
           "not a measurement."))


def prefill_row(layer: nn.Module, attention: nn.Module, cfg, B: int, T: int, device: torch.device,
                flops: float) -> list[str]:
    """One row of the prefill table (``flops``: the layer's): the layer on the Triton backend (slab prefill
    under a CUDA graph and eager, the fused kernel), on the PyTorch backend, and the SDPA layer."""
    from miras_serve.kernels.graphs import capture
    from miras_serve.models.backend import environment, forced_backend
    from miras_serve.models.layers import state_layout

    dtype = next(layer.parameters()).dtype
    x = torch.randn(B, T, cfg.d_model, device=device, dtype=dtype)
    state = layer.init_state(B, device, torch.float32, state_layout(cfg, "triton"))  # both backends run it
    pos = torch.zeros(B, dtype=torch.long, device=device)
    valid = torch.ones(B, T, dtype=torch.bool, device=device)
    lengths = torch.full((B,), T, dtype=torch.long, device=device)
    times = {}
    step = partial(layer, x, state, pos, valid, lengths)
    reps = 3 if device.type == "cuda" else 1  # the CPU smoke run: the interpreter, not a measurement
    with torch.inference_mode():
        with forced_backend("triton"):
            times["eager"] = timed(step, device, reps=reps)
            # (on a CPU there are no graphs: capture returns the step itself, timed above)
            cuda = device.type == "cuda"
            times["graph"] = timed(capture(step, device), device, reps=reps) if cuda else times["eager"]
            with environment("MIRAS_PREFILL", "fused"):
                times["fused"] = timed(step, device, reps=reps)
        with forced_backend("torch"):
            times["torch"] = timed(step, device, reps=1)
        times["sdpa"] = timed(partial(attention, x), device, reps=reps)
    tokens = B * T
    attn_flops = tokens * (2 * cfg.d_model * 4 * cfg.inner_dim + 2 * T * cfg.head_dim * cfg.n_heads)
    best = times["graph"]
    return [str(T), str(B), f"{B * cfg.n_heads}", f"{best * 1e3:.2f}", f"{times['eager'] * 1e3:.2f}",
            f"{times['fused'] * 1e3:.2f}", f"{times['fused'] / best:.2f}x", f"{tokens / best / 1e3:.1f}",
            f"{flops / best / 1e12:.3g}",
            f"{times['torch'] * 1e3:.2f}", f"{times['torch'] / best:.1f}x",
            f"{times['sdpa'] * 1e3:.2f}", f"{attn_flops / times['sdpa'] / 1e12:.1f}",
            f"{times['sdpa'] / best:.2f}x"]


def bench_fla(report: Report, device: torch.device) -> None:
    """fla's chunked gated delta rule at the prefill table's shapes (a yardstick; fla is optional)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as exc:  # fla is optional: a yardstick only
        report.text("fla yardstick", f"fla not importable here ({type(exc).__name__}: {exc}); skipped.")
        return
    rows = []
    H, d = FULL["n_heads"], FULL["head_dim"]
    for T in PREFILL_LENGTHS:
        for B in PREFILL_BATCHES:
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


@functools.cache
def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (bytes read + bytes written)."""
    n = (1 << 30) // 4 if device.type == "cuda" else 1 << 20
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), device, reps=10)


def step_cost(cfg, layout: str, batch: int, weight_bytes: float, n_miras_layers: int):
    """The byte model's cost of one decode step (benchmarks.cost), averaged over the positions of a chunk."""
    from benchmarks.cost import decode_step_cost

    return decode_step_cost(layout, cfg.memory, head_dim=cfg.head_dim, hidden=cfg.memory_hidden,
                            chunk_size=cfg.chunk_size, n_heads=cfg.n_heads, n_miras_layers=n_miras_layers,
                            batch=batch, weight_bytes=weight_bytes)


def bench_decode(report: Report, device: torch.device, smoke: bool) -> None:
    from miras_serve import models

    shape = TINY if smoke else FULL
    model = models.from_preset("moneta", **shape).to(device=device, dtype=torch.float32 if smoke else torch.bfloat16)
    model.eval()
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_miras = cfg.layer_kinds.count("M")
    bandwidth = copy_bandwidth(device)
    flush = torch.empty(L2_FLUSH_BYTES // 4 if device.type == "cuda" else 1, device=device)
    rows = []
    for B in [2] if smoke else DECODE_BATCHES:
        times = {}
        for layout in ("factored", "running"):  # the layout the triton backend runs first
            try:
                t, eager = decode_times(model, B, layout, device, flush, reps=1 if smoke else 20)
            except Exception as exc:  # out of memory at the largest batch, say: keep the other rows
                traceback.print_exc()
                rows.append([str(B), layout, f"failed: {type(exc).__name__}"] + ["-"] * 7)
                continue
            times[layout] = t
            moved = step_cost(cfg, layout, B, weight_bytes, n_miras).total_bytes
            rows.append([str(B), layout, f"{t * 1e3:.3f}", f"{B / t:,.0f}", f"{moved / 1e9:.3g}",
                         f"{moved / t / 1e9:,.3g}", f"{moved / t / bandwidth:.0%}",
                         f"{eager['triton'] * 1e3:.2f}" if eager else "-",
                         f"{eager['torch'] * 1e3:.2f}" if eager else "-",
                         f"{times['factored'] / t:.2f}x" if "factored" in times else "-"])
            torch.cuda.empty_cache() if device.type == "cuda" else None
    per_seq = {name: step_cost(cfg, name, 1, 0, n_miras) for name in ("running", "factored")}
    report.table(
        "Decode: whole model, one token per sequence, through the slot pool",
        ["batch", "state layout", "ms/step (graph, cold L2)", "tokens/s", "bytes that must move (GB)",
         "achieved GB/s", "of copy bandwidth", "eager Triton ms", "eager PyTorch ms", "time / factored's"], rows,
        f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads x {cfg.head_dim}, chunk "
        f"{cfg.chunk_size}; weights {weight_bytes / 1e9:.2f} GB; sequences at random positions (a mix of chunk "
        f"phases, as in serving); both state layouts of the same model side by side (the triton backend runs "
        f"the factored one). Bytes that must move = weights + batch x the byte model's state bytes per "
        f"sequence and step (benchmarks/cost.py, averaged over a chunk): running layout (anchor + running memory, "
        f"{per_seq['running'].state_bytes_per_sequence / 1e6:.4g} MB held) "
        f"{per_seq['running'].total_bytes / 1e6:.4g} MB, factored layout (anchor + factor rows, "
        f"{per_seq['factored'].state_bytes_per_sequence / 1e6:.4g} MB held) "
        f"{per_seq['factored'].total_bytes / 1e6:.4g} MB. Measured copy bandwidth {bandwidth / 1e9:,.0f} GB/s. "
        + ("CUDA graph replay; L2 flushed before each step." if device.type == "cuda" else
           "CPU interpreter: no graphs, not a measurement."))


def decode_times(model: nn.Module, batch: int, layout: str, device: torch.device, flush: torch.Tensor,
                 reps: int) -> tuple[float, dict[str, float]]:
    """Seconds per whole-model decode step through a slot pool in state ``layout``, sequences at random
    positions: CUDA graph with cold L2, and (for small batches) eager on both backends."""
    from miras_serve.kernels.graphs import capture
    from miras_serve.models.backend import forced_backend

    pool = model.init_state(batch, layout=layout)
    pool.pos.copy_(torch.randint(0, 4 * model.config.chunk_size, (batch,), device=device))
    ids = torch.randint(3, model.config.vocab_size, (batch, 1), device=device)
    slots = torch.arange(batch, device=device)
    eager = {}
    with torch.inference_mode(), forced_backend("triton"):
        step = capture(partial(model, ids, pool, slots=slots), device)
        t = timed(step, device, reps=reps, flush=flush)
        if batch <= 8:
            for backend in ("triton", "torch"):
                with forced_backend(backend):
                    eager[backend] = timed(partial(model, ids, pool, slots=slots), device, reps=min(reps, 3))
    return t, eager


def bench_decode_layouts(report: Report, device: torch.device, smoke: bool) -> None:
    """The memory's decode kernels alone, one Miras layer at the 340M head shape, both state layouts side by
    side at each batch (same rule, same positions): time, and the byte model's bytes over the time against
    the copy bandwidth. Checked against the fp64 reference first (one step from the same state)."""
    from benchmarks.kernel_cases import spec_case
    from miras_serve.kernels.scan import Factors, scan_pool
    from miras_serve.kernels.testing import (
        GATE_NAMES,
        factored_memory,
        random_factors,
        random_inputs,
        ref_scan,
        rel_err,
    )
    from miras_serve.models.config import preset_config

    shape = dict(n_heads=2, head_dim=8, chunk_size=4) if smoke else dict(
        n_heads=FULL["n_heads"], head_dim=FULL["head_dim"], memory_expansion=4, chunk_size=FULL["chunk_size"])
    flush = torch.empty(L2_FLUSH_BYTES // 4 if device.type == "cuda" else 1, device=device)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    bandwidth = copy_bandwidth(device)
    rows = []
    for rule in ["moneta"] if smoke else ["moneta", "memora"]:
        cfg = preset_config(rule, **shape)
        case = spec_case(cfg)
        for batch in [3] if smoke else DECODE_BATCHES:
            x = random_inputs(case, batch, 1, gen, device.type)
            tokens = [None if x[n] is None else x[n] for n in GATE_NAMES]
            tokens[:3] = [t.to(torch.bfloat16) for t in tokens[:3]]  # q, k, v as a bf16 model stores them
            pos = torch.randint(0, 4 * cfg.chunk_size, (batch,), generator=gen)
            factors = Factors(*(t.nan_to_num().to(device) for t in random_factors(case, pos, gen)))
            pos = pos.to(device)
            states = {"running": (x["anchor"], factored_memory(case.rule, x["anchor"], factors, pos)),
                      "factored": (x["anchor"], factors)}
            slots = torch.arange(batch, device=device)
            reference = ref_scan(case, *states["running"], pos, *tokens,
                                 torch.ones(batch, 1, dtype=torch.bool, device=device), x["ln_weight"], x["ln_bias"])
            times = {}
            variants = [("running", {}), ("factored", {})]
            if smoke:  # the fused kernel and the slabs
                variants += [("factored", FACTORED_DECODE_LAUNCHES[i]) for i in (0, 2)]
            elif batch >= 64:
                variants += [("factored", launch) for launch in FACTORED_DECODE_LAUNCHES]
            for layout, launch in variants:
                anchor, memory = states[layout]
                anchor = tuple(w.float().clone() for w in anchor)
                memory = (tuple(w.float().clone() for w in memory) if layout == "running" else
                          Factors(*(t.clone() for t in memory)))
                step = partial(scan_pool, case.rule, anchor, memory, slots, pos, *tokens, x["ln_weight"],
                               x["ln_bias"], launch=launch)
                error = rel_err(reference[0], step())
                # Positions stay put, so every timed step reads the same number of rows (the state advances).
                t = timed(step, device, reps=1 if smoke else 20, flush=flush)
                times.setdefault(layout, t)
                cost = step_cost(cfg, layout, batch, 0, 1)
                name = ", ".join(f"{k}={v}" for k, v in launch.items()) or "shipped"
                rows.append([rule, str(batch), layout, name, f"{t * 1e3:.3f}", f"{cost.total_bytes / 1e6:,.3g}",
                             f"{cost.total_bytes / t / 1e9:,.3g}", f"{cost.total_bytes / t / bandwidth:.0%}",
                             f"{error:.1e}", f"{times['running'] / t:.2f}x"])
    report.table(
        "Decode kernels alone: running vs factored state layout",
        ["rule", "batch", "layout", "launch", "ms", "bytes that must move (MB)", "achieved GB/s",
         "of copy bandwidth", "rel. error vs fp64", "speed-up over running"], rows,
        f"One Miras layer, {shape['n_heads']} heads x {shape['head_dim']}, chunk {shape['chunk_size']}, q/k/v "
        f"stored bf16, sequences at random positions over four chunks (some fold: the fused kernel takes those "
        f"rows), shipped launch_config and (batch >= 64) factored variants: SPLIT_D=0 runs every row through the "
        f"fused kernel. L2 flushed before each step. Bytes that must move: benchmarks/cost.py "
        f"for this layer at this batch, averaged over a chunk. Errors: the first step against the fp64 "
        f"reference from the same state.")


# Launch configurations compared side by side; the first of each list is the shipped launch_config.
SHOWN = ("BLOCK_D", "num_warps", "num_stages", "DOT", "SPLIT_D", "SPLIT_WARPS")
# Prefill: the slab-parallel kernels (shipped), then the fused scan kernel (SPLIT_D=0); the smoke run takes
# the first two (the interpreter runs every program of every launch in turn).
PREFILL_LAUNCHES = [{}, dict(SPLIT_D=0), dict(DOT="tf32"), dict(DOT="ieee"), dict(SPLIT_D=32, SPLIT_WARPS=8),
                    dict(SPLIT_D=32, SPLIT_WARPS=8, DOT="tf32"), dict(SPLIT_D=64, SPLIT_WARPS=8),
                    dict(SPLIT_D=16, SPLIT_WARPS=4), dict(SPLIT_D=0, DOT="tf32"), dict(SPLIT_D=0, BLOCK_D=64)]
DECODE_LAUNCHES = [{}, dict(SPLIT_D=0), dict(SPLIT_D=32, SPLIT_WARPS=4), dict(SPLIT_D=64, SPLIT_WARPS=4),
                   dict(SPLIT_D=16, SPLIT_WARPS=2)]
FACTORED_DECODE_LAUNCHES = [dict(SPLIT_D=0), dict(SPLIT_D=0, BLOCK_D=64), dict(SPLIT_D=32, SPLIT_WARPS=4),
                            dict(SPLIT_D=128, SPLIT_WARPS=8)]


def run_launch(cfg, x: dict, tokens: list, slots: torch.Tensor, pos: torch.Tensor, launch: dict,
               reference: tuple, check_tokens: int, device: torch.device, reps: int,
               flush: torch.Tensor) -> tuple[float, float, float]:
    """One launch configuration: its error against the fp64 ``reference`` of the first ``check_tokens``
    tokens (from a copy of the state in ``x``), then its median time on the whole input, launched eagerly
    and replayed as a CUDA graph (the copy keeps advancing; the timing does not depend on the values)."""
    from miras_serve.kernels.graphs import capture
    from miras_serve.kernels.scan import scan_pool
    from miras_serve.kernels.testing import rel_err

    anchor = tuple(w.clone() for w in x["anchor"])
    memory = tuple(w.clone() for w in x["memory"])
    prefix = [None if t is None else t[:, :, :check_tokens] for t in tokens]
    rule = cfg.memory_rule()
    reads = scan_pool(rule, anchor, memory, slots, pos, *prefix, x["ln_weight"], x["ln_bias"], launch=launch)
    ref_reads, ref_anchor, ref_memory = reference
    error = max(rel_err(r, g) for r, g in zip((ref_reads, *ref_anchor, *ref_memory), (reads, *anchor, *memory),
                                              strict=True))
    step = partial(scan_pool, rule, anchor, memory, slots, pos, *tokens, x["ln_weight"], x["ln_bias"], launch=launch)
    eager = timed(step, device, reps=reps, flush=flush)
    # (on a CPU there are no graphs: capture would return the step itself, timed above)
    graph = timed(capture(step, device), device, reps=reps, flush=flush) if device.type == "cuda" else eager
    return error, eager, graph


def bench_launch_configs(report: Report, device: torch.device, smoke: bool, modes: tuple[str, ...]) -> None:
    """The scan kernel alone at the 340M head shape under several launch configurations, each checked
    against the fp64 reference and timed on the same machine in the same run."""
    from benchmarks.kernel_cases import spec_case
    from miras_serve.kernels.precision import dot_precision
    from miras_serve.kernels.scan import launch_config
    from miras_serve.kernels.testing import GATE_NAMES, random_inputs, ref_scan
    from miras_serve.models.config import preset_config

    shape = dict(n_heads=2, head_dim=8, chunk_size=4) if smoke else dict(
        n_heads=FULL["n_heads"], head_dim=FULL["head_dim"], memory_expansion=4, chunk_size=FULL["chunk_size"])
    flush = torch.empty(L2_FLUSH_BYTES // 4 if device.type == "cuda" else 1, device=device)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    prefill_batch, prefill_T, decode_batch = (2, 6, 3) if smoke else (8, 8192, 64)
    check_T = 2 * shape["chunk_size"] + 5  # crosses two chunk boundaries; long runs of random inputs are chaotic
    rows = []
    for rule in ["moneta"] if smoke else ["moneta", "memora"]:
        cfg = preset_config(rule, **shape)
        for mode, batch, T, launches in (("prefill", prefill_batch, prefill_T, PREFILL_LAUNCHES),
                                         ("decode", decode_batch, 1, DECODE_LAUNCHES)):
            if mode not in modes:
                continue
            if smoke:  # prefill: the slabs and the fused kernel; decode: fused, split, and the shipped one
                launches = launches[:2] if mode == "prefill" else launches[:3]
            x = random_inputs(spec_case(cfg), batch, T, gen, device.type)
            tokens = [None if x[n] is None else x[n] for n in GATE_NAMES]
            tokens[:3] = [t.to(torch.bfloat16) for t in tokens[:3]]  # q, k, v as a bf16 model stores them
            slots = torch.arange(batch, device=device)
            pos = torch.randint(0, 4 * cfg.chunk_size, (batch,), generator=gen).to(device)
            checked = min(T, check_T)
            prefix = [None if t is None else t[:, :, :checked] for t in tokens]
            reference = ref_scan(spec_case(cfg), x["anchor"], x["memory"], pos, *prefix,
                                 torch.ones(batch, checked, dtype=torch.bool, device=device), x["ln_weight"],
                                 x["ln_bias"])
            shipped = launch_config(cfg.memory_rule(), mode == "decode", False, dot_precision(device))
            state_bytes = 3 * sum(w[0].numel() * 4 for w in x["memory"])  # anchor read, memory read + write
            for launch in launches:
                merged = {**shipped, **launch}
                # Show the knobs of the kernels that run: the slab prefill's or the fused kernel's.
                hidden = (("BLOCK_D", "num_warps", "num_stages") if merged.get("SPLIT_D") and mode == "prefill" else
                          () if merged.get("SPLIT_D") else ("SPLIT_WARPS",))
                name = ", ".join(f"{k}={v}" for k, v in merged.items()
                                 if (k in SHOWN or k in launch) and k not in hidden)
                try:
                    error, eager, t = run_launch(cfg, x, tokens, slots, pos, launch, reference, checked, device,
                                                 reps=1 if smoke else 5 if mode == "prefill" else 20,
                                                 flush=flush)
                except Exception as exc:  # a configuration that does not compile (shared memory, say)
                    traceback.print_exc()
                    rows.append([rule, mode, name, f"failed: {type(exc).__name__}", "-", "-", "-"])
                    continue
                if mode == "prefill":
                    flops = memory_prefill_flops(cfg, batch, T)
                    speed = f"{batch * T / t / 1e6:.2f} Mtok/s, {flops / t / 1e12:.3g} TFLOP/s"
                else:
                    rate = batch * state_bytes / t
                    speed = f"{rate / 1e9:,.0f} GB/s ({rate / copy_bandwidth(device):.0%} of copy)"
                rows.append([rule, mode, name, f"{t * 1e3:.3f}", f"{eager * 1e3:.3f}", speed, f"{error:.1e}"])
    report.table(f"Launch configurations of the scan kernel ({', '.join(modes)})",
                 ["rule", "mode", "launch", "ms (CUDA graph)", "ms (eager launches)", "throughput (graph)",
                  f"rel. error vs fp64 ({check_T} tokens)"], rows,
                 f"Kernel alone, {shape['n_heads']} heads x {shape['head_dim']}, chunk {shape['chunk_size']}, q/k/v "
                 f"stored bf16, from random states at random phases; prefill: batch {prefill_batch} x {prefill_T} "
                 f"tokens (TFLOP/s: the prefill FLOP model of benchmarks/cost.py from position 0); decode: batch "
                 f"{decode_batch}, one token, state bytes that must move (anchor read, memory "
                 "read + write) against the copy bandwidth, cold L2. The first row of each group is the shipped "
                 "launch_config (prefill: the slab-parallel kernels, SPLIT_D-wide slabs at SPLIT_WARPS warps; "
                 "SPLIT_D=0: the fused scan kernel). Each is timed replayed as a CUDA graph and launched eagerly "
                 "(the slab prefill launches chunks x phases kernels). Errors: the first "
                 f"{check_T} tokens (decode: the one step) against the fp64 "
                 "reference from the same state (random-input dynamics are chaotic over thousands of tokens, so "
                 "the long run itself has no exact answer to compare with).")


# The serve section: the whole server on the device over HTTP (smoke: tiny shapes on the CPU).
SERVE_CONCURRENCY = [1, 8, 64, 256]
SERVE_PROMPT, SERVE_OUTPUT, SERVE_LONG_PROMPT, SERVE_SHORT_PROMPT = 512, 128, 32768, 128


def serve_level(url: str, scratch: Path, name: str, model_dir: Path, concurrency: int, input_len: int,
                output_len: int, num_requests: int) -> dict:
    """One closed-loop load level of the project's load generator against ``url``: its summary plus the
    server's mean engine step time during the level (from /metrics)."""
    import asyncio

    from benchmarks.serving import run_phase, server_metrics

    before = asyncio.run(server_metrics(url))
    _, result = run_phase(url, scratch / name, [
        "--tokenizer", str(model_dir), "--input-len", f"fixed:{input_len}", "--output-len", f"fixed:{output_len}",
        "--ignore-eos", "--no-progress", "--num-warmups", "1"],
        ["--concurrency", str(concurrency), "--num-requests", str(num_requests)])
    after = asyncio.run(server_metrics(url))
    key = "miras:engine_step_duration_seconds"
    steps = after[f"{key}_count"] - before[f"{key}_count"]
    summary = result["levels"][0]["summary"]
    summary["engine_step_ms"] = 1e3 * (after[f"{key}_sum"] - before[f"{key}_sum"]) / steps if steps else math.nan
    return summary


@torch.inference_mode()
def engine_alone_step(model: nn.Module, tokenizer, batch: int, prompt_len: int, reps: int) -> float:
    """Seconds per decode step of the serving engine in process (no HTTP; CUDA graphs on a GPU), every
    one of ``batch`` sequences decoding, greedy."""
    from miras_serve.server.engine import EngineConfig, LLMEngine
    from miras_serve.server.request import RequestStatus
    from miras_serve.server.sampling_params import SamplingParams

    budget = max(2048, batch + model.config.chunk_size)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=budget,
                                                      state_cache_bytes=0))
    params = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        engine.add_request(str(i), torch.randint(3, engine.vocab_size, (prompt_len,), generator=gen).tolist(), params)
    while any(r.status is not RequestStatus.DECODING for r in engine.requests.values()):
        engine.step()
    return timed(engine.step, model.device, reps=reps)


def bench_serve(report: Report, device: torch.device, smoke: bool) -> bool:
    """``miras-serve`` on the device with a randomly initialised 340M-shape Moneta (bf16 weights, fp32 state),
    driven over HTTP by the load generator: output tokens/s, TTFT and ITL at each concurrency, with CUDA
    graphs and with --enforce-eager; the server's mean engine step against the engine alone in process
    and the kernel-only decode step (graph, cold L2) at the same batch; ITL after a long vs a short prompt."""
    import shutil
    import tempfile

    from deploy.local.launch import miras_serve
    from miras_serve import models
    from miras_serve.models.layers import state_layout
    from miras_serve.models.random_init import random_pretrained
    from miras_serve.server.pool_sizing import plan_pool

    levels = [2] if smoke else SERVE_CONCURRENCY
    prompt, output = (32, 8) if smoke else (SERVE_PROMPT, SERVE_OUTPUT)
    long_prompt, short_prompt = (64, 16) if smoke else (SERVE_LONG_PROMPT, SERVE_SHORT_PROMPT)
    scratch = Path(tempfile.mkdtemp(prefix="miras-gpu-check-serve-"))
    try:
        model_dir = random_pretrained("moneta", scratch / "moneta-340m", "micro" if smoke else "340m",
                                      vocab_size=512 if smoke else 32000)
        model, tokenizer = models.load_pretrained(model_dir, device=device,
                                                  dtype=torch.float32 if smoke else torch.bfloat16)
        state_bytes = model.init_state(1).nbytes_per_sequence()
        flush = torch.empty(L2_FLUSH_BYTES // 4 if device.type == "cuda" else 1, device=device)
        kernel_ms, engine_ms = {}, {}
        for batch in levels:
            kernel_ms[batch] = decode_times(model, batch, state_layout(model.config, "triton"), device, flush,
                                            reps=1 if smoke else 20)[0] * 1e3
            engine_ms[batch] = engine_alone_step(model, tokenizer, batch, prompt, reps=1 if smoke else 10) * 1e3
        sized = "-"
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            sized = str(plan_pool(state_bytes, tokenizer.vocab_size, free, total, 0.9, 1 << 30, None, 1).max_num_seqs)
        del model
        torch.cuda.empty_cache() if device.type == "cuda" else None
        slots = max(levels)
        flags = ["--max-num-seqs", str(slots)] + (["--max-num-batched-tokens", "64"] if smoke else [])
        rows, ok = [], True
        long_rows = []
        # (the smoke run starts one eager server: on a CPU the other mode compiles its decode step at start-up)
        modes = [("eager (CPU)", ["--enforce-eager"])] if smoke else [("CUDA graphs", []),
                                                                       ("--enforce-eager", ["--enforce-eager"])]
        for mode, extra in modes:
            with miras_serve(str(model_dir), *flags, *extra, threads=None,
                             log=scratch / f"server-{len(extra)}.log") as server:
                for c in levels:
                    s = serve_level(server.url, scratch, f"{mode}-{c}", model_dir, c, prompt, output,
                                    max(2, 2 * c) if smoke else max(4, 2 * c))
                    ok &= s["failed"] == 0
                    engine_rate = c / engine_ms[c] * 1e3
                    rows.append([mode, str(c), str(s["completed"]), f"{s['output_throughput']:,.0f}",
                                 f"{s['ttft_ms']['p50']:.0f} / {s['ttft_ms']['p99']:.0f}",
                                 f"{s['itl_ms']['p50']:.1f} / {s['itl_ms']['p99']:.1f}",
                                 f"{s['engine_step_ms']:.1f}", f"{engine_ms[c]:.1f}", f"{kernel_ms[c]:.1f}",
                                 f"{engine_rate:,.0f}", f"{s['output_throughput'] / engine_rate:.0%}"])
                if not extra:
                    for length in (short_prompt, long_prompt):
                        s = serve_level(server.url, scratch, f"long-{length}", model_dir, 1, length, output, 2)
                        ok &= s["failed"] == 0
                        long_rows.append([str(length), f"{s['ttft_ms']['p50']:,.0f}",
                                          f"{s['itl_ms']['p50']:.2f}", f"{s['itl_ms']['p99']:.2f}"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report.table(
        "Serving over HTTP: miras-serve with the load generator", [
            "mode", "concurrency", "requests", "output tok/s", "TTFT p50 / p99 ms", "ITL p50 / p99 ms",
            "server step ms (mean)", "engine-alone decode step ms", "kernel-only decode ms", "engine-alone tok/s",
            "HTTP / engine-alone tok/s"], rows,
        f"Randomly initialised `moneta` ({'micro' if smoke else '340m'} shape, `python -m models.random_init`), "
        f"{'fp32' if smoke else 'bf16'} weights, fp32 state of {state_bytes / 2**20:.2f} MiB per sequence; "
        f"`miras-serve {' '.join(flags)}` on this machine, driven by `miras-loadtest` (closed loop, "
        f"{prompt}-token prompts, {output} output tokens, ignore_eos, greedy, max(4, 2 x concurrency) requests "
        "after one warm-up). Server step = the engine's mean step time during the level (`miras:engine_step_"
        "duration_seconds`, prefill steps included); engine-alone = the engine in process, every sequence "
        "decoding; kernel-only = the model's decode step alone, graph replay, cold L2. With "
        f"--gpu-memory-utilization 0.9 and no --max-num-seqs the server would size its pool to {sized} sequences.")
    report.table(f"Serving over HTTP: decode after a long vs a short prompt ({modes[0][0]}, concurrency 1)",
                 ["prompt tokens", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms"], long_rows,
                 "Two requests each; a recurrent state does not grow with the context, so ITL should not either.")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU run under the Triton interpreter, tiny shapes")
    add_out_argument(parser)
    parser.add_argument("--commit", default=None, help="commit to name in the report (default: git's HEAD; "
                        "pass it where the tree is a copy without .git)")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
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

    slug = "smoke" if args.smoke else "".join(c if c.isalnum() else "-" for c in card).strip("-").lower()
    lines = header(f"Miras kernels GPU check{' (smoke)' if args.smoke else ''}", __spec__.name, argv,
                   f"card: {card}",
                   f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}",
                   commit=args.commit)
    report = Report(lines, args.out / f"gpu_check_{slug}_{now:%Y%m%d-%H%M}.md")
    print("\n".join(lines), flush=True)
    started = time.perf_counter()
    sections = {
        "correctness": ("Correctness", partial(check_correctness, report, device, args.smoke)),
        "precision": ("Dot rounding against its emulation", partial(check_dot_emulation, report, device, args.smoke)),
        "prefill": ("Prefill", partial(bench_prefill, report, device, args.smoke)),
        "decode": ("Decode", partial(bench_decode, report, device, args.smoke)),
        "decode-layouts": ("Decode kernels by state layout", partial(bench_decode_layouts, report, device, args.smoke)),
        "launch-prefill": ("Launch configurations (prefill)",
                           partial(bench_launch_configs, report, device, args.smoke, ("prefill",))),
        "launch-decode": ("Launch configurations (decode)",
                          partial(bench_launch_configs, report, device, args.smoke, ("decode",))),
        "serve": ("Serving over HTTP", partial(bench_serve, report, device, args.smoke)),
        # Last: fla autotunes each of its kernels on first use, which must not starve our own sections.
        "fla": ("fla yardstick", partial(bench_fla, report, device)),
    }
    if args.smoke or device.type != "cuda":
        del sections["fla"]
    ok = True
    for key, (title, section) in sections.items():
        if key not in args.skip:
            ok &= report.run_section(title, section)
    footer = f"Total wall time: {time.perf_counter() - started:.0f} s."
    print(f"\n{footer}", flush=True)
    report.write(footer)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
