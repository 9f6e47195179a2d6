"""What to send: prompt and output lengths, prompt text, and when each request arrives."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# Plain words for the default synthetic corpus: readable text for any tokenizer, no data file needed.
SYNTHETIC_VOCABULARY = (
    "the of and to in that it with as for his was he be on by not her all but at they this from have had "
    "which she you or were their one so an what there when we my more said would them if into no time man "
    "who out up then little could other king love night day light sea heart world long house hand eyes old "
    "great good first life never under water summer winter stone river city voice door morning bright"
)


class Tokenizer(Protocol):
    def split(self, text: str) -> list: ...

    def join(self, tokens: list) -> str: ...


class WordTokenizer:
    """Whitespace words stand in for tokens when no tokenizer is given; the server's usage has the real counts."""

    def split(self, text: str) -> list:
        return text.split()

    def join(self, tokens: list) -> str:
        return " ".join(tokens)


class HFTokenizer:
    """A ``tokenizer.json`` (Hugging Face tokenizers format, as Miras checkpoints ship it)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tokenizer

        self.tokenizer = _Tokenizer.from_file(str(path))

    def split(self, text: str) -> list:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def join(self, tokens: list) -> str:
        return self.tokenizer.decode(tokens)


def load_tokenizer(spec: str | None) -> Tokenizer:
    """``None`` -> words; else a tokenizer.json file or a model directory holding one. By path only: the load
    generator is an HTTP client and knows nothing of the server's model names (a shipped model's directory is
    models/pretrained/NAME in a checkout)."""
    if spec is None:
        return WordTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"--tokenizer: {spec!r} is neither a tokenizer.json nor a model directory holding one "
                         "(a shipped model's is models/pretrained/NAME)")
    return HFTokenizer(path)


@dataclass(frozen=True)
class LengthDist:
    """``fixed:N``, ``uniform:LOW:HIGH`` (inclusive), or ``corpus`` / ``corpus:MAX`` (lengths of real text
    segments from the corpus, capped at MAX)."""

    kind: str
    low: int
    high: int

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        parts = spec.split(":")
        try:
            numbers = [int(p) for p in parts[1:]]
        except ValueError:
            raise ValueError(f"length distribution {spec!r}: bounds must be integers") from None
        if parts[0] == "fixed" and len(numbers) == 1 and numbers[0] >= 1:
            return cls("fixed", numbers[0], numbers[0])
        if parts[0] == "uniform" and len(numbers) == 2 and 1 <= numbers[0] <= numbers[1]:
            return cls("uniform", numbers[0], numbers[1])
        if parts[0] == "corpus" and len(numbers) <= 1 and all(n >= 1 for n in numbers):
            return cls("corpus", 1, numbers[0] if numbers else 1 << 30)
        raise ValueError(f"length distribution {spec!r}: use fixed:N, uniform:LOW:HIGH (1 <= LOW <= HIGH) "
                         "or corpus[:MAX]")


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: str | list[int]  # text, or token ids (the completions endpoint takes either)
    prompt_len: int
    max_tokens: int


class Workload:
    """Request i is a pure function of (seed, i), so runs, sweeps and reruns send the same requests."""

    def __init__(self, corpus: str, tokenizer: Tokenizer, input_len: LengthDist, output_len: LengthDist,
                 seed: int = 0):
        self.tokenizer, self.input_len, self.output_len, self.seed = tokenizer, input_len, output_len, seed
        # Paragraphs are the corpus' natural requests; a corpus without blank lines falls back to lines.
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", corpus) if p.strip()]
        segments = paragraphs if len(paragraphs) > 1 else [s.strip() for s in corpus.splitlines() if s.strip()]
        self.segments = [tokens for s in segments if (tokens := tokenizer.split(s))]
        if not self.segments:
            raise ValueError("the corpus holds no text")
        self.stream = tokenizer.split(corpus)
        while input_len.kind != "corpus" and len(self.stream) < input_len.high:
            # fixed/uniform prompts are windows of the corpus stream: repeat a short corpus to fit the longest
            self.stream = self.stream + self.stream

    def _length(self, dist: LengthDist, rng: random.Random) -> int:
        if dist.kind == "corpus":
            return min(len(rng.choice(self.segments)), dist.high)
        return rng.randint(dist.low, dist.high)

    def request(self, index: int) -> RequestSpec:
        rng = random.Random(f"{self.seed}/{index}")
        if self.input_len.kind == "corpus":
            tokens = rng.choice(self.segments)[: self.input_len.high]
        else:
            length = self._length(self.input_len, rng)
            start = rng.randrange(len(self.stream) - length + 1)
            tokens = self.stream[start:start + length]
        return RequestSpec(index, self.tokenizer.join(tokens), len(tokens), self._length(self.output_len, rng))


def synthetic_corpus(words: int = 50_000, seed: int = 0) -> str:
    """Paragraphs of plain words (sentence-like, 20-200 words each) for when no --corpus is given."""
    rng = random.Random(seed)
    vocabulary = SYNTHETIC_VOCABULARY.split()
    paragraphs, total = [], 0
    while total < words:
        n = rng.randint(20, 200)
        paragraphs.append(" ".join(rng.choice(vocabulary) for _ in range(n)))
        total += n
    return "\n\n".join(paragraphs)


def read_corpus(path: str) -> str:
    """A text file, or a JSON list of strings (e.g. exported prompts)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if path.endswith(".json"):
        items = json.loads(text)
        if not (isinstance(items, list) and all(isinstance(i, str) for i in items)):
            raise ValueError(f"--corpus {path}: a .json corpus must be a list of strings")
        return "\n\n".join(items)
    return text


def poisson_arrivals(rate: float, seed: int, num_requests: int | None = None,
                     duration: float | None = None) -> Iterator[float]:
    """Arrival times (seconds from start) of a Poisson process: exponential gaps with mean 1/rate.

    Always bounded: it stops after ``num_requests`` arrivals or at the first arrival past ``duration``.
    """
    if rate <= 0:
        raise ValueError("request rate must be positive")
    if num_requests is None and duration is None:
        raise ValueError("an arrival process needs num_requests or duration")
    rng = random.Random(f"arrivals/{seed}")
    t, count = 0.0, 0
    while num_requests is None or count < num_requests:
        if duration is not None and t >= duration:
            return
        yield t
        count += 1
        t += rng.expovariate(rate)
