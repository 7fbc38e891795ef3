"""Names the command line offers as choices, in a module that imports nothing heavy.

`lcflow --help` builds every sub-command's parser, so whatever a parser needs (choices,
defaults) must import without torch, transformers or grpc: the CLI then starts in a fraction
of a second. The modules that implement these names import the tuples from here, so each
list is written once.
"""

import argparse
import re

# Span packets: whole sentences by the question's total attention ("sentences"), or by its mean
# attention per token ("sentences-mean": long sentences not favoured), or the m best tokens.
SELECTIONS = ("sentences", "sentences-mean", "tokens")

# What `lcflow eval` can compare, in the order its tables list them (lcflow.eval.harness says
# what each is). The text channels: the note (text; text-c2c is the papers' wording), the
# document forwarded (forward), the sentences LCF-X's selection holds forwarded
# (forward-selected), and those two read by a receiver trained as LCF-X's reader was (+reader).
METHODS = (
    "receiver",
    "sharer",
    "forward",
    "text",
    "text-c2c",
    "forward-selected",
    "forward+reader",
    "forward-selected+reader",
    "c2c",
    "kvcomm",
    "lcf",
    "lcfx",
    "lcfx-pruned",
    "lcfx-wrong",
)
METHOD_ALIASES = {"skyline": "forward"}  # the name `forward` had before the text channels
LCFX_METHODS = ("lcfx", "lcfx-pruned", "lcfx-wrong")
SAME_CONTEXT_ONLY = ("c2c", "lcf")
NOTE_METHODS = {"text": "fair", "text-c2c": "c2c"}  # method -> note style (lcflow.core.prompting)
# Methods that read with a trained text reader (lcflow.adapter.reader), and the channel each reads.
READER_METHODS = {"forward+reader": "forward", "forward-selected+reader": "forward-selected"}
# The text channels a TEXT handoff can take through the services (HandoffRequest.text_channel).
TEXT_CHANNELS = ("note", "forward", "forward-selected")

# The oracle ladder's rungs (lcflow.research.oracles), in the order `lcflow bench oracles` runs them.
DEFAULT_RUNGS = (
    "none",
    "text",
    "own-full",
    "own-tokens-32",
    "own-tokens-64",
    "own-sentences-32",
    "own-sentences-64",
    "own-chunks-32",
    "own-random-32",
    "xlat-full",
    "xlat-tokens-32",
    "xlat-sentences-32",
    "xlat-sentences-64",
    "xlat-wrong-32",
)

# How a sharer sends latents (lcflow.transport.quantize, `--quantize`): as they are, or quantized;
# "int4-hadamard" rotates each group of int4 values by a Hadamard matrix first (format version 3).
QUANTIZATIONS = ("none", "int8", "int4", "int4-hadamard")
# The sharer's `--quantize` setting: one of those, or "card": each adapter's model card names the
# smallest codec measured within 1 EM point of bf16 for it (model_card.json "codec"), none without.
QUANTIZE_SETTINGS = ("card", *QUANTIZATIONS)
# The sharer's `--codec`: zstd over each segment or not, or "auto": zstd only where the link is
# slow enough for it to save time (lcflow.transport.link).
CODEC_SETTINGS = ("auto", "zstd", "none")

# `lcflow eval --wire`: the latents' number format on the way to the receiver (lcflow.eval.harness)
WIRE_FORMS = ("exact", "bf16", *QUANTIZATIONS[1:])
# int4's group size where a name gives none (lcflow.transport.quantize says why 64).
DEFAULT_INT4_GROUP = 64
# An int4 quantization may name its group size after GROUP_SUFFIX ("int4-g32", "int4-hadamard-g32"):
# rows whose width the default group does not divide (a 224-wide compressed packet) still go int4.
# Groups below 8 cost more in scales than int8 (a float16 scale a group); above 4096 is no group.
GROUP_SUFFIX = "-g"
GROUP_SIZES = range(8, 4097)


def split_group(name: str) -> tuple[str, int | None]:
    """A quantization name and the group size it names: ("int4-hadamard", 32) for
    "int4-hadamard-g32", (name, None) where it names none (then the scheme's default holds) or
    names one outside GROUP_SIZES or not written in plain decimal digits."""
    base, sep, group = name.rpartition(GROUP_SUFFIX)
    if (
        sep
        and base.startswith("int4")
        and re.fullmatch(r"[1-9][0-9]{0,3}", group)
        and int(group) in GROUP_SIZES
    ):
        return base, int(group)
    return name, None


def canonical_wire_name(name: str) -> str:
    """One name for one quantization: "int4" for "int4-g64" (the default group named), so cards,
    link-meter arms and results never hold the same codec under two names."""
    base, group = split_group(name)
    return base if group == DEFAULT_INT4_GROUP else name


def check_wire_form(name: str) -> str:
    """`name` if it is a wire form (WIRE_FORMS, an int4 one with GROUP_SUFFIX and a group size);
    otherwise argparse's error naming the choices (this is --wire's `type=`)."""
    if split_group(name)[0] in WIRE_FORMS:
        return canonical_wire_name(name)
    raise argparse.ArgumentTypeError(
        f"unknown wire form {name!r}: use one of {', '.join(WIRE_FORMS)}, or an int4 one with its group "
        f"size ({GROUP_SIZES.start} to {GROUP_SIZES.stop - 1}), e.g. int4-hadamard{GROUP_SUFFIX}32"
    )


# Handoff modes that carry a latent payload (C2C: the sharer's own KV) ...
LATENT_MODES = ("lcf", "lcfx", "c2c")
# ... and those where the receiver reads the sharer's context too (the payload carries its token spans).
SAME_CONTEXT_MODES = ("lcf", "c2c")

# Named pairs: (sharer, receiver), names from `lcflow models list`. The pair name is also the
# prefix of the default adapter directories, adapters/<pair>-<method>.
PAIRS: dict[str, tuple[str, str]] = {
    "smollm2-to-gemma3": ("smollm2-135m-instruct", "gemma3-270m"),
    "gemma3-to-smollm2": ("gemma3-270m", "smollm2-135m-instruct"),
    # Two agents on one base model with different contexts: the paper's cross-context setting.
    "gemma3-to-gemma3": ("gemma3-270m", "gemma3-270m"),
    # The same for SmolLM2: the reader half of the Gemma3 -> SmolLM2 bridge is trained on it.
    "smollm2-to-smollm2": ("smollm2-135m-instruct", "smollm2-135m-instruct"),
}

# A handoff's stages in the order they run (StageTimings in the .proto): how reports and the
# client order per-stage timings.
STAGE_ORDER = (
    "queue",
    "sharer_prefill",
    "select",
    "message_generate",
    "encode",
    "pack",
    "transfer",
    "unpack",
    "decode_kv",
    "receiver_prefill",
    "generate",
)
