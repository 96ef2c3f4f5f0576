"""The prompt format: how a record becomes an Idefics2 chat, and how an answer is read back out of a generation.

Defined once here; the collator, evaluation, serving and scoring all import it.
"""

from __future__ import annotations

import re

END_OF_UTTERANCE = "<end_of_utterance>"


def user_text(question: str, prefix: str = "") -> str:
    """The user turn's text: an optional prefix prompt (params) before the question."""
    return f"{prefix.strip()} {question.strip()}".strip() if prefix and prefix.strip() else question.strip()


def chat_messages(question: str, answer: str | None = None, prefix: str = "") -> list[dict]:
    """Idefics2 chat messages: a user turn ``[image, text]`` and, for training, the assistant's answer."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text(question, prefix)}]},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


_ANSWER_AFTER = re.compile(r"answer:(.*?)(?:question:|$)", re.DOTALL)


def extract_answer(generation: str) -> str:
    """The paper's answer extraction: lowercase; the text after ``answer:`` up to ``question:`` if present;
    ``assistant:`` and ``<end_of_utterance>`` removed; surrounding whitespace stripped."""
    text = generation.lower().replace(END_OF_UTTERANCE, " ")
    match = _ANSWER_AFTER.search(text)
    if match:
        text = match.group(1)
    return text.replace("assistant:", "").strip()
