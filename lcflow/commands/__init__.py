"""The `lcflow` sub-commands, one module each, with `register(subparsers)`: argument parsing and
checks, then a call into the layers below.

- demo.py: `lcflow demo`, the README's main command.
- handoff.py: `lcflow handoff`, one Handoff RPC, streamed.
- adapters.py: `lcflow adapters`, a running service's adapters.
- serve.py: `lcflow serve sharer|receiver`.
- train.py: `lcflow train`, any adapter or a text reader.
- prune.py: `lcflow prune`, drop closed layers.
- align.py: `lcflow align`, the closed-form KV alignment.
- compress.py: `lcflow compress`, a span packet narrowed to b numbers a row.
- heads.py: `lcflow heads`, a span adapter's retrieval heads.
- bridge.py: `lcflow bridge`, an LCF-X bridge adapter.
- info.py: `lcflow info`, what an adapter is.
- eval.py: `lcflow eval`, every method on the same samples.
- models.py: `lcflow models`, provision and list the demo models.
- bench.py: `lcflow bench`, one sub-command per lcflow.bench module.
- certs.py: `lcflow certs`, local certificates.
- preflight.py: checks of what a command was given, before anything slow.
"""
