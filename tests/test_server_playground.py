"""The playground page in process: served at / with its files, public even when the API needs a key (the page
asks for the key and sends it itself), and gone with --disable-playground. The browser drives it in
tests/test_playground_browser.py."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from miras_serve.server.api import PLAYGROUND_DIR, ServerSettings, ServerState, build_app
from miras_serve.server.async_engine import AsyncEngine
from miras_serve.server.cli import parse_args
from miras_serve.server.engine import EngineConfig, LLMEngine
from miras_serve.server.loader import load_model


def app_with(tiny_checkpoint, **settings):
    model, tokenizer = load_model(tiny_checkpoint)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, max_num_batched_tokens=64), "tiny")
    return build_app(ServerState(AsyncEngine(engine), ServerSettings("tiny", str(tiny_checkpoint), **settings)))


def get(app, path: str, **kw) -> httpx.Response:
    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return await client.get(path, **kw)

    return asyncio.run(run())


def test_page_and_its_files_are_served_without_a_key(tiny_checkpoint):
    app = app_with(tiny_checkpoint, api_keys=["secret"])
    page = get(app, "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', page.text)
    assert sorted(assets) == ["static/playground.css", "static/playground.js"]
    for asset in assets:
        response = get(app, "/" + asset)
        assert response.status_code == 200 and response.text == (PLAYGROUND_DIR / asset.split("/")[1]).read_text()
    assert get(app, "/v1/models").status_code == 401  # the API itself still needs the key
    assert get(app, "/static/nope.js").status_code == 404


def test_page_loads_nothing_from_elsewhere():
    for path in PLAYGROUND_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"https?://", text), f"{path.name} refers to another origin"


def test_disable_playground_makes_the_page_404(tiny_checkpoint):
    app = app_with(tiny_checkpoint, playground=False)
    assert get(app, "/").status_code == 404
    assert get(app, "/static/playground.js").status_code == 404
    assert get(app, "/version").status_code == 200


@pytest.mark.parametrize(("argv", "enabled"), [([], True), (["--disable-playground"], False)])
def test_cli_flag(argv, enabled):
    assert parse_args(argv).disable_playground is not enabled
