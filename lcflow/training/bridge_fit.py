"""Building a bridge adapter (lcflow.adapter.bridge): fit its translator, borrow a span reader.

The translator maps a sharer's per-token K/V features onto the receiver's input embeddings of
the same characters. It learns from documents of the alignment corpus (lcflow.training.corpus:
training-split facts, random words and prose; never a test split). For each receiver token r:

    x[r]   mean features of the sharer tokens overlapping r        (BridgeEncoder.features)
    y[r]   the receiver's input embedding of r;  id[r] its token id

    ridge     B = (Sxx + lam I)^-1 Sxy   from centred moments in float64, lam = ridge * mean(diag Sxx)
    residual  an MLP on top, trained on a dense per-token signal:
              CE(tau * cos(s[r], E[v]), id[r]) over the vocabulary v of the training tokens
              + ||s[r] - y[r]||^2 / sum(Var y)

The cross-entropy is what matters: a soft token the receiver reads as the wrong name or value
loses the answer (docs/lcfx.md, section 6: one wrong token in eleven lost every answer), so the
map is trained to land nearest its own token, not just near it on average.

The reader is an existing receiver -> receiver span adapter (e.g. adapters/gemma3-to-gemma3-lcfx):
its task-trained decoder is what makes a prefix the receiver answers from; copied as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from lcflow.adapter import AdapterConfig, LatentAdapter
from lcflow.adapter.bridge import INPUT_LAYER
from lcflow.core.kv import ModelIdentity, capture_kv, full_cache, prefill
from lcflow.core.prompting import tokenize_context
from lcflow.packets.alignment import ridge_beta

SHARER_WINDOW = 3  # the translator reads sharer layers 0..3: the early layers carry token identity


@dataclass
class TranslationPairs:
    x: torch.Tensor  # [rows, d] sharer features
    y: torch.Tensor  # [rows, hidden] receiver input embeddings
    ids: torch.Tensor  # [rows] receiver token ids

    @classmethod
    def concat(cls, parts: list[TranslationPairs]) -> TranslationPairs:
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("x", "y", "ids")))


def new_bridge_adapter(
    sharer: ModelIdentity,
    receiver: ModelIdentity,
    hidden_size: int,
    reader: LatentAdapter,
    slots: int = 32,
    tokens: str = "whole",
    rows: int = 0,
    snap: bool = False,
) -> LatentAdapter:
    """An untrained bridge adapter whose decoder is a copy of `reader` (receiver -> receiver spans)."""
    check_reader(reader, receiver)
    config = AdapterConfig(
        mode="lcfx",
        sharer=sharer,
        receiver=receiver,
        layer_map={INPUT_LAYER: 0},
        retained_layers=[INPUT_LAYER],
        bottleneck=hidden_size,
        slots=slots,
        packet="bridge",
        selection="sentences-mean",
        sharer_window=SHARER_WINDOW,
        reader=reader.config.to_dict(),
        bridge_tokens=tokens,
        bridge_rows=rows,
        bridge_snap=snap,
    )
    return _with_reader_weights(LatentAdapter(config), reader)


def with_reader(bridge_adapter: LatentAdapter, reader: LatentAdapter) -> LatentAdapter:
    """The same bridge (translator, retrieval heads, packet settings) reading with another
    receiver -> receiver span adapter: the translator depends only on the two models, so a new
    reader (e.g. one refined for two hops) needs no refitting."""
    if bridge_adapter.config.packet != "bridge":
        raise ValueError(f"not a bridge adapter (packet: {bridge_adapter.config.packet})")
    check_reader(reader, bridge_adapter.config.receiver)
    config = AdapterConfig.from_dict({**bridge_adapter.config.to_dict(), "reader": reader.config.to_dict()})
    adapter = LatentAdapter(config)
    adapter.encoder.load_state_dict(bridge_adapter.encoder.state_dict())
    return _with_reader_weights(adapter, reader)


def check_reader(reader: LatentAdapter, receiver: ModelIdentity) -> None:
    """A bridge reads with a receiver -> receiver LCF-X span adapter of that very receiver."""
    rc = reader.config
    if rc.mode != "lcfx" or rc.packet != "spans":
        raise ValueError("the reader must be an LCF-X span adapter (packet: spans)")
    if not (rc.sharer.same_model(receiver) and rc.receiver.same_model(receiver)):
        raise ValueError(
            f"the reader must be a receiver -> receiver adapter for {receiver.short()}, "
            f"not {rc.sharer.short()} -> {rc.receiver.short()}"
        )


def _with_reader_weights(adapter: LatentAdapter, reader: LatentAdapter) -> LatentAdapter:
    adapter.decoder.reader_encoder.load_state_dict(reader.encoder.state_dict())
    adapter.decoder.reader_decoder.load_state_dict(reader.decoder.state_dict())
    return adapter


@torch.no_grad()
def translation_pairs(adapter: LatentAdapter, sharer, receiver, document: str) -> TranslationPairs:
    """Per receiver token of `document` covered by a sharer token: (x, y, id). `sharer` and
    `receiver` are (model, tokenizer) pairs."""
    (s_model, s_tok), (r_model, _) = sharer, receiver
    ids, spans = tokenize_context(s_tok, document)
    captured = capture_kv(s_model, prefill(s_model, ids, full_cache()))
    alignment, r_ids = adapter.encoder.alignment(document, spans)
    x = adapter.encoder.translator_inputs(captured, alignment)
    keep = alignment.covered
    y = r_model.get_input_embeddings()(r_ids.to(r_model.device))[0].float().cpu()
    return TranslationPairs(x[keep], y[keep], r_ids[0][keep])


@torch.no_grad()
def fit_ridge(adapter: LatentAdapter, pairs: TranslationPairs, ridge: float = 1e-3) -> None:
    """The closed-form part: mu_x, mu_y, B (see the module docstring), and sd_x for the MLP."""
    t = adapter.encoder.translator
    x, y = pairs.x.double(), pairs.y.double()
    mu_x, mu_y = x.mean(0), y.mean(0)
    xc, yc = x - mu_x, y - mu_y
    sxx, sxy = xc.T @ xc / len(x), xc.T @ yc / len(x)
    beta = ridge_beta(sxx, sxy, ridge)
    t.mu_x.copy_(mu_x.float())
    t.mu_y.copy_(mu_y.float())
    t.beta.copy_(beta.float())
    t.sd_x.copy_(x.std(0).float() + 1e-6)


def vocabulary_table(receiver_model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct ids, their unit-length input embeddings [V, hidden], and each id's row."""
    vocab, target = ids.unique(return_inverse=True)
    with torch.no_grad():
        table = receiver_model.get_input_embeddings()(vocab.to(receiver_model.device)).float().cpu()
    return torch.nn.functional.normalize(table, dim=-1), target


def train_residual(
    adapter: LatentAdapter,
    pairs: TranslationPairs,
    receiver_model,
    steps: int,
    batch: int = 512,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Train the residual MLP (ridge part frozen) on the dense loss; returns the loss every 50 steps."""
    translator = adapter.encoder.translator
    table, target = vocabulary_table(receiver_model, pairs.ids)
    log_tau = torch.nn.Parameter(torch.tensor(3.0))  # cosine logits need a temperature
    optimizer = torch.optim.AdamW([*translator.residual.parameters(), log_tau], lr=lr, weight_decay=0.01)
    y_var = float(pairs.y.var(0).sum())
    generator = torch.Generator().manual_seed(seed)
    translator.residual.requires_grad_(True)
    losses = []
    progress = tqdm(range(steps), desc="train translator", leave=False)
    for step in progress:
        pick = torch.randint(0, len(pairs.x), (batch,), generator=generator)
        predicted = translator(pairs.x[pick])
        logits = log_tau.exp() * torch.nn.functional.normalize(predicted, dim=-1) @ table.T
        ce = torch.nn.functional.cross_entropy(logits, target[pick])
        mse = (predicted - pairs.y[pick]).pow(2).sum(-1).mean() / y_var
        loss = ce + mse
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            losses.append(round(loss.item(), 4))
            progress.set_postfix(ce=f"{ce.item():.3f}", mse=f"{mse.item():.3f}")
    translator.requires_grad_(False)
    return losses


@torch.no_grad()
def held_out_scores(adapter: LatentAdapter, pairs: TranslationPairs, receiver_model) -> dict[str, float]:
    """On pairs never fitted on: R^2 of the embeddings, and how often the nearest entry of the
    receiver's whole vocabulary (cosine) is the true token."""
    predicted = adapter.encoder.translator(pairs.x)
    r2 = 1 - float((predicted - pairs.y).pow(2).sum()) / float((pairs.y - pairs.y.mean(0)).pow(2).sum())
    vocabulary = torch.nn.functional.normalize(
        receiver_model.get_input_embeddings().weight.float().cpu(), dim=-1
    )
    nearest = torch.cat(
        [(torch.nn.functional.normalize(p, dim=-1) @ vocabulary.T).argmax(-1) for p in predicted.split(4096)]
    )
    return {"r2": round(r2, 4), "nearest_token": round(float((nearest == pairs.ids).float().mean()), 4)}
