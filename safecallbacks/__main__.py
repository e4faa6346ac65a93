"""``python -m safecallbacks demo``: see the problem and the fix side by side."""

from __future__ import annotations

import sys

from ._demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
