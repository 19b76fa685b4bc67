"""Multiple-choice accuracy by log-likelihood, as lm-evaluation-harness scores its MC tasks.

For each choice, the summed log-probability of the continuation (" " + choice) given the
context; acc picks the largest sum, acc_norm the largest sum divided by the choice's length in
characters (lm-eval's `len(choice)`, without the leading space).

Speed: questions are batched (several per forward pass, contexts left-padded), each context runs
through the model once and its key/value cache is shared by the question's choices. The cache
goes in under the name the installed transformers expects (models/compat.py): a misspelt
keyword is swallowed by some versions, which then score every choice without its context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedcollm.data.encode import encode_pairs
from fedcollm.data.records import MCQRecord, context, continuations
from fedcollm.errors import FedCoLLMError
from fedcollm.models.compat import cache_kwargs, output_cache
from fedcollm.progress import progress_bar

CPU_BATCH, CUDA_BATCH = 16, 256  # choices per forward pass when run.eval_batch_size = 0 (auto)


@dataclass(frozen=True)
class Request:
    context: tuple[int, ...]  # shared by every choice of the question
    choices: tuple[tuple[int, ...], ...]  # each choice's continuation ids


def encode_requests(tokenizer, records: list[MCQRecord], max_length: int) -> list[Request]:
    """Per record: the context's ids and each choice's continuation ids (lm-eval's encoding).

    A context too long for max_length with the longest choice is cut from the left, the same
    for every choice, so all choices share it.
    """
    pairs = [(context(rec), cont) for rec in records for cont in continuations(rec)]
    encs = iter(encode_pairs(tokenizer, pairs, max_length))
    out = []
    for rec in records:
        es = [next(encs) for _ in rec.choices]
        ctx = min((e.ids[: len(e.ids) - e.n_target] for e in es), key=len)
        out.append(Request(ctx, tuple(e.ids[len(e.ids) - e.n_target:] for e in es)))
    return out


def auto_batch_size(batch_size: int, device: torch.device) -> int:
    return batch_size or (CUDA_BATCH if device.type == "cuda" else CPU_BATCH)


def _padded(seqs: list[tuple[int, ...]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids, mask = [], []
    for s in seqs:
        pad = width - len(s)
        ids.append([pad_id] * pad + list(s) if left else list(s) + [pad_id] * pad)
        mask.append([0] * pad + [1] * len(s) if left else [1] * len(s) + [0] * pad)
    return torch.tensor(ids), torch.tensor(mask)


def _groups(requests: list[Request], batch_size: int) -> list[list[int]]:
    """Questions in batches of about batch_size choices, longest context first (little padding
    per batch, and an out-of-memory shows up at once)."""
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].context))
    groups, group, n = [], [], 0
    for i in order:
        group.append(i)
        n += len(requests[i].choices)
        if n >= batch_size:
            groups.append(group)
            group, n = [], 0
    return groups + ([group] if group else [])


def _cont_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position: gathered logit minus logsumexp (no log-softmax copy)."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)


@torch.inference_mode()
def choice_logliks(model, requests: list[Request], *, batch_size: int, device: torch.device, pad_id: int,
                   progress: bool = False, desc: str = "eval") -> list[list[float]]:
    """Log-likelihood of every choice of every request (requests × choices)."""
    out: list[list[float]] = [[0.0] * len(r.choices) for r in requests]
    model.eval()
    groups = _groups(requests, auto_batch_size(batch_size, device))
    bar = progress_bar(len(groups), desc, progress)
    for group in groups:
        ctx_ids, ctx_mask = (t.to(device) for t in _padded([requests[i].context for i in group], pad_id, left=True))
        # Explicit positions: left padding must not shift them.
        ctx_pos = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
        first = model(input_ids=ctx_ids, attention_mask=ctx_mask, position_ids=ctx_pos, use_cache=True,
                      logits_to_keep=1)
        pairs = [(b, i, c) for b, i in enumerate(group) for c in range(len(requests[i].choices))]
        which = torch.tensor([b for b, _, _ in pairs], device=device)
        cache = output_cache(first)
        cache.batch_select_indices(which)  # one copy of its context's cache per choice
        cont_ids, cont_mask = (t.to(device) for t in _padded(
            [requests[i].choices[c] for _, i, c in pairs], pad_id, left=False))
        cont_pos = ctx_mask.sum(-1)[which][:, None] + torch.arange(cont_ids.shape[1], device=device)
        rest = model(input_ids=cont_ids, attention_mask=torch.cat([ctx_mask[which], cont_mask], dim=1),
                     position_ids=cont_pos, use_cache=True, **cache_kwargs(model, cache)).logits
        # Token 0 of a continuation is predicted by its context's last position, token t by t-1.
        logits = torch.cat([first.logits[:, -1:][which], rest[:, :-1]], dim=1)
        sums = (_cont_logprobs(logits, cont_ids).double() * cont_mask).sum(-1)
        for (_, i, c), value in zip(pairs, sums.tolist()):
            out[i][c] = value
        bar.update(1)
    bar.close()
    return out


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def accuracy(records: list[MCQRecord], logliks: list[list[float]]) -> dict:
    """acc, acc_norm and n over the records, and which items each got right (paired tests).

    NaN log-likelihoods (a diverged model) are refused: argmax over them would pick a choice
    and report it as an accuracy."""
    nan = sum(any(math.isnan(x) for x in ll) for ll in logliks)
    if nan:
        raise FedCoLLMError(f"evaluation: the model's log-likelihoods are NaN on {nan} of {len(logliks)} items: "
                            "its weights diverged (a learning rate too high?)")
    correct, correct_norm = [], []
    for rec, ll in zip(records, logliks):
        chars = [len(c[1:]) or 1 for c in continuations(rec)]  # lm-eval: len(choice), no " "
        correct.append(int(_argmax(ll) == rec.answer))
        correct_norm.append(int(_argmax([x / n for x, n in zip(ll, chars)]) == rec.answer))
    n = max(len(records), 1)
    return {"acc": sum(correct) / n, "acc_norm": sum(correct_norm) / n, "n": len(records),
            "correct": correct, "correct_norm": correct_norm}
