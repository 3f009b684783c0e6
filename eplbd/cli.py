"""The ``eplbd`` command line."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("eplbd: nothing yet", file=sys.stderr)
    return 2
