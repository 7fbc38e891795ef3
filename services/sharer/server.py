"""The sharer service's entry point: `python -m services.sharer.server [FLAGS]` from a checkout,
the same as `lcflow serve sharer [FLAGS]` (every flag: `lcflow serve sharer --help`).

The service itself is lcflow.serving.sharer (installed with the package); this directory is the
documented place to start one from a source tree, and the Dockerfile's target.
"""

import sys

from lcflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "sharer", *sys.argv[1:]]))
