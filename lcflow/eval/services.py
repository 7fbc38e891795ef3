"""`lcflow eval --services`: the methods the running services serve, measured through the real
Handoff RPC (their stage timings from its summary: pack, transfer and unpack included); the
others stay in-process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lcflow.client import HandoffClient
from lcflow.serving.security import ClientSecurity
from lcflow.tasks import QASample, format_question_prompt

if TYPE_CHECKING:  # torch and the harness are imported where used: `lcflow --help` stays fast
    from lcflow.eval.harness import EvalModels, SampleOutcome


# method -> (mode, text channel) of the Handoff RPC that runs it through the services; a +reader
# method also names its text reader (HandoffRequest.text_reader): the basename of the reader's
# directory, which the receiver must serve in its --adapters.
SERVICE_MODES = {
    "receiver": ("none", "note"),
    "text": ("text", "note"),
    "forward": ("text", "forward"),
    "forward-selected": ("text", "forward-selected"),
    "forward+reader": ("text", "forward"),
    "forward-selected+reader": ("text", "forward-selected"),
    "lcf": ("lcf", "note"),
    "lcfx": ("lcfx", "note"),
}


def evaluate_through_services(
    address: str,
    methods: list[str],
    models: EvalModels,
    samples: list[QASample],
    settings,
    security: ClientSecurity | None = None,
    sessions: bool = False,
    readers: dict[str, str] | None = None,
) -> list[SampleOutcome]:
    """`--services SHARER_HOST:PORT`: the methods the running services serve (receiver = NONE,
    text, forward and forward-selected = TEXT on that channel, the +reader methods the same with
    the text reader `readers[method]` named, lcf, lcfx: whichever the served adapters support) go
    through the real Handoff RPC and
    take their stage timings from its summary (pack, transfer and unpack included); the others
    stay in-process. With `sessions`, each sample's sharer context is opened as a session first
    (untimed: an agent's context is already prefilled) and the served methods hand off from it."""
    from lcflow.eval.harness import applicable, run_sample, scored  # torch: keeps --help fast

    client = HandoffClient(address, security=security)
    outcomes = []
    for sample in samples:
        session_id = client.open_session(sample.sharer_context).session_id if sessions else ""
        for method in methods:
            if not applicable(method, sample):
                continue
            if method not in SERVICE_MODES:
                outcomes.append(run_sample(method, models, sample, settings))
                continue
            mode, channel = SERVICE_MODES[method]
            result = client.handoff(
                format_question_prompt(sample),
                mode=mode,
                text_channel=channel,
                context=sample.sharer_context,
                session_id=session_id,
                receiver_context=sample.receiver_context,
                max_new_tokens=settings.max_new_tokens,
                text_reader=(readers or {}).get(method, ""),
            )
            timings = {field.name: value for field, value in result.summary.timings.ListFields()}
            outcomes.append(scored(method, sample, result.answer, result.summary.bytes_wire, timings))
        if session_id:
            client.close_session(session_id)
    client.close()
    return outcomes
