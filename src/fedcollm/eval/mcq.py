"""Multiple-choice accuracy by log-likelihood, as lm-evaluation-harness scores its MC tasks.

For each choice, the summed log-probability of the continuation given the context;
acc picks the largest sum, acc_norm the largest sum divided by the choice's length in bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedcollm.data.encode import encode_pair
from fedcollm.data.records import MCQRecord, context, continuations


def _requests(tokenizer, records: list[MCQRecord], max_length: int) -> list[tuple[tuple[int, ...], list[tuple[int, ...]]]]:
    """Per record: the context's ids and each choice's continuation ids.

    The ids are lm-eval's (encode_pair); a context too long for max_length with the longest
    choice is cut from the left, the same for every choice, so all choices share it.
    """
    out = []
    for rec in records:
        encs = [encode_pair(tokenizer, context(rec), cont, max_length) for cont in continuations(rec)]
        ctx = min((e.ids[: len(e.ids) - e.n_target] for e in encs), key=len)
        out.append((ctx, [e.ids[len(e.ids) - e.n_target:] for e in encs]))
    return out


def _padded(seqs: list[tuple[int, ...]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s)
        mask[i, span] = 1
    return ids, mask


@torch.inference_mode()
def choice_logliks(model, tokenizer, records: list[MCQRecord], *, max_length: int, batch_size: int,
                   device: torch.device, progress: bool = False, desc: str = "eval") -> list[list[float]]:
    """Log-likelihood of every choice of every record (records × choices).

    The context is run once per record and its key/value cache shared by the record's
    choices (most of a multiple-choice prompt is its context, so far fewer tokens go through the
    model than when each context+choice pair is scored whole; 1.2-1.6× faster measured on
    ARC-Easy, same log-likelihoods up to float error).
    batch_size counts choices.
    """
    requests = _requests(tokenizer, records, max_length)
    # Longest context first: little padding per batch, and an out-of-memory shows up at once.
    order = sorted(range(len(records)), key=lambda i: -len(requests[i][0]))
    groups, group, n_choices = [], [], 0
    for ri in order:
        group.append(ri)
        n_choices += len(requests[ri][1])
        if n_choices >= batch_size:
            groups.append(group)
            group, n_choices = [], 0
    if group:
        groups.append(group)
    out = [[0.0] * len(rec.choices) for rec in records]
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for group in tqdm(groups, desc=desc, disable=not progress, leave=False):
        ctx_ids, ctx_mask = _padded([requests[ri][0] for ri in group], pad_id, left=True)
        ctx_ids, ctx_mask = ctx_ids.to(device), ctx_mask.to(device)
        # Explicit positions: left padding must not shift them (models with absolute positions).
        ctx_pos = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
        first = model(input_ids=ctx_ids, attention_mask=ctx_mask, position_ids=ctx_pos, use_cache=True,
                      logits_to_keep=1)
        pairs = [(b, ri, ci) for b, ri in enumerate(group) for ci in range(len(requests[ri][1]))]
        which = torch.tensor([b for b, _, _ in pairs], device=device)
        cache = first.past_key_values
        cache.batch_select_indices(which)  # one copy of its context's cache per choice
        cont_ids, cont_mask = _padded([requests[ri][1][ci] for _, ri, ci in pairs], pad_id, left=False)
        cont_ids, cont_mask = cont_ids.to(device), cont_mask.to(device)
        cont_pos = ctx_mask.sum(-1)[which][:, None] + torch.arange(cont_ids.shape[1], device=device)
        rest = model(input_ids=cont_ids, attention_mask=torch.cat([ctx_mask[which], cont_mask], dim=1),
                     position_ids=cont_pos, cache=cache, use_cache=False).logits
        # Token 0 of a continuation is predicted by its context's last position, token t by t-1.
        logits = torch.cat([first.logits[:, -1:][which], rest[:, :-1]], dim=1)
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, cont_ids[..., None]).squeeze(-1)
        sums = (logp.double() * cont_mask).sum(-1)
        for (_, ri, ci), value in zip(pairs, sums.tolist()):
            out[ri][ci] = value
    return out


def accuracy(records: list[MCQRecord], logliks: list[list[float]]) -> dict[str, float]:
    """acc and acc_norm (log-likelihood per byte of the choice text) over the records."""
    correct = correct_norm = 0
    for rec, ll in zip(records, logliks):
        lengths = [len(c[1:].encode("utf-8")) or 1 for c in continuations(rec)]  # drop the " "
        norm = [x / n for x, n in zip(ll, lengths)]
        correct += int(max(range(len(ll)), key=ll.__getitem__) == rec.answer)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == rec.answer)
    n = max(len(records), 1)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": len(records)}


def evaluate(model, tokenizer, records: list[MCQRecord], *, max_length: int, batch_size: int,
             device: torch.device, progress: bool = False, desc: str = "eval") -> dict[str, float]:
    ll = choice_logliks(model, tokenizer, records, max_length=max_length, batch_size=batch_size,
                        device=device, progress=progress, desc=desc)
    return accuracy(records, ll)
