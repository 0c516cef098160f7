"""``python -m dispatcher``: the demo, or ``top`` to watch a running server."""

from __future__ import annotations

from dispatcher._cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
