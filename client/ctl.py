"""eplbctl: the operator CLI. The commands arrive with the daemon (issue 3)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("eplbctl: no daemon commands yet in this build", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
