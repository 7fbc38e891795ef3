"""The ground floor: what every layer above uses, with no lcflow imports of its own kind above.

- kv.py: a model's KV cache as tensors: its spec and identity, capture, RoPE removed and redone.
- prompting.py: how a model's input is built (chat template or plain), and the note's prompt.
- tokens.py: two tokenisations of one text aligned by character spans.
- layer_map.py: which sharer layer feeds which receiver layer.
- names.py: the names the command line offers (modes, methods, pairs), importable without torch.
- errors.py: UsageError, a mistake the user can fix.
"""
