"""Evaluation: every method on the same samples.

- harness.py: runs each method (text channels, readers, LCF, LCF-X, C2C) on a sample.
- metrics.py: exact match, contains, token F1, answer extraction, confidence intervals.
- report.py: results.json, the Markdown table, paired differences and the plots.
- services.py: `lcflow eval --services`, the served methods through the Handoff RPC.
"""
