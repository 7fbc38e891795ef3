"""LCF-X packets at run time: which positions a fixed-size packet carries and where they land.

- selection.py: the question's attention over the sharer's context chooses positions or sentences.
- placement.py: KV entries written into the receiver's cache where the document's text would sit.
- alignment.py: a closed-form map from the sharer's KV to the receiver's KV of the same text.
- narrowing.py: a span packet's map narrowed to its b principal K/V directions (compressed packet).
"""
