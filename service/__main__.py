"""``python -m service`` is ``lrserve serve``."""

from __future__ import annotations

import sys

from service.cli import serve_main

if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
