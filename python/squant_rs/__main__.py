"""``python -m squant_rs``: the squant-rs command line (see ``squant_rs.cli``)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
