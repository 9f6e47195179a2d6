"""The built wheel: it installs one import root, ``miras_serve``, plus the console scripts, and serves a
shipped model from a fresh virtual environment, away from the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import httpx
import pytest

from miras_serve.kernels import cpu_native
from miras_serve.loadtest.process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("miras-serve", "miras-train", "miras-loadtest")


# what the wheel is built from (pyproject.toml's package-dir mapping); copied, so that the build neither
# writes into the checkout nor reuses a stale build/ there
SOURCES = ("pyproject.toml", "README.md", "miras_serve", "models", "kernels", "server", "loadtest")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", ".*-work"))
        else:
            shutil.copy(ROOT / name, source / name)
    # no build isolation: the build backend (setuptools) comes from this environment, no network
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, text=True)
    (built,) = out.glob("miras_serve-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_env(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment holding only the wheel; its dependencies (torch, fastapi, ...) are read from
    this environment's site-packages through a path file (whose own path files, an editable install of the
    checkout among them, are not processed)."""
    env = tmp_path_factory.mktemp("venv") / "env"
    venv.create(env, with_pip=False)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (site / "dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True, text=True)
    return env


def clean_environ() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": "1"}


def test_the_wheel_holds_one_import_root(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"miras_serve", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert "miras_serve/models/pretrained/moneta-tiny/model.safetensors" in names
    assert "miras_serve/server/static/index.html" in names
    for source in cpu_native.SOURCES + cpu_native.HEADERS:  # built at first use
        assert f"miras_serve/kernels/cpu/{source.name}" in names
    assert not [n for n in names if "/benchmarks/" in n or "/tests/" in n]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in SCRIPTS:
        assert f"{script} = miras_serve." in scripts


def test_the_installed_package_imports_and_loads_the_shipped_models(fresh_env: Path, tmp_path: Path):
    site = Path(sysconfig.get_path("purelib", vars={"base": str(fresh_env), "platbase": str(fresh_env)}))
    installed = sorted(p.name for p in site.iterdir() if p.name not in ("dependencies.pth", "__pycache__"))
    assert [p for p in installed if not p.startswith("_")] == ["miras_serve", next(p for p in installed
                                                                                  if p.endswith(".dist-info"))]
    code = ("import importlib.util, miras_serve.models as m; "
            "assert importlib.util.find_spec('models') is None and importlib.util.find_spec('server') is None; "
            "print(m.__file__); print(sorted(m.shipped_models())); "
            "print(m.load_pretrained('moneta-tiny')[0].config.preset)")
    result = subprocess.run([str(fresh_env / "bin" / "python"), "-c", code], cwd=tmp_path, env=clean_environ(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    where, shipped, preset = result.stdout.splitlines()
    assert where.startswith(str(site))
    assert "moneta-tiny" in shipped and preset == "moneta"


def test_miras_serve_serves_from_the_wheel(fresh_env: Path, tmp_path: Path):
    for script in SCRIPTS:
        assert (fresh_env / "bin" / script).exists()
    port = free_port()
    command = [str(fresh_env / "bin" / "miras-serve"), "--model", "moneta-tiny", "--host", "127.0.0.1",
               "--port", str(port), "--enforce-eager", "--log-level", "warning"]
    with ServerProcess(command, url=f"http://127.0.0.1:{port}", env=clean_environ(), cwd=tmp_path) as server:
        response = httpx.post(f"{server.url}/v1/completions", timeout=120,
                              json={"model": "moneta-tiny", "prompt": "Once upon a time", "max_tokens": 4})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
