"""``python -m safecallbacks``: the demo, ``check`` and ``--version`` (see ``_cli``).

Nothing here runs on the token path.
"""

from __future__ import annotations

import os
import sys

from ._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    code = main(sys.argv[1:])
    from ._measure import abandoned_streams

    if abandoned_streams():
        # A handler `check` gave up on is still hung in a thread; the interpreter's exit
        # would join LangChain's executor threads behind it forever. The report is out.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
