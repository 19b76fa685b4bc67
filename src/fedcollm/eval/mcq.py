"""Multiple-choice accuracy by log-likelihood, as lm-evaluation-harness scores its MC tasks.

For each choice, the summed log-probability of the continuation given the context;
acc picks the largest sum, acc_norm the largest sum divided by the choice's length in bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedcollm.data.encode import collate, encode_pair
from fedcollm.data.records import MCQRecord, context, continuations
from fedcollm.models.logits import answer_logits


@torch.inference_mode()
def choice_logliks(model, tokenizer, records: list[MCQRecord], *, max_length: int, batch_size: int,
                   device: torch.device, progress: bool = False, desc: str = "eval") -> list[list[float]]:
    """Log-likelihood of every choice of every record (records × choices)."""
    requests = []  # (record index, choice index, Encoded)
    for ri, rec in enumerate(records):
        ctx = context(rec)
        for ci, cont in enumerate(continuations(rec)):
            requests.append((ri, ci, encode_pair(tokenizer, ctx, cont, max_length)))
    # Longest first: little padding per batch, and an out-of-memory shows up at once.
    requests.sort(key=lambda r: -len(r[2].ids))
    out = [[0.0] * len(rec.choices) for rec in records]
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in tqdm(range(0, len(requests), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = requests[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([r[2] for r in chunk], pad_id).items()}
        logits, targets = answer_logits(model, batch)  # only the continuation's positions
        keep = batch["labels"][:, 1:] != -100
        row = torch.arange(len(chunk), device=device)[:, None].expand_as(keep)[keep]
        logp = F.log_softmax(logits.float(), dim=-1)
        tok = logp.gather(-1, targets[:, None]).squeeze(-1)
        sums = torch.zeros(len(chunk), device=device, dtype=torch.float64).index_add_(0, row, tok.double())
        for (ri, ci, _), s in zip(chunk, sums.tolist()):
            out[ri][ci] = s
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
