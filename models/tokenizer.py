"""Byte-level BPE tokenizer (HF ``tokenizers``) with the special tokens training and serving share."""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2

# Used when a checkpoint's tokenizer_config.json names no chat template: one line per turn,
# "<role>: <content>", then "assistant:" to prompt the reply.
DEFAULT_CHAT_TEMPLATE = "{role}: {content}\n"
DEFAULT_GENERATION_PROMPT = "assistant:"
# Longest input a Hugging Face tokenizer loaded from our files accepts without a warning: a recurrent state
# has no context wall (transformers' own "no limit" is int(1e30), which JSON writes as a float).
MODEL_MAX_LENGTH = 1 << 62


def with_bos(tokenizer: Tokenizer) -> Tokenizer:
    """Give ``tokenizer`` the post-processor that prepends BOS when special tokens are asked for: the one
    place BOS is added, by the server (text prompts) and by any client loading tokenizer.json."""
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1", special_tokens=[(BOS_TOKEN, bos_id)])
    return tokenizer


def jinja_chat_template(template: str, generation_prompt: str) -> str:
    """The Jinja chat template (what Hugging Face's tokenizers and lm-eval render) that writes exactly what
    ``MirasTokenizer.apply_chat_template`` writes for a ``{role}``/``{content}`` format string."""
    def literal(text: str) -> str:
        return f"{{% raw %}}{text}{{% endraw %}}" if text else ""

    turn = ""
    for text, name, _, _ in string.Formatter().parse(template):
        turn += literal(text)
        if name is not None:
            if name not in ("role", "content"):
                raise ValueError(f"chat template field {{{name}}}: only {{role}} and {{content}} exist")
            turn += f"{{{{ message['{name}'] }}}}"
    return (f"{{% for message in messages %}}{turn}{{% endfor %}}"
            f"{{% if add_generation_prompt %}}{literal(generation_prompt)}{{% endif %}}")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-unicode table that ByteLevel pre-tokenisation uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class MirasTokenizer:
    """Wraps a ``tokenizers.Tokenizer``: text <-> ids, per-token bytes, and the chat format."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = None,
                 generation_prompt: str | None = None):
        """A tokenizer.json written before BOS moved into its post-processor gets it here."""
        self.tokenizer = tokenizer if tokenizer.post_processor is not None else with_bos(tokenizer)
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self.generation_prompt = generation_prompt if generation_prompt is not None else DEFAULT_GENERATION_PROMPT
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if None in ids:
            raise ValueError(f"tokenizer lacks the special tokens {SPECIAL_TOKENS}")
        self.pad_token_id, self.bos_token_id, self.eos_token_id = ids
        self.special_ids = frozenset(ids)
        self._bytes_cache: dict[int, bytes] = {}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # BOS comes from the post-processor (with_bos), as for every client of tokenizer.json.
        # encode_batch_fast releases the GIL (encode holds it throughout: seconds for a long text, during
        # which no other Python thread runs) and skips the offsets nobody here uses
        ids = self.tokenizer.encode_batch_fast([text], add_special_tokens=add_bos)[0].ids
        if add_bos and ids[1:2] == [self.bos_token_id]:
            # the text starts with BOS's own text (lm-eval decodes ids that hold BOS back to text): one BOS
            return ids[1:]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # decode_batch releases the GIL (decode does not), as encode_batch_fast above
        return self.tokenizer.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (special tokens: empty), for incremental decoding."""
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            piece = self.tokenizer.id_to_token(token_id)
            if piece is None:
                raise ValueError(f"token id {token_id} is not in the vocabulary")
            if token_id in self.special_ids:
                cached = b""
            else:
                table = _byte_decoder()
                cached = bytes(table[c] for c in piece)
            self._bytes_cache[token_id] = cached
        return cached

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text = "".join(self.chat_template.format(role=m["role"], content=m["content"]) for m in messages)
        return text + (self.generation_prompt if add_generation_prompt else "")

    def hf_config(self) -> dict[str, object]:
        """tokenizer_config.json: what ``transformers.AutoTokenizer`` needs to load the directory (and
        ``GET /tokenizer_info`` serves), plus our own chat format (``miras_chat_template``)."""
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
                "pad_token": PAD_TOKEN, "add_bos_token": True, "add_eos_token": False,
                "model_max_length": MODEL_MAX_LENGTH, "clean_up_tokenization_spaces": False,
                "chat_template": jinja_chat_template(self.chat_template, self.generation_prompt),
                "miras_chat_template": self.chat_template, "generation_prompt": self.generation_prompt}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(self.hf_config(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> MirasTokenizer:
        directory = Path(directory)
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        # directories written before the Jinja template was added hold our format under "chat_template"
        template = config.get("miras_chat_template", config.get("chat_template"))
        return cls(tokenizer, template, config.get("generation_prompt"))


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> MirasTokenizer:
    """Train a byte-level BPE whose first ids are the special tokens (pad 0, bos 1, eos 2)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return MirasTokenizer(tokenizer)
