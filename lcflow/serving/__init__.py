"""The two services and what they share (entry points: `lcflow serve sharer|receiver`).

- sharer.py: the sharer service: the client-facing Handoff RPC, sessions, the latent stream out.
- receiver.py: the receiver service: a latent stream in, decoded into its cache, generation out.
- server.py: errors with gRPC statuses, request checks, the concurrency bound, building a server.
- config.py: ServiceConfig, the one typed configuration, from flags and LCFLOW_* variables.
- registry.py: the adapters a service can use, named per request, loaded on first use.
- readers.py: the text readers a receiver serves (HandoffRequest.text_reader).
- security.py: TLS, mutual TLS and bearer tokens on both hops.
- telemetry.py: OpenTelemetry tracing and logging set-up.
"""
