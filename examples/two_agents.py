"""Two agents talking through the lcflow services, turn after turn.

A planner agent keeps its notes in a sharer session: the sharer prefills them once and keeps
their KV cache. An answering agent asks about them through `Handoff`, reusing that session on
every turn: the sharer sends what the receiver needs (an LCF-X packet of latents, or with
--mode text a note written in words) and the receiver's answer streams back, then a summary with
the time of each stage. The answering agent's own notes (its earlier answers) are its context on
the receiver's side. The session is closed at the end, also on an error.

Start the two services first (README, "The two services"), then:

    python examples/two_agents.py --sharer 127.0.0.1:50051 --turns 3 --mode lcfx
    python examples/two_agents.py --sharer 127.0.0.1:50051 --turns 3 --async   # AsyncHandoffClient

The synchronous run streams each answer as it is generated (HandoffClient.stream); the --async
run collects it (await AsyncHandoffClient.handoff). TLS and token flags are `lcflow handoff`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc

from lcflow.client import MODE_NAMES, AsyncHandoffClient, HandoffClient
from lcflow.serving.security import add_client_security_flags, client_security_from_args

PLANNER_NOTES = (
    "Mira Volkov lives in Oslo. Otto Thorne is a sculptor. Xenia Hollis loves falafel. "
    "Dalia Galloway plays the sitar."
)
QUESTIONS = [
    "Where does Mira Volkov live?",
    "What is Otto Thorne's profession?",
    "What food does Xenia Hollis love most?",
    "Which musical instrument does Dalia Galloway play?",
]


def timing(summary) -> str:
    """One line from a handoff's summary: how long, where the time went, what was sent."""
    t = summary.timings
    # LCF / LCF-X from a session: 0 ms, its KV is reused; TEXT and NONE prefill nothing on the sharer
    prefill = (
        f"sharer prefill {t.sharer_prefill:.0f} ms" if t.HasField("sharer_prefill") else "no sharer prefill"
    )
    return (
        f"  first token {t.time_to_first_token:.0f} ms, total {t.total:.0f} ms, {prefill}, "
        f"{summary.bytes_wire} B on the wire, trace {summary.trace_id}"
    )


def run_sync(args, security) -> None:
    memory: list[str] = []  # the answering agent's own notes
    with HandoffClient(args.sharer, timeout_s=args.timeout, security=security) as client:
        with client.session(PLANNER_NOTES) as session_id:  # the planner's notes, prefilled once
            print(f"planner: notes held in sharer session {session_id}")
            for turn in range(1, args.turns + 1):
                question = QUESTIONS[(turn - 1) % len(QUESTIONS)]
                print(f"turn {turn}: {question}\n  answer: ", end="", flush=True)
                for event in client.stream(
                    question,
                    mode=args.mode,
                    session_id=session_id,
                    receiver_context=" ".join(memory),
                    max_new_tokens=args.max_new_tokens,
                ):
                    if event.HasField("text"):  # text deltas as the receiver generates them
                        print(event.text.text, end="", flush=True)
                    else:  # then one summary
                        print("\n" + timing(event.summary))
                        memory.append(f"{question} {event.summary.answer.strip()}")
    print("planner: session closed")


async def run_async(args, security) -> None:
    memory: list[str] = []
    async with AsyncHandoffClient(args.sharer, timeout_s=args.timeout, security=security) as client:
        async with client.session(PLANNER_NOTES) as session_id:
            print(f"planner: notes held in sharer session {session_id}")
            for turn in range(1, args.turns + 1):
                question = QUESTIONS[(turn - 1) % len(QUESTIONS)]
                result = await client.handoff(
                    question,
                    mode=args.mode,
                    session_id=session_id,
                    receiver_context=" ".join(memory),
                    max_new_tokens=args.max_new_tokens,
                )
                print(f"turn {turn}: {question}\n  answer: {result.answer}\n{timing(result.summary)}")
                memory.append(f"{question} {result.answer.strip()}")
    print("planner: session closed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sharer", default="127.0.0.1:50051", help="the sharer service, HOST:PORT")
    parser.add_argument("--turns", type=int, default=3, help="questions the answering agent asks")
    parser.add_argument("--mode", choices=list(MODE_NAMES), default="lcfx", help="how the notes travel")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    parser.add_argument("--async", dest="use_async", action="store_true", help="use AsyncHandoffClient")
    add_client_security_flags(parser)
    args = parser.parse_args(argv)
    security = client_security_from_args(args)
    try:
        if args.use_async:
            asyncio.run(run_async(args, security))
        else:
            run_sync(args, security)
    except grpc.RpcError as err:  # grpc.aio.AioRpcError too: the sharer's status and why
        print(f"\nhandoff failed: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
