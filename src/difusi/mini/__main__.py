"""``python -m difusi.mini train|evaluate ...``: the same command as ``difusi mini train|evaluate ...``."""

from __future__ import annotations

import sys

from difusi.cli import main as difusi_main


def main(argv: list[str] | None = None) -> int:
    """Run ``difusi mini`` with these arguments (one dispatcher, one way of reporting bad input)."""
    return difusi_main(["mini", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
