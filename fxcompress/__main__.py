"""``python -m fxcompress``: the ``fxcompress`` command (:mod:`fxcompress.cli`)."""

import sys

from fxcompress.cli import main

if __name__ == "__main__":
    sys.exit(main())
