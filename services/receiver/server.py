"""The receiver service's entry point: `python -m services.receiver.server [FLAGS]` from a checkout,
the same as `lcflow serve receiver [FLAGS]` (every flag: `lcflow serve receiver --help`).

The service itself is lcflow.serving.receiver (installed with the package); this directory is the
documented place to start one from a source tree, and the Dockerfile's target.
"""

import sys

from lcflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "receiver", *sys.argv[1:]]))
