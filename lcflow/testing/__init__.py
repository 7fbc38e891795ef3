"""Models for tests and benchmarks, built from configs (no downloads).

- tiny.py: tiny random models with real tokenizers.
- paper_pair.py: the paper's model pair by shape only.
"""
