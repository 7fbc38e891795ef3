"""The one wording of a question put to a receiver, used by training, the eval harness and the services.

    question_prompt("Where does Ada Brook live?") ->
        Question: Where does Ada Brook live?
        Answer with one or two words.
        Answer:

An open prompt (QASample.open_ended: "Summarize what you know about Ada Brook.") asks for
sentences instead: OPEN_INSTRUCTION in place of ANSWER_INSTRUCTION.

With include_context=True the receiver's own document comes first, separated by a blank line:
the same layout lcflow.core.prompting.render_text gives for `contexts=[receiver_context]`. The
handoff paths (LCF, LCF-X, text) pass the prompt WITHOUT context and hand the document to
lcflow.core.prompting separately, because they need to know where the document lies in the input.
"""

from __future__ import annotations

from lcflow.tasks.base import QASample

ANSWER_INSTRUCTION = "Answer with one or two words."
OPEN_INSTRUCTION = "Answer in two or three sentences."
# The longest answer generated for each: a word or two, or a few sentences.
SHORT_ANSWER_TOKENS = 12
OPEN_ANSWER_TOKENS = 80
CONTEXT_SEPARATOR = "\n\n"  # as lcflow.core.prompting joins context blocks and the prompt


def question_prompt(question: str, instruction: str = ANSWER_INSTRUCTION) -> str:
    """The bare prompt for a question (what services build from a request's question text)."""
    return f"Question: {question.strip()}\n{instruction}\nAnswer:"


def format_question_prompt(sample: QASample, include_context: bool = False) -> str:
    """The receiver's plain-text prompt for a sample; with include_context, its own document first
    (the "receiver alone" baseline). A sample without a receiver document gets the bare prompt."""
    prompt = question_prompt(sample.question, OPEN_INSTRUCTION if sample.open_ended else ANSWER_INSTRUCTION)
    if include_context and sample.receiver_context:
        return sample.receiver_context + CONTEXT_SEPARATOR + prompt
    return prompt
