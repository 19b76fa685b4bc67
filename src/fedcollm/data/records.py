"""The multiple-choice record and its prompt, formatted as lm-evaluation-harness does.

Training and evaluation use the same text: the SLM is fine-tuned on `context + " " + answer`,
and evaluation compares the log-likelihood of each `" " + choice` after `context`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MCQRecord:
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    style: str = "arc"  # prompt template: arc | openbookqa | commonsense_qa


def context(rec: MCQRecord) -> str:
    """The prompt before the answer (lm-eval's doc_to_text for the record's task)."""
    if rec.style == "openbookqa":
        return rec.question
    if rec.style == "commonsense_qa":
        lines = [f"Question: {rec.question.strip()}"]
        lines += [f"{chr(65 + i)}. {c}" for i, c in enumerate(rec.choices)]
        return "\n".join(lines) + "\nAnswer:"
    return f"Question: {rec.question}\nAnswer:"


def continuations(rec: MCQRecord) -> list[str]:
    """What is scored after the context, one per choice (lm-eval's doc_to_choice, ' '-joined)."""
    if rec.style == "commonsense_qa":  # lm-eval scores the letters, the choices are in the prompt
        return [f" {chr(65 + i)}" for i in range(len(rec.choices))]
    return [f" {c}" for c in rec.choices]
