"""Benchmarks behind `lcflow bench <name>`; each module exposes `register(subparsers)` like a command.

- latency.py: time to first answer token of the text channels, LCF and LCF-X, stage by stage;
  what it times (the model pair, the clock, each method's run) is latency_runs.py.
- load.py: many handoffs at once against running services.
- transport.py: MB/s of each stage of the latent transport, against raw gRPC loopback; its
  payloads and loopback server are transport_server.py, the timed stages transport_stages.py.
- packets.py: is a span packet about its document, and read? (lcflow.research.diagnostics)
- oracles.py: the oracle ladder (lcflow.research.oracles).
- samples.py: the samples a model-quality benchmark runs on.
- netns.py: network namespaces for link-shaped benchmarks and tests.
"""
