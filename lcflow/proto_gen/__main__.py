"""`python -m lcflow.proto_gen [PROTO_ROOT]`: regenerate the protobuf / gRPC modules in place."""

from __future__ import annotations

import logging
import sys

from lcflow.proto_gen import generate

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    generate(sys.argv[1] if len(sys.argv) > 1 else None)
