"""Checks of what a request asks for, shared by both services: texts and token counts against the
configured bounds, chat roles, the mode, generation settings; each failure an INVALID_ARGUMENT
saying what to change.
"""

from __future__ import annotations

import hashlib
import json

from lcflow.handoff.generation import GenerationSettings
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.serving.config import ServiceConfig
from lcflow.serving.server import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS_LIMIT, invalid
from lcflow.transport import MODE_FROM_PROTO

# --- request checks ---------------------------------------------------------------------------


# The roles every chat template knows (the .proto's ChatMessage.role); a custom role would be
# rendered by no template the same way, so it is refused rather than passed on as plain text.
CHAT_ROLES = ("system", "user", "assistant")


def messages_text(messages: pb.ChatMessages, field: str = "messages") -> str:
    """Chat messages as one text block ("role: content" per message), for a context or a prompt.
    A role outside CHAT_ROLES is INVALID_ARGUMENT naming the allowed ones."""
    for i, message in enumerate(messages.messages):
        if message.role not in CHAT_ROLES:
            raise invalid(
                f"{field}[{i}] has role {message.role!r}; a chat role is one of {', '.join(CHAT_ROLES)}"
            )
    return "\n".join(f"{m.role}: {m.content}" for m in messages.messages)


def mode_of(value: int) -> str:
    """The mode a request names (lcf, lcfx, c2c, text, none), or INVALID_ARGUMENT saying whether it
    was unset or a number this server does not know, and which modes there are."""
    mode = MODE_FROM_PROTO.get(value)
    if mode is not None:
        return mode
    valid = ", ".join(f"{pb.Mode.Name(v)} ({v})" for v in sorted(MODE_FROM_PROTO))
    if value == pb.MODE_UNSPECIFIED:
        raise invalid(f"mode is unset: choose one of {valid}")
    raise invalid(f"mode {value} is not a mode this server knows: choose one of {valid}")


def prompt_of(message) -> str:
    """The prompt of a HandoffRequest or ReceiverRequest (text, or chat messages joined)."""
    which = message.WhichOneof("prompt" if isinstance(message, pb.ReceiverRequest) else "receiver_prompt")
    if which == "prompt_text":
        return message.prompt_text
    if which == "prompt_messages":
        return messages_text(message.prompt_messages, "prompt_messages")
    return ""


def describe_texts(config: ServiceConfig, **texts: str) -> str:
    """Texts for a log line: their sizes only, unless --log-content.

    Prompts, contexts and answers are the users' data: logs are kept longer, read by more people
    and shipped further than the traffic itself, so by default no log line (and no error
    message, no span attribute) carries them; --log-content is for debugging a deployment you own."""
    parts = []
    for name, text in texts.items():
        if config.log_content:
            parts.append(f"{name} {text!r}")
        else:
            parts.append(f"{name} {len(text)} chars")
    return ", ".join(parts)


def check_text(name: str, text: str, config: ServiceConfig, required: bool = True) -> str:
    if required and not text.strip():
        raise invalid(f"{name} is empty: give the text the model should read")
    if len(text) > config.max_prompt_chars:
        raise invalid(
            f"{name} has {len(text)} characters, more than the limit of {config.max_prompt_chars}; "
            "shorten it or raise --max-prompt-chars"
        )
    return text


def check_tokens(name: str, count: int, config: ServiceConfig) -> None:
    if count > config.max_context_tokens:
        raise invalid(
            f"{name} has {count} tokens, more than the limit of {config.max_context_tokens}; "
            "shorten it or raise --max-context-tokens"
        )


def generation_settings(proto: pb.GenerationSettings) -> GenerationSettings:
    if proto.max_new_tokens > MAX_NEW_TOKENS_LIMIT:
        raise invalid(f"max_new_tokens {proto.max_new_tokens} is above the limit of {MAX_NEW_TOKENS_LIMIT}")
    if proto.temperature < 0:
        raise invalid(f"temperature must be >= 0 (0 = greedy), not {proto.temperature}")
    if not 0 <= proto.top_p <= 1:
        raise invalid(f"top_p must be in (0, 1], not {proto.top_p}")
    return GenerationSettings(
        max_new_tokens=proto.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=proto.temperature,
        top_p=proto.top_p or 1.0,
        stop=list(proto.stop),
        seed=proto.seed if proto.HasField("seed") else None,
    )


def adapter_id(config_dict: dict) -> str:
    """Both halves of one adapter share its config, so both services compute the same id."""
    canonical = json.dumps(config_dict, sort_keys=True).encode()
    return f"{config_dict['mode']}:{hashlib.sha256(canonical).hexdigest()[:16]}"
