"""The two services and what they share (entry points: `lcflow serve sharer|receiver`).

- sharer.py: the sharer service: the client-facing Handoff RPC and sessions.
- latent_stream.py: the sharer's latent stream to the receiver, encoded layer by layer.
- receiver.py: the receiver service: a latent stream in, decoded into its cache, generation out.
- server.py: errors with gRPC statuses, building, running and stopping a server.
- requests.py: checks of what a request asks for (texts, tokens, roles, mode, settings).
- concurrency.py: the concurrency bound and its queue.
- loading.py: the engine (one class for both roles): the model with its half of an adapter.
- config.py: ServiceConfig, the one typed configuration, from flags and LCFLOW_* variables.
- servicer.py: what both servicers share: the model loading in the background, ListAdapters.
- registry.py: the adapters a service can use, chosen per request, loaded on first use.
- adapter_names.py: how a request names an adapter (plain names inside --adapters).
- inspection.py: what an adapter directory is, read from its files without loading weights.
- readers.py: the text readers a receiver serves (HandoffRequest.text_reader).
- security.py: TLS, mutual TLS and bearer tokens on both hops.
- telemetry.py: OpenTelemetry tracing and logging set-up.
"""
