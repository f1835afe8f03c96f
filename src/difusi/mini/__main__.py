"""``python -m difusi.mini train|evaluate ...``: dispatch to the training or evaluation command."""

from __future__ import annotations

import sys

import difusi  # noqa: F401  (offline hub settings before any Hugging Face import)

USAGE = "usage: python -m difusi.mini {train,evaluate} [options]  (add --help after the command)"


def main(argv: list[str] | None = None) -> int:
    """Run ``train`` or ``evaluate`` with the remaining arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "evaluate"):
        print(USAGE, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from difusi.mini.train import main as train_main

        return train_main(rest)
    from difusi.mini.evaluate import main as evaluate_main

    return evaluate_main(rest)


if __name__ == "__main__":
    sys.exit(main())
