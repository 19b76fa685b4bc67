"""The multiple-choice record and its prompt, formatted as lm-evaluation-harness does.

Training and evaluation use the same text: the SLM is fine-tuned on `context + " " + answer`,
and evaluation compares the log-likelihood of each `" " + choice` after `context`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcollm.errors import FedCoLLMError


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


def shared_items(evals: list[MCQRecord], train: list[MCQRecord]) -> int:
    """How many evaluation items are also training items: the same question and choices, in
    order, ignoring case and surrounding spaces."""
    def key(r: MCQRecord) -> tuple:
        return r.question.strip().lower(), tuple(c.strip().lower() for c in r.choices)

    seen = {key(r) for r in train}
    return sum(key(r) in seen for r in evals)


def check_held_out(evals: list[MCQRecord], train: list[MCQRecord], where: str) -> None:
    """Refuse an evaluation set that is mostly training items (e.g. data.eval_file naming the
    training file: its scores would be reported as test accuracy); say how many there are
    otherwise (ARC-Easy's test split repeats 2 of its training items)."""
    n = shared_items(evals, train)
    if evals and 2 * n >= len(evals):
        raise FedCoLLMError(f"data: {n} of {len(evals)} evaluation items ({where}) are training items, word for "
                            "word: evaluate on held-out data")
    if n:
        print(f"[fedcollm] data: {n} of {len(evals)} evaluation items ({where}) are also training items, "
              "word for word; their scores are not held-out scores", flush=True)
