"""Third-party clients against a real ``miras-serve``: lm-evaluation-harness (``local-completions``) on a tiny
local task, loglikelihood and generate_until, with requests sent as token ids and as text; then a short
guidellm run. Nothing is configured by hand: the model directory is the only tokenizer either tool gets.

lm-eval's log-likelihoods are checked against the model's own, computed here in process on the same tokens
(BOS, then the context, then the continuation, split the way lm-eval splits them), within ``--tolerance``.

The tools are heavy and pin their own dependencies, so they live in a separate virtual environment
(``--tools-venv``; see docs/serving.md, "Third-party clients"); this script only runs their CLIs.

    python -m benchmarks.clients --tools-venv /tmp/evalenv [--model moneta-tiny]

Writes clients-cpu.md into ``--out`` (default docs/benchmarks/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import report
from deploy.local.launch import miras_serve
from miras_serve import models
from miras_serve.models.checkpoint import resolve

# (context, choices, index of the right one): multiple choice, scored by loglikelihood
CHOICE_DOCS = [
    ("ROMEO.\nBut soft, what light through yonder window", [" breaks", " sings", " falls"], 0),
    ("Shall I compare thee to a summer's", [" day", " night", " sea"], 0),
    ("JULIET.\nO Romeo, Romeo, wherefore art thou", [" Romeo", " Juliet", " here"], 0),
    ("To be, or not to be, that is the", [" question", " answer", " king"], 0),
    ("Now is the winter of our", [" discontent", " content", " summer"], 0),
    ("KING.\nMy lord, I", [" pray", " will", " am"], 1),
]
GENERATE_DOCS = [("ROMEO.\n", "I"), ("JULIET.\n", "O"), ("KING.\n", "My"), ("First Citizen:\n", "We")]


def write_tasks(directory: Path) -> list[str]:
    """A multiple-choice task and a generate_until task over local JSONL files; their names."""
    (directory / "choice.jsonl").write_text("".join(
        json.dumps({"context": c, "choices": ch, "label": label}) + "\n" for c, ch, label in CHOICE_DOCS))
    (directory / "generate.jsonl").write_text("".join(
        json.dumps({"context": c, "answer": a}) + "\n" for c, a in GENERATE_DOCS))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: \"{{context}}\"\n"
    (directory / "miras_choice.yaml").write_text(
        f"task: miras_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {directory / 'choice.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n")
    (directory / "miras_generate.yaml").write_text(
        f"task: miras_generate\n{common}dataset_kwargs:\n  data_files:\n    test: {directory / 'generate.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n")
    return ["miras_choice", "miras_generate"]


def lm_eval_command(tools: Path, url: str, name: str, model_dir: Path, tokenized: bool, tasks_dir: Path,
                    out: Path) -> list[str]:
    model_args = (f"model={name},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={model_dir},add_bos_token=True,tokenized_requests={tokenized},num_concurrent=1,"
                  "max_retries=1,max_length=4096")
    return [str(tools / "bin" / "lm_eval"), "--model", "local-completions", "--model_args", model_args,
            "--tasks", "miras_choice,miras_generate", "--include_path", str(tasks_dir), "--batch_size", "1",
            "--log_samples", "--output_path", str(out)]


def logged_samples(out: Path, task: str) -> list[dict]:
    (path,) = sorted(out.rglob(f"samples_{task}_*.jsonl"))[-1:]
    return [json.loads(line) for line in path.read_text().splitlines()]


def model_loglikelihood(model: models.MirasLM, tokenizer: models.MirasTokenizer, context: str,
                        continuation: str) -> float:
    """log p(continuation | BOS, context) by the model itself, split into tokens as lm-eval splits them
    (trailing spaces of the context move to the continuation; the continuation is what the whole adds)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context, add_bos=True)
    whole = tokenizer.encode(context + continuation, add_bos=True)
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole]))
    logprobs = torch.log_softmax(logits[0].float(), dim=-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context_ids), len(whole)))


def check_lm_eval(out: Path, model: models.MirasLM, tokenizer: models.MirasTokenizer) -> tuple[float, int, dict]:
    """Largest |lm-eval's loglikelihood - the model's|, how many were compared, and the tasks' metrics."""
    worst, count = 0.0, 0
    for sample in logged_samples(out, "miras_choice"):
        for arguments, response in zip(sample["arguments"].values(), sample["resps"], strict=True):
            context, continuation = arguments.values()  # {"arg_0": context, "arg_1": continuation}
            served = float(response[0][0])
            worst = max(worst, abs(served - model_loglikelihood(model, tokenizer, context, continuation)))
            count += 1
    (results,) = sorted(out.rglob("results_*.json"))[-1:]
    metrics = json.loads(results.read_text())["results"]
    return worst, count, metrics


def run_guidellm(tools: Path, url: str, name: str, model_dir: Path, out: Path, seconds: int
                 ) -> tuple[str, str]:
    """A short guidellm run, the model directory as its tokenizer; the command and its summary (requests
    completed and failed, output tokens/s)."""
    report = out / "guidellm.json"
    command = [str(tools / "bin" / "guidellm"), "run", "--backend",
               f"kind=openai_http,target={url},model={name},request_format=/v1/completions",
               "--tokenizer", f"kind=huggingface_auto,model={model_dir}",
               "--data", "kind=synthetic_text,prompt_tokens=64,output_tokens=16",
               "--profile", "kind=concurrent,streams=4", "--constraint", f"kind=max_duration,seconds={seconds}",
               "--output", f"kind=json,path={report}", "--disable-console-interactive"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"guidellm failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    totals = benchmark["metrics"]["request_totals"]
    tokens_per_second = benchmark["metrics"]["output_tokens_per_second"]["successful"]["mean"]
    return " ".join(command), (f"guidellm: {totals['successful']} requests completed, {totals['errored']} failed, "
                               f"{tokens_per_second:.1f} output tokens/s at concurrency 4")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser("python -m benchmarks.clients", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tools-venv", type=Path, required=True, help="virtual environment with lm-eval and guidellm")
    p.add_argument("--model", default="moneta-tiny", help="shipped model name or model directory")
    p.add_argument("--port", type=int, default=None, help="the server's port (default: a free one)")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--guidellm-seconds", type=int, default=20, help="0: skip guidellm")
    report.add_out_argument(p)
    args = p.parse_args(argv)

    model, tokenizer = models.load_pretrained(args.model)
    model = model.float().eval()
    model_dir = resolve(args.model)
    rows, commands = [], []
    server = miras_serve(args.model, "--max-num-seqs", "8", "--served-model-name", args.model, "--dtype", "float32",
                         port=args.port)
    url = server.url
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tasks_dir = Path(tmp)
            write_tasks(tasks_dir)
            for tokenized in (True, False):
                out = tasks_dir / f"out-{tokenized}"
                command = lm_eval_command(args.tools_venv, url, args.model, model_dir, tokenized, tasks_dir, out)
                start = time.monotonic()
                done = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                                      env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
                if done.returncode != 0:
                    raise RuntimeError(f"lm_eval failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
                worst, count, metrics = check_lm_eval(out, model, tokenizer)
                rows.append((f"lm-eval local-completions, tokenized_requests={tokenized}", count, worst,
                             metrics["miras_choice"].get("acc,none"), metrics["miras_generate"].get(
                                 "exact_match,none"), time.monotonic() - start))
                commands.append(" ".join(command))
                print(rows[-1], flush=True)
            guidellm, summary = run_guidellm(args.tools_venv, url, args.model, model_dir, tasks_dir,
                                             args.guidellm_seconds) if args.guidellm_seconds else (None, "")
            print(summary, flush=True)
    finally:
        server.stop(60)

    failed = [r for r in rows if not r[2] <= args.tolerance]
    lines = [
        *report.header("Third-party clients against miras-serve (CPU)", __spec__.name, argv,
                       f"model {args.model} (float32)"),
        "| client | log-likelihoods compared | max abs diff vs the model's own | acc (choice) | exact match "
        "(generate) | seconds |", "|---|---|---|---|---|---|",
        *[f"| {name} | {count} | {worst:.2e} | {acc:.3f} | {em:.3f} | {secs:.0f} |"
          for name, count, worst, acc, em, secs in rows], "",
        f"Tolerance {args.tolerance:g}: {'all within' if not failed else 'EXCEEDED'}.", "", summary, "",
        "Commands (the port and paths of this run):", "", "```sh", *commands,
        *([guidellm] if guidellm else []), "```"]
    report.write(args.out, "clients-cpu.md", lines)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
