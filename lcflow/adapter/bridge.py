"""LCF-X across model families: a packet of soft tokens, read by the receiver's own span adapter.

Per-token KV translation between families is unreadable for a small receiver (docs/lcfx.md,
section 6), but two agents on one base model work (a task-trained span packet, 0.825 EM). The
bridge packet composes the two. The sharer translates the sentences it selects into vectors of
the *receiver's input-embedding space* (soft tokens); the receiver reads them with its own
model, as a sharer of its own family would read a document, and its span adapter (trained for
receiver -> receiver) turns that K/V into the entries placed where a document would sit:

    sharer    positions  = the sentences its retrieval heads select (as a span packet does)
              x[r]       = mean K/V (no RoPE) of the sharer tokens overlapping receiver token r,
                           sharer layers 0..w                     (the receiver's tokenizer cuts
                                                                   the text: no weights needed)
                           [+ where r sits among the pieces of its sharer token, "within-sharer"]
              s[r]       = mu_y + (x[r] - mu_x) B + MLP((x[r] - mu_x) / sd_x)     [rows, hidden]
    receiver  s[r]      <- E[argmax_v cos(s[r], E[v])]             (only with `bridge_snap`)
              K/V        = receiver([BOS] + s) read as a sharer   (its own layers, RoPE removed)
              entries    = span decoder(span encoder(K/V))        (the receiver -> receiver adapter)

The packet is `rows` soft tokens in one segment (layer 0: the receiver's input), width the
receiver's hidden size; no token ids and no text cross the wire. `rows` is at most
`config.max_rows()`.

How the text is cut (`config.bridge_tokens`). "whole": as the receiver's tokenizer cuts it. A
receiver token then often spans several sharer pieces (Gemma3's " kebab" is SmolLM2's " ke" "b"
"ab"), and the mean of their features is a poor description of a word the translator never saw:
such rows land on their own token far less often than rows with one sharer token (docs/lcfx.md,
section 8). "within-sharer": each sharer token's text is cut on
its own, so every receiver token lies inside one sharer token, which the translator sees in
training however rare the word is; the pieces of one sharer token differ by their position
features (first, last, split, fraction), scaled by POSITION_SCALE so that the ridge map's
penalty, set by the K/V features' variance, does not drown them.
B is a ridge regression; the MLP is trained on a dense per-token signal (lcflow.training.bridge_fit).
"""

from __future__ import annotations

import torch
from torch import nn

from lcflow.adapter.config import AdapterConfig
from lcflow.adapter.spans import SpanDecoder, SpanEncoder, sharer_inputs
from lcflow.core.kv import CapturedKV, capture_kv, full_cache, tokenizer_hash
from lcflow.core.tokens import SpanAlignment, align_spans
from lcflow.packets.placement import document_ids
from lcflow.provision.store import resolve_model

INPUT_LAYER = 0  # the packet's one segment: the receiver's input (embedding) layer
HIDDEN = 1024  # width of the translator's residual MLP
POSITION_FEATURES = 4  # within-sharer: first piece, last piece, split, fraction through the token
POSITION_SCALE = 10.0


class SoftTokenTranslator(nn.Module):
    """x [rows, d] (sharer K/V features) -> soft tokens [rows, hidden] (receiver input space)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = HIDDEN):
        super().__init__()
        self.mu_x = nn.Parameter(torch.zeros(in_dim))
        self.sd_x = nn.Parameter(torch.ones(in_dim))
        self.mu_y = nn.Parameter(torch.zeros(out_dim))
        self.beta = nn.Parameter(torch.zeros(in_dim, out_dim))
        self.residual = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        nn.init.zeros_(self.residual[2].weight)  # starts as the ridge map alone
        nn.init.zeros_(self.residual[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self.mu_x
        return self.mu_y + centred @ self.beta + self.residual(centred / self.sd_x)


def reader_config(config: AdapterConfig) -> AdapterConfig:
    """The receiver -> receiver span adapter's config, stored inside the bridge's as `reader`."""
    return AdapterConfig.from_dict(config.reader)


def feature_dim(config: AdapterConfig) -> int:
    extra = POSITION_FEATURES if config.bridge_tokens == "within-sharer" else 0
    return config.sharer.spec.kv_dim * len(sharer_inputs(config, INPUT_LAYER)) + extra


def within_sharer_ids(tokenizer, text: str, sharer_spans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Receiver ids [1, R] and spans [R, 2] of `text`, each sharer token's text cut on its own."""
    ids, spans = [], []
    for start, end in sharer_spans.tolist():
        if end <= start:  # special tokens (BOS) cover no text
            continue
        piece = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
        for token, (a, b) in zip(piece["input_ids"], piece["offset_mapping"], strict=True):
            ids.append(token)
            spans.append((start + a, start + b))
    return torch.tensor([ids], dtype=torch.long), torch.tensor(spans, dtype=torch.int32).view(-1, 2)


def piece_positions(alignment: SpanAlignment) -> torch.Tensor:
    """[R, 4]: per receiver token, (first piece, last piece, split, fraction) of its sharer token,
    times POSITION_SCALE. Rows of one sharer token are consecutive under within-sharer cutting."""
    owner = alignment.weights.argmax(dim=1)  # the one sharer token each receiver token lies in
    counts = torch.bincount(owner, minlength=alignment.weights.shape[1])[owner]
    first_row = torch.zeros_like(owner)
    for r in range(1, len(owner)):
        first_row[r] = first_row[r - 1] if owner[r] == owner[r - 1] else r
    index = torch.arange(len(owner)) - first_row
    features = torch.stack(
        [index == 0, index == counts - 1, counts > 1, index / (counts - 1).clamp(min=1)], dim=1
    )
    return features.float() * POSITION_SCALE


class BridgeEncoder(SpanEncoder):
    """Sharer side: select as a span packet does, then translate into the receiver's input space.

    Needs the receiver's tokenizer (to cut the selected text into receiver tokens): give it with
    `attach_receiver_tokenizer`, or it is loaded by the receiver model's name on first use."""

    def __init__(self, config: AdapterConfig):
        nn.Module.__init__(self)  # no per-layer span maps: the translator replaces them
        self.config = config
        self.layers = [INPUT_LAYER]
        self.translator = SoftTokenTranslator(feature_dim(config), config.bottleneck)
        self.receiver_tokenizer = None

    def attach_receiver_tokenizer(self, tokenizer) -> None:
        """Use this receiver tokenizer; refuse one that is not the adapter's receiver's."""
        if tokenizer_hash(tokenizer) != self.config.receiver.tokenizer_hash:
            raise ValueError(
                f"this bridge adapter's receiver is {self.config.receiver.short()}; the tokenizer given "
                "is another one: pass the receiver model's own tokenizer"
            )
        self.receiver_tokenizer = tokenizer

    def tokenizer(self):
        """The receiver's tokenizer (loaded by the receiver model's name if none was attached)."""
        if self.receiver_tokenizer is None:
            from transformers import AutoTokenizer

            self.attach_receiver_tokenizer(
                AutoTokenizer.from_pretrained(resolve_model(self.config.receiver.name))
            )
        return self.receiver_tokenizer

    def features(self, captured: CapturedKV, layer: int = INPUT_LAYER) -> torch.Tensor:
        """[tokens, d]: K/V of the sharer layers feeding the input layer, per token, BOS kept."""
        return torch.cat([captured.joint(s)[0] for s in sharer_inputs(self.config, layer)], dim=-1)

    def alignment(self, text: str, spans: torch.Tensor) -> tuple[SpanAlignment, torch.Tensor]:
        """The receiver's token ids [1, R] of `text` and the alignment of the sharer's onto them."""
        if self.config.bridge_tokens == "within-sharer":
            receiver_ids, receiver_spans = within_sharer_ids(self.tokenizer(), text, spans)
        else:
            receiver_ids, receiver_spans = document_ids(self.tokenizer(), text)
        return align_spans(spans, receiver_spans), receiver_ids

    def translator_inputs(self, captured: CapturedKV, alignment: SpanAlignment) -> torch.Tensor:
        """[R, feature_dim]: the translator's input for every receiver token of the text."""
        x = alignment.apply(self.features(captured).to(torch.float32))
        if self.config.bridge_tokens == "within-sharer":
            x = torch.cat([x, piece_positions(alignment)], dim=1)
        return x

    def receiver_rows(self, text: str, spans: torch.Tensor, positions: torch.Tensor | None):
        """The alignment onto the receiver's tokens of `text` and which of them to send (those
        overlapping a selected sharer position, at most `config.max_rows()`, in order)."""
        alignment, _ = self.alignment(text, spans)
        selected = torch.zeros(spans.shape[0], dtype=torch.bool)
        selected[positions if positions is not None else slice(1, None)] = True
        rows = torch.nonzero((alignment.weights[:, selected] > 0).any(dim=1)).flatten()
        return alignment, rows[: self.config.max_rows()]

    def encode_soft(self, captured: CapturedKV, text: str, spans, positions) -> torch.Tensor:
        """Soft tokens [1, rows, hidden] of the selected sentences (all of `text` without positions)."""
        alignment, rows = self.receiver_rows(text, spans, positions)
        return self.translator(self.translator_inputs(captured, alignment)[rows])[None]


@torch.no_grad()
def snap_to_vocabulary(
    embed: nn.Embedding, soft: torch.Tensor, inverse_norms: torch.Tensor | None = None, chunk: int = 32768
) -> torch.Tensor:
    """[1, rows, hidden] soft tokens -> the receiver's input embeddings nearest to them by cosine.

    Called through `embed` (not `embed.weight`), so a model that scales its embeddings (Gemma3
    multiplies by sqrt(hidden)) gets them as its own tokens would arrive. The vocabulary is
    scanned in chunks, so no normalised copy of the whole table is ever held; `inverse_norms`
    (1 / |E[v]|, from `vocabulary_inverse_norms`) saves a pass over the table per call.
    """
    weight = embed.weight
    if inverse_norms is None:
        inverse_norms = vocabulary_inverse_norms(weight)
    query = torch.nn.functional.normalize(soft[0].to(weight.dtype), dim=-1)
    best = torch.full((query.shape[0],), -2.0, device=weight.device, dtype=torch.float32)
    nearest = torch.zeros(query.shape[0], dtype=torch.long, device=weight.device)
    for start in range(0, weight.shape[0], chunk):
        cosine = (query @ weight[start : start + chunk].T).float() * inverse_norms[start : start + chunk]
        value, index = cosine.max(dim=-1)
        better = value > best
        best = torch.where(better, value, best)
        nearest = torch.where(better, index + start, nearest)
    return embed(nearest[None]).to(soft.dtype)


@torch.no_grad()
def vocabulary_inverse_norms(weight: torch.Tensor) -> torch.Tensor:
    """[vocabulary] 1 / |E[v]| in float32 (0 for an all-zero row, which then never wins)."""
    norms = weight.float().norm(dim=-1)
    return torch.where(norms > 0, 1.0 / norms.clamp_min(1e-12), torch.zeros_like(norms))


class BridgeDecoder(nn.Module):
    """Receiver side: run the receiver over [BOS + soft tokens], then its own span adapter."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        self.layers = [INPUT_LAYER]
        reader = reader_config(config)
        self.reader_encoder = SpanEncoder(reader)
        self.reader_decoder = SpanDecoder(reader)
        self._norms_key: tuple | None = None  # which embedding table _inverse_norms belongs to
        self._inverse_norms: torch.Tensor | None = None

    def inverse_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """The receiver vocabulary's 1 / |E[v]|, computed once per embedding table (not saved)."""
        key = (weight.data_ptr(), tuple(weight.shape), weight.device)
        if self._norms_key != key:
            self._inverse_norms, self._norms_key = vocabulary_inverse_norms(weight), key
        return self._inverse_norms

    def gate(self, layer: int) -> torch.Tensor:
        """No gates (every receiver layer is written); 1 for `lcflow info`."""
        return torch.ones(())

    def read(self, model, bos_token_id: int, soft: torch.Tensor) -> CapturedKV:
        """The receiver's K/V (RoPE removed) of [BOS + soft], read as a document from position 0."""
        embed = model.get_input_embeddings()
        bos = embed(torch.tensor([[bos_token_id]], device=soft.device))
        cache = full_cache()
        model.model(
            inputs_embeds=torch.cat([bos, soft.to(bos.dtype)], dim=1), past_key_values=cache, use_cache=True
        )
        return capture_kv(model, cache)

    def entries(self, model, bos_token_id: int, latents: dict[int, torch.Tensor]):
        """Keys and values [1, heads, rows, head_dim] per receiver layer, in layer order."""
        soft = latents[INPUT_LAYER]
        if self.config.bridge_snap:
            embed = model.get_input_embeddings()
            soft = snap_to_vocabulary(embed, soft, self.inverse_norms(embed.weight))
        captured = self.read(model, bos_token_id, soft)
        rows = torch.arange(1, captured.num_tokens)
        inner = {t: self.reader_encoder.encode_layer(captured, t, rows) for t in self.reader_encoder.layers}
        return self.reader_decoder.entries(inner)
