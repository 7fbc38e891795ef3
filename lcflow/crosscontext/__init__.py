"""Cross-context handoff (LCF-X): what a receiver that never saw the sharer's document can read.

    selection   which of the sharer's context positions to send: the question's attention over
                the context (SnapKV-style), per token or whole sentences, or chunk means
    placement   the receiver's cache with KV entries written where the document's text would sit
    alignment   a dense, closed-form map from the sharer's KV to the receiver's KV of the same text
    oracles     the ladder of packet designs, measured before anything is trained

The ladder (`lcflow bench oracles`) is what the packet design is chosen by.
"""
