"""``python -m loadtest`` and the ``miras-loadtest`` console script."""

from __future__ import annotations

import sys

from miras_serve.loadtest.cli import run_cli


def main() -> None:
    sys.exit(run_cli(sys.argv[1:]))


if __name__ == "__main__":
    main()
