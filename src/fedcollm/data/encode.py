"""Token ids for scoring and training: context and continuation split as lm-eval does."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedcollm.data.records import MCQRecord, context, continuations


@dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]  # context + continuation, cut from the left to max_length
    n_target: int  # the last n_target ids are the continuation


def encode_pair(tokenizer, ctx: str, cont: str, max_length: int) -> Encoded:
    # Like lm-eval: a trailing space of the context belongs to the continuation, and the
    # continuation's ids are those of the whole string past the context's ids.
    if ctx.endswith(" "):
        ctx, cont = ctx[:-1], " " + cont
    ctx_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
    whole = tokenizer(ctx + cont, add_special_tokens=False)["input_ids"]
    if whole[: len(ctx_ids)] != ctx_ids:  # merge across the boundary: encode separately
        cont_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
    else:
        cont_ids = whole[len(ctx_ids):]
    ids = (ctx_ids + cont_ids)[-max_length:]
    return Encoded(tuple(ids), min(len(cont_ids), len(ids) - 1))


def encode_for_training(tokenizer, recs: list[MCQRecord], max_length: int) -> list[Encoded]:
    return [encode_pair(tokenizer, context(r), continuations(r)[r.answer], max_length) for r in recs]


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, and labels that are -100 outside the continuation."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        labels[i, n - e.n_target:n] = ids[i, n - e.n_target:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
