"""Benchmarks behind `lcflow bench <name>`; each module exposes `register(subparsers)` like a command."""
