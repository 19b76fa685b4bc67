"""The records a run reads: multiple-choice items, formatted as lm-evaluation-harness does, and
prompt-completion (instruction) examples.

An MCQ record trains and scores on the same text: the SLM is fine-tuned on `context + " " +
answer`, and evaluation compares the log-likelihood of each `" " + choice` after `context`. A
Completion trains on `prompt + completion` as given, the loss on the completion's tokens: the
same training step, so clients, auxiliary data and KD take either kind (mixed too). As an
evaluation set, completions are scored by that loss (eval/completion.py), not by accuracy.

A record gives one example per pair `training_pairs` lists: one for an MCQ item, one for each
learnt turn of a conversation (data/chat.py). A record stays whole when data is split, so no
turn of one conversation lands in another part than its other turns.
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


@dataclass(frozen=True)
class Completion:
    """An instruction example in TRL's standard prompt-completion form. The completion is learnt
    after the prompt exactly as given (no separator or EOS is added: put them in the text)."""
    id: str
    prompt: str
    completion: str
    # A conversation's earlier assistant turns, each (the conversation up to it, the turn), learnt
    # too (data/chat.py); () for a single prompt-completion pair.
    earlier: tuple[tuple[str, str], ...] = ()


Record = MCQRecord | Completion


def training_pairs(rec: Record) -> list[tuple[str, str]]:
    """The record's examples, each (what the model reads, what it learns to continue with): the
    correct choice after the lm-eval prompt for an MCQ record; for a Completion, each earlier turn
    after the conversation up to it, then the completion after the prompt."""
    if isinstance(rec, Completion):
        return [*rec.earlier, (rec.prompt, rec.completion)]
    return [(context(rec), continuations(rec)[rec.answer])]


def all_pairs(records: list[Record]) -> list[tuple[str, str]]:
    """Every record's examples, in order (what training, KD and the completion loss read)."""
    return [pair for r in records for pair in training_pairs(r)]


def words_of(rec: Record) -> str:
    """The record's text, for clustering records by topic."""
    if isinstance(rec, Completion):
        return rec.prompt + " " + rec.completion
    return rec.question + " " + " ".join(rec.choices)


def only_multiple_choice(records: list[Record], what: str, why: str, instead: str = "") -> None:
    """Refuse prompt-completion records where choices are needed (`why` says for what)."""
    found = [r for r in records if isinstance(r, Completion)]
    if found:
        raise FedCoLLMError(f"{what}: {len(found)} of {len(records)} records are prompt-completion records "
                            f"(the first: {found[0].id}), and {why} needs multiple-choice records "
                            f"(question, choices, answer){'; ' + instead if instead else ''}")


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


def shared_items(evals: list[Record], train: list[Record]) -> int:
    """How many evaluation items are also training items, ignoring case and surrounding spaces:
    an MCQ item whose question and choices (in order) an MCQ training record has, or whose prompt
    a prompt-completion training record has; a prompt-completion item whose (last) prompt any
    training record has, an earlier turn's too (an MCQ record's prompt being its lm-eval prompt)."""
    def key(r: MCQRecord) -> tuple:
        return r.question.strip().lower(), tuple(c.strip().lower() for c in r.choices)

    def prompts_of(r: Record) -> set[str]:
        return {p.strip().lower() for p, _ in training_pairs(r)}

    def prompt(r: Record) -> str:
        return training_pairs(r)[-1][0].strip().lower()

    mcq = {key(r) for r in train if isinstance(r, MCQRecord)}
    completion_prompts = set().union(*(prompts_of(r) for r in train if isinstance(r, Completion)))
    prompts = completion_prompts | {prompt(r) for r in train if isinstance(r, MCQRecord)}
    return sum(prompt(r) in prompts if isinstance(r, Completion) else
               key(r) in mcq or prompt(r) in completion_prompts for r in evals)


def check_held_out(evals: list[Record], train: list[Record], where: str) -> None:
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
