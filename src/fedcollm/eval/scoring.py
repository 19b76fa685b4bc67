"""Score a model on an evaluation set of either kind, and name what its scores are.

A multiple-choice set gives accuracy by log-likelihood (eval/mcq.py, lm-evaluation-harness's
protocol); a set of prompt-completion records gives the completions' loss and perplexity
(eval/completion.py). A set is one kind or the other: a mix has no one figure to report.
"""

from __future__ import annotations

import torch

from fedcollm.data.encode import Encoded, encode_for_training, pad_id_of
from fedcollm.data.records import Completion, Record, training_pairs
from fedcollm.errors import FedCoLLMError
from fedcollm.eval.completion import completion_loss
from fedcollm.eval.mcq import Request, accuracy, auto_batch_size, choice_logliks, encode_requests
from fedcollm.eval.metrics import COMPLETION, MCQ, METRICS, items_of, metrics_of  # noqa: F401 - re-exported


def kind_of(records: list[Record], where: str) -> str:
    """MCQ or COMPLETION; a set that mixes them is refused, naming its first record of each."""
    completions = [r for r in records if isinstance(r, Completion)]
    if not completions:
        return MCQ
    if len(completions) < len(records):
        mcq = next(r for r in records if not isinstance(r, Completion))
        raise FedCoLLMError(f"evaluation set ({where}): mixes multiple-choice records (the first: {mcq.id}) with "
                            f"prompt-completion records (the first: {completions[0].id}); score them as two sets")
    return COMPLETION


def prepare(tokenizer, records: list[Record], kind: str, max_length: int) -> list:
    """The set (of `kind`, as kind_of found it) as `score` reads it, tokenized once for many
    scorings: each question's choices, or each record's prompt-completion pairs (one per learnt turn)
    as training encodes them."""
    if kind == COMPLETION:
        return encode_for_training(tokenizer, records, max_length)
    return encode_requests(tokenizer, records, max_length)


def score(model, tokenizer, records: list[Record], prepared: list[Request] | list[Encoded], *, batch_size: int,
          device: torch.device, progress: bool = False, desc: str = "eval") -> dict:
    """The set's figures (METRICS of its kind), n (items) and what each item scored (ITEMS of its
    kind: the paired tests): for multiple choice which items each metric got right, for
    prompt-completion records each one's summed loss and token count."""
    pad = pad_id_of(tokenizer)
    if prepared and isinstance(prepared[0], Encoded):
        return _per_record(completion_loss(model, prepared, batch_size=auto_batch_size(batch_size, device),
                                           pad_id=pad, device=device, progress=progress, desc=desc), records)
    return accuracy(records, choice_logliks(model, prepared, batch_size=batch_size, device=device, pad_id=pad,
                                            progress=progress, desc=desc))


def _per_record(res: dict, records: list[Record]) -> dict:
    """completion_loss's figures with its sequences summed per record (a conversation's learnt
    turns are one item): n, item_nll, item_tokens."""
    turns = [len(training_pairs(r)) for r in records]

    def summed(per_sequence: list) -> list:
        it = iter(per_sequence)
        return [sum(next(it) for _ in range(k)) for k in turns]

    nll, tokens = summed(res.pop("seq_nll")), summed(res.pop("seq_tokens"))
    return {**res, "n": len(records), "item_nll": nll, "item_tokens": tokens}
