"""The tokenizer files every model directory carries: BOS added by tokenizer.json's post-processor exactly as
the server adds it, and a tokenizer_config.json that transformers.AutoTokenizer loads (chat template
included) with the same ids, text and chat rendering as MirasTokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from miras_serve import models
from miras_serve.models.random_init import random_pretrained
from miras_serve.models.tokenizer import BOS_TOKEN, MirasTokenizer, jinja_chat_template

transformers = pytest.importorskip("transformers")

TEXTS = ["ROMEO.\nBut soft, what light", "  two  spaces, <|endoftext|> inside", "é ü 字 🙂", ""]
MESSAGES = [{"role": "system", "content": "Be {brief}."}, {"role": "user", "content": "Who art thou?\n"},
            {"role": "assistant", "content": "A rose."}]


@pytest.fixture(scope="module")
def directories(tmp_path_factory, tiny_checkpoint) -> list:
    """Every shipped model, one written by save_pretrained (as miras-train writes) and one by random_init."""
    shipped = sorted(p for p in (Path(models.__file__).parent / "pretrained").iterdir() if p.is_dir())
    random_dir = random_pretrained("linear", tmp_path_factory.mktemp("rand") / "m", vocab_size=300)
    return [*shipped, tiny_checkpoint, random_dir]


def test_bos_comes_from_the_post_processor_as_the_server_adds_it(directories):
    for directory in directories:
        ours = MirasTokenizer.load(directory)
        raw = Tokenizer.from_file(str(directory / "tokenizer.json"))  # what any client of the file sees
        for text in TEXTS:
            with_bos = ours.encode(text, add_bos=True)
            assert with_bos[0] == ours.bos_token_id and with_bos.count(ours.bos_token_id) == 1
            assert raw.encode(text).ids == with_bos
            assert raw.encode(text, add_special_tokens=False).ids == ours.encode(text) == with_bos[1:]


def test_a_text_that_starts_with_bos_gets_no_second_one(tokenizer):
    # what lm-eval sends with tokenized_requests=False and add_bos_token=True: its BOS-first ids decoded
    ids = tokenizer.encode("Shall I compare thee", add_bos=True)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith(BOS_TOKEN) and tokenizer.encode(text, add_bos=True) == ids
    assert tokenizer.encode(text) == ids  # without add_bos, the text's own BOS stays


def test_auto_tokenizer_loads_every_model_directory_and_agrees(directories):
    for directory in directories:
        ours = MirasTokenizer.load(directory)
        hf = transformers.AutoTokenizer.from_pretrained(str(directory))
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_token_id, ours.eos_token_id,
                                                                        ours.pad_token_id)
        for text in TEXTS:
            ids = ours.encode(text, add_bos=True)
            assert hf(text)["input_ids"] == ids
            assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
            assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)
        for prompt in (True, False):
            assert hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=prompt) == \
                ours.apply_chat_template(MESSAGES, add_generation_prompt=prompt)


def test_an_old_directory_without_the_post_processor_still_gets_one_bos(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    old = {"bos_token": BOS_TOKEN, "chat_template": config["miras_chat_template"],
           "generation_prompt": config["generation_prompt"]}  # the format written before
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(old))
    loaded = MirasTokenizer.load(tmp_path)
    assert loaded.encode("thee", add_bos=True) == tokenizer.encode("thee", add_bos=True)
    assert loaded.encode("thee", add_bos=True).count(loaded.bos_token_id) == 1
    assert loaded.apply_chat_template(MESSAGES) == tokenizer.apply_chat_template(MESSAGES)


def test_jinja_template_keeps_braces_and_refuses_unknown_fields():
    from jinja2 import Environment
    template = Environment().from_string(jinja_chat_template("[{role}] {{x}} {content}|", ">"))
    assert template.render(messages=MESSAGES[:1], add_generation_prompt=True) == "[system] {x} Be {brief}.|>"
    with pytest.raises(ValueError, match="name"):
        jinja_chat_template("{name}: {content}", "")
