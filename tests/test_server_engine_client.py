"""The HTTP layer talks to the engine through EngineClient only (server/engine_client.py)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from miras_serve.server.async_engine import AsyncEngine
from miras_serve.server.engine_client import EngineClient

SERVER = Path(__file__).resolve().parents[1] / "server"
HTTP_LAYER = ["api.py", "middleware.py", "errors.py", "limits.py", "protocol.py", "protocol_responses.py",
              *(p.name for p in SERVER.glob("serving_*.py"))]
ENGINE_SIDE = {"engine", "async_engine", "scheduler", "sampler", "decode_graphs", "pool_sizing", "state_tiers"}


def test_the_http_layer_imports_no_engine_internals():
    for name in HTTP_LAYER:
        tree = ast.parse((SERVER / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module not in ENGINE_SIDE, f"server/{name} imports .{node.module}"
            if isinstance(node, ast.Attribute) and node.attr == "engine" and isinstance(node.value, ast.Attribute):
                assert node.value.attr != "engine", f"server/{name}:{node.lineno} reaches through engine.engine"


def test_the_async_engine_implements_the_interface():
    members = [m for m in vars(EngineClient) if not m.startswith("_")]
    assert {"submit", "abort", "tokenizer", "model_info", "metrics_registry", "drain"} <= set(members)
    for member in members:
        ours = getattr(AsyncEngine, member, None)
        if isinstance(vars(EngineClient)[member], property):  # a property, or an attribute set at start-up
            init = inspect.getsource(AsyncEngine.__init__)
            assert isinstance(ours, property) or f"self.{member} = " in init or f"self.{member}: " in init, \
                member
            continue
        assert inspect.signature(ours) == inspect.signature(getattr(EngineClient, member)), member
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(getattr(EngineClient, member))
