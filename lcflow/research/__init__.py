"""Probes behind design choices, kept runnable (`lcflow bench oracles`, `lcflow bench packets`).

- oracles.py: the ladder of packet designs a receiver can read before anything is trained.
- diagnostics.py: is a packet about its document, and does the receiver read it?
"""
