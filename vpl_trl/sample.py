"""`python -m vpl_trl.sample`: best-of-n per user from a reward model, or a conditioned policy (see
`vpl_trl.inference.sample`)."""

import sys

from .inference.sample import main

if __name__ == "__main__":
    sys.exit(main())
