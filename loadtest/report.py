"""Reports: raw JSON, a Markdown summary with p50/p90/p99, and PNG plots (latency CDFs, sweep curves)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from miras_serve.loadtest.stats import PERCENTILES, latency_samples

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency"))


def write_json(path: Path, meta: dict, levels: list[dict]) -> None:
    """``levels``: [{"load": {...}, "summary": {...}, "results": [RequestResult, ...], ...}]."""
    def plain(level: dict) -> dict:
        return {**level, "results": [dataclasses.asdict(r) for r in level["results"]]}

    def no_nan(value):  # JSON has no NaN: an empty distribution becomes null
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: no_nan(v) for k, v in value.items()}
        if isinstance(value, list):
            return [no_nan(v) for v in value]
        return value

    path.write_text(json.dumps(no_nan({"meta": meta, "levels": [plain(level) for level in levels]}), indent=1))


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(meta: dict, levels: list[dict]) -> str:
    lines = [f"# {meta.get('title', 'Load test')}", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items() if key != "title"]
    goodput = any("goodput" in level["summary"] for level in levels)
    lines += ["", "## Throughput", "",
              "| load | requests | completed | errors | peak in flight | duration s | req/s | output tok/s "
              "| total tok/s |" + (" goodput req/s |" if goodput else ""),
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if goodput else "")]
    for level in levels:
        s = level["summary"]
        errors = ", ".join(f"{kind} {n}" for kind, n in sorted(s["errors"].items())) or "0"
        row = (f"| {level['label']} | {s['requests']} | {s['completed']} | {errors} | {s['peak_concurrency']} "
               f"| {fmt(s['duration_s'])} | {fmt(s['request_throughput'], 2)} | {fmt(s['output_throughput'])} "
               f"| {fmt(s['total_token_throughput'])} |")
        if goodput:
            row += f" {fmt(s.get('goodput', {}).get('request_goodput', math.nan), 2)} |"
        lines.append(row)
    percentile_cols = " | ".join(f"p{p}" for p in PERCENTILES)
    for key, name in LATENCIES:
        lines += ["", f"## {name} (ms)", "", f"| load | mean | {percentile_cols} | max |",
                  "|---|---|" + "---|" * len(PERCENTILES) + "---|"]
        for level in levels:
            d = level["summary"][f"{key}_ms"]
            cells = " | ".join(fmt(d[f"p{p}"]) for p in PERCENTILES)
            lines.append(f"| {level['label']} | {fmt(d['mean'])} | {cells} | {fmt(d['max'])} |")
    checks = [level for level in levels if "check" in level]
    if checks:
        lines += ["", "## Correctness", ""]
        for level in checks:
            verdict = "passed" if not level["check"]["problems"] else "FAILED"
            facts = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in level["check"]["facts"].items())
            lines.append(f"- {level['label']}: {verdict} ({facts})")
            lines += [f"  - {problem}" for problem in level["check"]["problems"]]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(path: Path, levels: list[dict]) -> None:
    plt = _pyplot()
    from matplotlib import ticker

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, name) in zip(axes.flat, LATENCIES, strict=True):
        for level in levels:
            values = sorted(1000 * v for v in latency_samples(level["results"], key))
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                        label=level["label"])
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of token gaps")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(path: Path, levels: list[dict], axis: str) -> None:
    """Throughput and latency percentiles against the swept concurrency or rate."""
    plt = _pyplot()
    x = [level["load"][axis] for level in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(x, [level["summary"]["output_throughput"] for level in levels], "o-", label="output tok/s")
    left.plot(x, [level["summary"]["total_token_throughput"] for level in levels], "s--", label="total tok/s")
    left.set_ylabel("tokens / s")
    twin = left.twinx()
    twin.plot(x, [level["summary"]["request_throughput"] for level in levels], "^:", color="gray", label="req/s")
    twin.set_ylabel("requests / s")
    left.legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2E")):
        for p, style in ((50, "o-"), (99, "x--")):
            right.plot(x, [level["summary"][f"{key}_ms"][f"p{p}"] for level in levels], style, label=f"{name} p{p}")
    right.set_ylabel("ms")
    right.set_yscale("log")
    right.legend(fontsize=8, ncol=3)
    for ax in (left, right):
        ax.set_xlabel("concurrency" if axis == "concurrency" else "request rate (req/s)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{v:g}" for v in x])  # the swept values themselves, not powers of two
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"Throughput and latency vs {axis}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
