"""Token ids for scoring and training: context and continuation split as lm-eval does."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedcollm.data.records import MCQRecord, context, continuations


@dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]  # context + continuation, cut from the left to max_length
    n_target: int  # the last n_target ids are the continuation


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> list[Encoded]:
    """(context, continuation) pairs → ids, tokenized in two batched calls (the fast tokenizer
    does the work in Rust, not one Python call per string).

    Like lm-eval: a trailing space of the context belongs to the continuation, and the
    continuation's ids are those of the whole string past the context's ids.
    """
    if not pairs:
        return []
    ctxs, conts = [], []
    for ctx, cont in pairs:
        if ctx.endswith(" "):
            ctx, cont = ctx[:-1], " " + cont
        ctxs.append(ctx)
        conts.append(cont)
    ctx_ids = tokenizer(ctxs, add_special_tokens=False)["input_ids"]
    whole = tokenizer([a + b for a, b in zip(ctxs, conts)], add_special_tokens=False)["input_ids"]
    out = []
    for c_ids, w_ids, cont in zip(ctx_ids, whole, conts):
        if w_ids[: len(c_ids)] != c_ids:  # a merge across the boundary: encode separately
            cont_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        else:
            cont_ids = w_ids[len(c_ids):]
        ids = (list(c_ids) + list(cont_ids))[-max_length:]
        out.append(Encoded(tuple(ids), min(len(cont_ids), len(ids) - 1)))
    return out


def encode_pair(tokenizer, ctx: str, cont: str, max_length: int) -> Encoded:
    return encode_pairs(tokenizer, [(ctx, cont)], max_length)[0]


def encode_for_training(tokenizer, recs: list[MCQRecord], max_length: int) -> list[Encoded]:
    return encode_pairs(tokenizer, [(context(r), continuations(r)[r.answer]) for r in recs], max_length)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, and labels that are -100 outside the continuation."""
    width = max(len(e.ids) for e in batch)
    ids, labels, mask = [], [], []
    for e in batch:
        n, pad = len(e.ids), width - len(e.ids)
        ids.append([*e.ids, *[pad_id] * pad])
        mask.append([1] * n + [0] * pad)
        labels.append([-100] * (n - e.n_target) + list(e.ids[n - e.n_target:]) + [-100] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}
