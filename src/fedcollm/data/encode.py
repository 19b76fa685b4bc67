"""Token ids for scoring and training: context and continuation split as lm-eval does."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedcollm.data.records import Record, all_pairs


@dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]  # context + continuation, cut from the left to max_length
    n_target: int  # the last n_target ids are the continuation
    # with_spans: each continuation token's (start, end) characters in the continuation text (as
    # encoded: with the context's trailing space moved into it), for cross-tokenizer alignment.
    spans: tuple[tuple[int, int], ...] | None = None


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] for a tokenizer that starts every text with it by default (Gemma: its models expect
    it), [] for one that does not (SmolLM2, GPT-2 style): the model sees what it was trained on."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and with_special[:1] == [bos] and \
        tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos] else []


def pad_id_of(tokenizer) -> int:
    """The id that fills a batch's rows past their ends (masked out: any id does, 0 without one)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def as_encoded(ctx: str, cont: str) -> tuple[str, str]:
    """(context, continuation) as encode_pairs splits the text: like lm-eval, a trailing space of
    the context belongs to the continuation (spans count from the continuation's start so split)."""
    return (ctx[:-1], " " + cont) if ctx.endswith(" ") else (ctx, cont)


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_length: int, with_spans: bool = False) -> list[Encoded]:
    """(context, continuation) pairs → ids, tokenized in two batched calls (the fast tokenizer
    does the work in Rust, not one Python call per string).

    Like lm-eval: a trailing space of the context belongs to the continuation, and the
    continuation's ids are those of the whole string past the context's ids; the context starts
    with the tokenizer's BOS where it adds one itself.
    """
    if not pairs:
        return []
    ctxs, conts = (list(x) for x in zip(*(as_encoded(ctx, cont) for ctx, cont in pairs)))
    bos = bos_prefix(tokenizer)
    ctx_ids = tokenizer(ctxs, add_special_tokens=False)["input_ids"]
    whole_enc = tokenizer([a + b for a, b in zip(ctxs, conts)], add_special_tokens=False,
                          return_offsets_mapping=with_spans)
    whole = whole_enc["input_ids"]
    out, cut, longest = [], 0, 0
    for k, (c_ids, w_ids, ctx, cont) in enumerate(zip(ctx_ids, whole, ctxs, conts)):
        if w_ids[: len(c_ids)] != c_ids:  # a merge across the boundary: encode separately
            alone = tokenizer(cont, add_special_tokens=False, return_offsets_mapping=with_spans)
            cont_ids, shift = alone["input_ids"], 0
            offsets = alone["offset_mapping"] if with_spans else None
        else:
            cont_ids, shift = w_ids[len(c_ids):], len(ctx)
            offsets = whole_enc["offset_mapping"][k][len(c_ids):] if with_spans else None
        ids = bos + list(c_ids) + list(cont_ids)
        if len(ids) > max_length:
            cut, longest = cut + 1, max(longest, len(ids))
            ids = ids[-max_length:]
        n_target = min(len(cont_ids), len(ids) - 1)
        spans = tuple((a - shift, b - shift) for a, b in offsets[len(offsets) - n_target:]) if with_spans else None
        out.append(Encoded(tuple(ids), n_target, spans))
    if cut:  # lm-eval cuts the same way; say so, as a cut answer or question changes what is learnt and scored
        print(f"[fedcollm] data: {cut} of {len(pairs)} prompt+answer pairs are longer than data.max_length = "
              f"{max_length} tokens (the longest {longest}) and were cut from the left", flush=True)
    return out


def encode_pair(tokenizer, ctx: str, cont: str, max_length: int) -> Encoded:
    return encode_pairs(tokenizer, [(ctx, cont)], max_length)[0]


def encode_for_training(tokenizer, recs: list[Record], max_length: int) -> list[Encoded]:
    """The records' examples (records.training_pairs: one per learnt turn), in order."""
    return encode_pairs(tokenizer, all_pairs(recs), max_length)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, labels that are -100 outside the continuation, and
    `answer_rows`: the flat (example × position) indices of the positions that predict an answer
    token (position t predicts label t+1), example-major. They are found here, on the host: a
    mask applied on the GPU would make the host wait for the GPU at every step."""
    width = max(len(e.ids) for e in batch)
    ids, labels, mask = [], [], []
    for e in batch:
        n, pad = len(e.ids), width - len(e.ids)
        ids.append([*e.ids, *[pad_id] * pad])
        mask.append([1] * n + [0] * pad)
        labels.append([-100] * (n - e.n_target) + list(e.ids[n - e.n_target:]) + [-100] * pad)
    labels_t = torch.tensor(labels)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": labels_t,
            "answer_rows": answer_rows(labels_t)}


def answer_rows(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (example × position) of the positions whose next label is an answer token."""
    where = (labels[:, 1:] != -100).nonzero()
    return where[:, 0] * labels.shape[1] + where[:, 1]
