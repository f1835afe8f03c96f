"""Write docs/samplers/samplers-report.md and .png (thin wrapper over difusi.samplers.report.write_report).

    python bench/sampler_report.py [--quick] [--out DIR]
"""

import argparse
from pathlib import Path

from difusi.samplers.report import write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2,000 samples per stochastic sampler instead of 10,000")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "samplers")
    args = parser.parse_args()
    print(write_report(args.out, quick=args.quick))


if __name__ == "__main__":
    main()
