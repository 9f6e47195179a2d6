"""Structured outputs: a request's constraint (JSON schema, regex, choice, grammar) compiled by llguidance into
a matcher per sequence, which gives the tokens allowed next as a bitmask and is advanced with each sampled token.

llguidance was picked by measurement over xgrammar and outlines-core (docs/benchmarks/structured-cpu.md): on
our byte-level tokenizer it keeps special tokens out of text, enforces numeric bounds, and needs no loader
beyond the tokenizer's JSON. Its own torch "apply" kernel is torch.compiled on first use; we never call it:
the bitmask is unpacked to a boolean mask with plain tensor ops (``allowed_mask``), so no compile happens.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .sampling_params import GuidedDecoding, ParamError

try:
    import llguidance
    import llguidance.numpy as llg_numpy
except ImportError:  # the optional extra `structured` is not installed
    llguidance = None

# Compact JSON: no free whitespace between tokens, so a small model cannot spend its budget on blanks.
_JSON_OPTIONS = {"whitespace_flexible": False}
_ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
_BITS = torch.arange(32, dtype=torch.int32)


def available() -> bool:
    return llguidance is not None


class GrammarCompiler:
    """Turns a request's GuidedDecoding into an llguidance grammar (checked, cached) and makes matchers."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_id: int):
        if llguidance is None:
            raise RuntimeError("structured outputs need the llguidance package (pip install 'miras-serve[structured]')")
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_id)
        self.vocab_size = vocab_size
        self._compile = lru_cache(maxsize=256)(self._compile_uncached)

    def compile(self, guided: GuidedDecoding) -> None:
        """Check ``guided``'s grammar (compiled once, cached); ParamError naming its request field if invalid."""
        self._compile(guided)

    def _compile_uncached(self, guided: GuidedDecoding) -> Any:
        """A fresh matcher of the grammar, copied for each sequence: copies share the compiled lexer and its
        caches (a copy takes ~20 µs, a new matcher ~1 ms and slower first masks)."""
        grammar = _grammar(guided)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ParamError(guided.field, f"{guided.field}: invalid {guided.kind.replace('_', ' ')}: {error}")
        return llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)

    def matcher(self, guided: GuidedDecoding) -> GrammarMatcher:
        return GrammarMatcher(self._compile(guided).deep_copy())


def _grammar(guided: GuidedDecoding) -> str:
    matcher = llguidance.LLMatcher
    try:
        if guided.kind == "json_object":
            return matcher.grammar_from_json_schema(_ANY_JSON_OBJECT, defaults=_JSON_OPTIONS)
        if guided.kind == "json":
            schema = json.loads(guided.value)
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema must be an object")
            return matcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        if guided.kind == "regex":
            return matcher.grammar_from_regex(guided.value)
        if guided.kind == "choice":
            return llguidance.grammar_from("choice", guided.value)
        if guided.kind == "grammar":  # Lark (llguidance's syntax) or GBNF / EBNF (llama.cpp's), told apart
            return llguidance.grammar_from("grammar", guided.value)
    except (ValueError, TypeError) as exc:
        raise ParamError(guided.field, f"{guided.field}: invalid {guided.kind.replace('_', ' ')}: {exc}") from exc
    raise ParamError(guided.field, f"{guided.field}: unknown constraint kind {guided.kind!r}")


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: Any):
        self._matcher = matcher

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 words, bit i of word w: token 32 w + i)."""
        llg_numpy.fill_next_token_bitmask(self._matcher, bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance with the sampled token; False if the grammar did not allow it (the matcher is then dead)."""
        return self._matcher.consume_token(token_id) and not self._matcher.is_error()

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (e.g. after the closing brace of a JSON object)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


def allocate_bitmask(rows: int, vocab_size: int) -> np.ndarray:
    return np.zeros((rows, (vocab_size + 31) // 32), dtype=np.int32)


def allowed_mask(bitmask: np.ndarray, vocab_size: int, device: torch.device) -> Tensor:
    """[rows, words] int32 bitmask -> [rows, vocab_size] bool, True where a token is allowed."""
    words = torch.from_numpy(bitmask).to(device)
    bits = (words.unsqueeze(-1) >> _BITS.to(device)) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab_size].bool()
