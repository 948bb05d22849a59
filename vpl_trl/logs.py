"""Messages of vpl-trl's modules: each logs with a `transformers.utils.logging` logger named after it (`vpl_trl.*`).

Warnings show by default, on stderr (as Python shows any warning logged before logging is configured); progress
notes, such as embedding throughput, are INFO, which the command-line entry points show with `show_info_logs`.
"""

from __future__ import annotations

import logging


def show_info_logs() -> None:
    """Show vpl-trl's INFO messages too: one line each on stderr, or through the handlers the program set up."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("vpl_trl").setLevel(logging.INFO)
