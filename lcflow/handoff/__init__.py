"""The handoff in one process: what the services do across the network, without it.

- pair.py: Sharer (prefill, encode, select) and Receiver (decode into its cache, generate).
- generation.py: the answer's generation: GenerationSettings, stopping criteria, streaming text out.
- c2c.py: C2C's same-context handoff (the fuser reads the sharer's KV).
- kvcomm.py: KVComm, the training-free baseline: the sharer's KV as a prefix in chosen layers.
- sessions.py: a sharer context prefilled once and reused by later handoffs.
- streaming.py: generation as a cancellable stream of text deltas.
"""
