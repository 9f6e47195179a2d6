"""Units for the load generator's statistics, workload and arrival process (no server involved)."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest

from miras_serve.loadtest.cli import build_parser, plan_loads
from miras_serve.loadtest.correctness import check_run
from miras_serve.loadtest.runner import Load
from miras_serve.loadtest.stats import SLO, RequestResult, distribution, peak_concurrency, percentile, summarize
from miras_serve.loadtest.workload import (
    HFTokenizer,
    LengthDist,
    WordTokenizer,
    Workload,
    poisson_arrivals,
    read_corpus,
    synthetic_corpus,
)


def result(index=0, sent=0.0, ttft=0.1, finished=1.1, tokens=11, error=None, prompt_tokens=None, itl=None):
    return RequestResult(index, prompt_len=8, max_tokens=tokens, scheduled_at=sent, sent_at=sent,
                         finished_at=finished, error=error, ttft=None if error else ttft,
                         output_tokens=0 if error else tokens, prompt_tokens=prompt_tokens, itl=itl or [])


@pytest.mark.parametrize("p", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(p):
    values = [random.Random(7).uniform(0, 10) for _ in range(1)] + [random.Random(i).expovariate(1) for i in range(57)]
    assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))


def test_percentile_edges():
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 101)


def test_distribution_scales_to_milliseconds():
    d = distribution([0.001, 0.002, 0.003], scale=1000)
    assert (d["count"], d["mean"], d["min"], d["max"], d["p50"]) == (3, pytest.approx(2.0), 1.0, 3.0, 2.0)
    assert math.isnan(distribution([])["p99"])


def test_tpot_excludes_the_first_token():
    assert result(ttft=0.1, finished=1.1, tokens=11).tpot == pytest.approx(0.1)  # 10 gaps over 1.0 s
    assert result(tokens=1).tpot is None  # no second token, no TPOT
    assert result(error="http_429").tpot is None
    assert result(sent=2.0, ttft=0.5, finished=3.5, tokens=3).e2e == pytest.approx(1.5)


def test_slo_parsing_and_goodput():
    slo = SLO.parse(["ttft:200", "tpot:50"])
    assert (slo.ttft, slo.tpot, slo.e2el) == (0.2, 0.05, None)
    good = result(ttft=0.1, finished=1.1, tokens=21)  # tpot 50 ms: on the limit is good
    slow_first = result(ttft=0.3, finished=1.3, tokens=21)
    slow_decode = result(ttft=0.1, finished=2.1, tokens=21)
    one_token = result(ttft=0.1, finished=0.1, tokens=1)
    failed = result(error="timeout")
    assert [slo.met_by(r) for r in (good, slow_first, slow_decode, one_token, failed)] == [
        True, False, False, True, False]
    assert SLO.parse(["e2el:1000"]).met_by(result(finished=1.0)) and not SLO.parse(["e2el:999"]).met_by(
        result(finished=1.0))
    for bad in (["ttft"], ["ttfb:10"], ["tpot:-1"], ["e2el:fast"]):
        with pytest.raises(ValueError, match="--goodput"):
            SLO.parse(bad)


def test_summary_counts_every_request_and_error():
    results = [
        result(0, sent=0.0, ttft=0.1, finished=1.0, tokens=10, prompt_tokens=20, itl=[0.1] * 9),
        result(1, sent=0.5, ttft=0.2, finished=2.0, tokens=30, itl=[0.05] * 29),
        result(2, sent=0.6, finished=0.7, error="http_429"),
        result(3, sent=0.7, finished=0.8, error="http_429"),
        result(4, sent=0.8, finished=1.5, error="stream_cut"),
    ]
    s = summarize(results, SLO.parse(["ttft:150"]))
    assert (s["requests"], s["completed"], s["failed"]) == (5, 2, 3)
    assert s["errors"] == {"http_429": 2, "stream_cut": 1}
    assert s["duration_s"] == pytest.approx(2.0)
    assert s["output_tokens"] == 40 and s["prompt_tokens"] == 20 + 8  # usage when reported, else the spec
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(20.0)
    assert s["total_token_throughput"] == pytest.approx(34.0)
    assert s["goodput"]["good_requests"] == 1 and s["goodput"]["request_goodput"] == pytest.approx(0.5)
    assert s["itl_ms"]["count"] == 38 and s["ttft_ms"]["count"] == 2 and s["e2el_ms"]["count"] == 2
    assert s["peak_concurrency"] == 3  # 0 and 1 overlap one short request at a time


def test_peak_concurrency_treats_back_to_back_as_sequential():
    assert peak_concurrency([result(0, sent=0, finished=1), result(1, sent=1, finished=2)]) == 1
    assert peak_concurrency([result(i, sent=0.1 * i, finished=5) for i in range(7)]) == 7


def test_poisson_arrivals_are_bounded_and_have_the_asked_rate():
    times = list(poisson_arrivals(rate=20.0, seed=3, num_requests=20_000))
    assert len(times) == 20_000 and times == sorted(times) and times[0] == 0.0
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(1 / 20, rel=0.03)
    # exponential gaps: standard deviation equals the mean
    assert statistics.stdev(gaps) == pytest.approx(1 / 20, rel=0.05)
    within = list(poisson_arrivals(rate=50.0, seed=3, duration=2.0))
    assert within and all(t < 2.0 for t in within) and len(within) == pytest.approx(100, abs=40)
    assert len(list(poisson_arrivals(rate=1000.0, seed=3, num_requests=5, duration=100.0))) == 5
    assert list(poisson_arrivals(rate=5.0, seed=9, num_requests=50)) == list(
        poisson_arrivals(rate=5.0, seed=9, num_requests=50))
    with pytest.raises(ValueError, match="bounded|num_requests or duration"):
        next(poisson_arrivals(rate=1.0, seed=0))
    with pytest.raises(ValueError, match="positive"):
        next(poisson_arrivals(rate=0.0, seed=0, num_requests=1))


@pytest.mark.parametrize(("spec", "expected"), [
    ("fixed:64", LengthDist("fixed", 64, 64)),
    ("uniform:8:32", LengthDist("uniform", 8, 32)),
    ("corpus", LengthDist("corpus", 1, 1 << 30)),
    ("corpus:256", LengthDist("corpus", 1, 256)),
])
def test_length_distributions_parse(spec, expected):
    assert LengthDist.parse(spec) == expected


@pytest.mark.parametrize("spec", ["fixed", "fixed:0", "uniform:9:8", "uniform:4", "gauss:3", "fixed:x", "corpus:0"])
def test_bad_length_distributions_are_refused(spec):
    with pytest.raises(ValueError, match="length distribution"):
        LengthDist.parse(spec)


def test_workload_lengths_and_determinism():
    workload = Workload(synthetic_corpus(50_000), WordTokenizer(), LengthDist.parse("uniform:5:40"),
                        LengthDist.parse("uniform:1:9"), seed=1)
    specs = [workload.request(i) for i in range(300)]
    assert all(5 <= s.prompt_len <= 40 and len(s.prompt.split()) == s.prompt_len for s in specs)
    assert all(1 <= s.max_tokens <= 9 for s in specs)
    assert {s.prompt_len for s in specs} >= {5, 40} and len({s.prompt for s in specs}) == 300
    assert workload.request(17) == specs[17]
    other_seed = Workload(synthetic_corpus(50_000), WordTokenizer(), LengthDist.parse("uniform:5:40"),
                          LengthDist.parse("uniform:1:9"), seed=2)
    assert other_seed.request(17) != specs[17]


def test_short_corpus_is_repeated_to_fit_long_prompts():
    workload = Workload("one two three", WordTokenizer(), LengthDist.parse("fixed:100"), LengthDist.parse("fixed:1"))
    assert workload.request(0).prompt_len == 100


def test_corpus_lengths_come_from_its_paragraphs(tmp_path):
    paragraphs = ["a " * n for n in (3, 7, 12)]
    corpus = tmp_path / "c.json"
    corpus.write_text('["' + '", "'.join(paragraphs) + '"]')
    workload = Workload(read_corpus(str(corpus)), WordTokenizer(), LengthDist.parse("corpus:10"),
                        LengthDist.parse("corpus"))
    specs = [workload.request(i) for i in range(60)]
    assert {s.prompt_len for s in specs} == {3, 7, 10}  # 12 is capped at 10
    assert {s.max_tokens for s in specs} == {3, 7, 12}
    with pytest.raises(ValueError, match="no text"):
        Workload("  \n\n ", WordTokenizer(), LengthDist.parse("corpus"), LengthDist.parse("corpus"))


def test_tokenizer_file_cuts_prompts_to_exact_token_counts(tiny_checkpoint):
    tokenizer = HFTokenizer(tiny_checkpoint / "tokenizer.json")
    workload = Workload(synthetic_corpus(3000), tokenizer, LengthDist.parse("fixed:50"), LengthDist.parse("fixed:4"))
    spec = workload.request(3)
    assert spec.prompt_len == 50 and len(tokenizer.split(spec.prompt)) == pytest.approx(50, abs=5)


def test_loads_are_always_bounded():
    with pytest.raises(ValueError, match="bounded"):
        Load(concurrency=4)
    with pytest.raises(ValueError, match="not both"):
        Load(concurrency=4, rate=1.0, num_requests=3)
    assert Load(concurrency=64, num_requests=10).workers == 10
    assert Load(rate=2.0, max_concurrency=16, duration=5).workers == 16


def plan(*argv: str):
    return plan_loads(build_parser().parse_args(list(argv)))


def test_cli_plans_single_runs_and_sweeps():
    assert plan() == ("concurrency", [Load(concurrency=8, num_requests=100)])
    assert plan("--request-rate", "2.5", "--duration", "30") == (
        "rate", [Load(rate=2.5, max_concurrency=256, duration=30.0)])
    axis, loads = plan("--sweep", "concurrency:1,4,16", "--num-requests", "40", "--duration", "60")
    assert axis == "concurrency" and [load.concurrency for load in loads] == [1, 4, 16]
    assert all((load.num_requests, load.duration) == (40, 60.0) for load in loads)
    assert [load.rate for load in plan("--sweep", "rate:0.5,2")[1]] == [0.5, 2.0]
    for argv, message in [(("--concurrency", "2", "--request-rate", "1"), "not both"),
                          (("--sweep", "workers:1,2"), "--sweep"), (("--sweep", "concurrency:1.5"), "whole"),
                          (("--concurrency", "0"), "at least 1"), (("--duration", "-1"), "positive")]:
        with pytest.raises(ValueError, match=message):
            plan(*argv)


def completed(index, tokens, prompt_tokens):
    r = result(index, tokens=tokens, prompt_tokens=prompt_tokens)
    r.usage_reported, r.finish_reason = True, "length"
    return r


def test_check_accepts_clean_rejections_and_matching_metrics():
    rejected = result(2, error="http_429")
    rejected.clean_rejection = True
    results = [completed(0, 16, 10), completed(1, 16, 12), rejected]
    before = {"miras:request_success_total": 5, "miras:generation_tokens_total": 80,
              "miras:prompt_tokens_total": 50, "miras:request_rejected_total": 1}
    after = {"miras:request_success_total": 7, "miras:generation_tokens_total": 112,
             "miras:prompt_tokens_total": 72, "miras:request_rejected_total": 2,
             "miras:num_requests_running": 0, "miras:num_requests_waiting": 0}
    report = check_run(results, 200, before, after, "miras:")
    assert report.passed, report.problems
    assert report.facts["cleanly_rejected"] == 1 and report.facts["lost"] == 0


def test_check_reports_lost_requests_and_disagreeing_metrics():
    unclean = result(1, error="http_503")  # a 503 without an OpenAI error body is not a clean rejection
    results = [completed(0, 16, 10), unclean, result(2, error="stream_cut")]
    after = {"miras:request_success_total": 2, "miras:generation_tokens_total": 16,
             "miras:prompt_tokens_total": 10, "miras:num_requests_running": 1}
    report = check_run(results, 503, {}, after, "miras:")
    problems = "\n".join(report.problems)
    assert "request 1: http_503" in problems and "request 2: stream_cut" in problems
    assert "/health answered 503" in problems
    assert "request_success_total rose by 2, the client saw 1" in problems
    assert "num_requests_running is 1" in problems
    assert report.facts["lost"] == 2
