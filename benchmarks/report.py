"""The one report writer of the benchmarks: every report opens with the same header (machine, date, commit,
command line), its tables are Markdown, and it is written under ``--out`` (default: ``docs/benchmarks/`` of
the checkout this benchmarks/ folder is in, never a path inside an installed package). A section-by-section
report (``SectionedReport``) is rewritten after each section."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from miras_serve.models.train import cpu_name

CHECKOUT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = CHECKOUT / "docs" / "benchmarks"


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """``--out DIR``: where the report goes."""
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help="directory to write the report into (default: docs/benchmarks/ of this checkout)")


def git(*args: str) -> str:
    """``git args`` in this checkout, stripped; empty when git or the repository is missing."""
    try:
        return subprocess.run(["git", *args], cwd=CHECKOUT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    """The checkout's short commit, marked when tracked files differ from it."""
    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + (" (uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    """The host in one line: CPU, cores, how busy (the machine may be shared), OS, Python and torch."""
    torch = sys.modules.get("torch")
    versions = f"Python {platform.python_version()}" + (f", torch {torch.__version__}" if torch else "")
    return (f"{cpu_name()}, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}), "
            f"{platform.system()} {platform.release()}, {versions}")


def command(module: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces a run of ``python -m module``."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", module, *args])


def header(title: str, module: str, argv: Sequence[str] | None, *facts: str, commit: str | None = None
           ) -> list[str]:
    """A report's first lines: its title, then machine, date, commit (default: this checkout's), command, and
    the script's own ``facts``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return [f"# {title}", "", f"- machine: {machine()}", f"- date: {now:%Y-%m-%d %H:%M} UTC",
            f"- commit: `{commit or git_commit()}`", f"- command: `{command(module, argv)}`",
            *(f"- {fact}" for fact in facts), ""]


def table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a Markdown table."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def write(out: Path, name: str, lines: Sequence[str] | str) -> Path:
    """``out/name`` with ``lines`` (a newline at the end); the path is printed."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    text = lines if isinstance(lines, str) else "\n".join(lines)
    path.write_text(text.rstrip("\n") + "\n")
    print(f"wrote {path}")
    return path


class SectionedReport:
    """A report built section by section and rewritten at ``path`` after each one, so that a run cut short
    still leaves what it measured; a section that raises is recorded as failed and the next one runs."""

    def __init__(self, header_lines: list[str], path: Path) -> None:
        self.header, self.path = header_lines, path
        self.sections: list[list[str]] = []

    def write(self, footer: str = "") -> None:
        lines = list(self.header)
        for section in self.sections:
            lines += [*section, ""]
        write(self.path.parent, self.path.name, lines + ([footer] if footer else []))

    def run_section(self, title: str, section: Callable[[], bool | None]) -> bool:
        """Run one section: false when it returned False or raised."""
        started = time.perf_counter()
        print(f"\n[{datetime.datetime.now():%H:%M:%S}] {title} ...", flush=True)
        try:
            ok = section() is not False
        except Exception:  # report it and go on to the next section
            error = traceback.format_exc()
            print(error, flush=True)
            self.sections.append([f"## {title}: **FAILED**", "", "```", error[-3000:].rstrip("\n"), "```"])
            ok = False
        print(f"[{datetime.datetime.now():%H:%M:%S}] {title}: {time.perf_counter() - started:.0f} s", flush=True)
        self.write()
        return ok

    def table(self, title: str, columns: list[str], rows: list[list[str]], note: str = "") -> None:
        """A section of one table under ``## title``, with ``note`` above it."""
        self.sections.append([f"## {title}", "", *([note, ""] if note else []),
                              *table(columns, rows)])
        print("\n" + "\n".join(self.sections[-1]), flush=True)

    def text(self, title: str, body: str) -> None:
        """A section of text under ``## title``."""
        self.sections.append([f"## {title}", "", body])
