"""``python -m workers``: one worker process, configured from the environment."""

from __future__ import annotations

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
