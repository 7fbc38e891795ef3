"""Latent Cache Flow: model-to-model communication through compressed KV caches.

The package is laid out by layer, lowest first; a module imports only from its own package or
from a lower layer (tests/unit/test_layers.py checks every import, inside functions too):

    0  core        KV capture and RoPE, prompting, token alignment, layer maps, names, errors
       tasks       the QA task families and task files
       provision   the demo models, from pinned PyPI wheels
    1  packets     the runtime maths of LCF-X packets: selection, placement, alignment
       transport   the wire format: segments, codecs, quantization, the link meter
       testing     tiny models and the paper pair by shape, for tests and benchmarks
    2  adapter     the adapter families (LCF, LCF-X spans and bridge, C2C, text readers), their
                   config and model cards
    3  handoff     the in-process handoff (sharer, receiver), C2C's, sessions, streaming
    4  serving     the two services, their config, adapter registry, security and telemetry
    5  client      the Python client of the Handoff RPC
    6  eval        the harness, metrics and reports, in-process or through the services
    7  training    adapter, bridge, reader and C2C training, the LCF-X recipe, their corpus and heads
    8  research    probes behind design choices: the oracle ladder, packet diagnostics
       demo        `lcflow demo`
    9  bench       `lcflow bench`: latency, load, transport, packets, oracles
   10  commands    one module per `lcflow` sub-command: argument parsing, then a call below
   11  cli         the `lcflow` entry point
"""

__version__ = "0.1.0"
