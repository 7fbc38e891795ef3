"""Probes behind design choices, kept runnable (`lcflow bench oracles`, `lcflow bench packets`, and
the modules run with `python -m`).

- oracles.py: the ladder of packet designs a receiver can read before anything is trained.
- diagnostics.py: is a packet about its document, and does the receiver read it?
- bridge_probe.py: the bridge's rungs, nothing trained (`python -m lcflow.research.bridge_probe`).
- retrieval_heads.py: which sharer heads find the asked fact (`python -m lcflow.research.retrieval_heads`).
- long_selection.py: how a span packet should select in long documents (`python -m lcflow.research.long_selection`).
- contextual_packet.py: a packet written and read by one LoRA'd model, against the same sentences as text (`python -m lcflow.research.contextual_packet`).
- interpolate_adapters.py: a tuned adapter blended with its starting map (`python -m lcflow.research.interpolate_adapters`).
"""
