"""`python -m vpl_trl.evaluate`: evaluate a saved reward model (see `vpl_trl.evaluation.cli`)."""

import sys

from .evaluation.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
