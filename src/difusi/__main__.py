"""`python -m difusi ...` runs the `difusi` command line."""

import sys

from difusi.cli import main

if __name__ == "__main__":
    sys.exit(main())
