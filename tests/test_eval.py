"""The evaluator against hand-computed log-likelihoods; acc_norm divides by byte length."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedcollm.data.records import MCQRecord, context, continuations
from fedcollm.eval.mcq import accuracy, choice_logliks
from fedcollm.models.loading import tiny_model, tiny_tokenizer


def _by_hand(model, tok, ctx: str, cont: str) -> float:
    """Sum of log p(continuation token | everything before it), one unpadded sequence."""
    ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
    ids = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ctx_ids), len(ids)))


def test_logliks_match_hand_computation():
    tok = tiny_tokenizer()
    model = tiny_model(len(tok)).eval()
    recs = [MCQRecord("a", "Which is hot?", ("the sun", "snow", "a very long icy glacier"), 0),
            MCQRecord("b", "What is blue?", ("sky", "coal"), 0, style="openbookqa")]
    got = choice_logliks(model, tok, recs, max_length=128, batch_size=3, device=torch.device("cpu"))
    for rec, row in zip(recs, got):
        for cont, value in zip(continuations(rec), row):
            assert value == pytest.approx(_by_hand(model, tok, context(rec), cont), abs=1e-4)


def test_acc_and_acc_norm_by_byte_length():
    # x: "a" has the higher sum (acc picks it, wrong); "bbbb" the higher per-byte score
    #    (-4/4 = -1 > -2/1: acc_norm right).
    # y: "é" is one character but 2 bytes: per byte -3/2 = -1.5 > -2, so acc_norm picks "é"
    #    (wrong); per character it would pick "a" (right). acc picks "a" (right).
    recs = [MCQRecord("x", "q", ("a", "bbbb"), 1), MCQRecord("y", "q", ("a", "é"), 0)]
    res = accuracy(recs, [[-2.0, -4.0], [-2.0, -3.0]])
    assert res["acc"] == pytest.approx(0.5)
    assert res["acc_norm"] == pytest.approx(0.5)
    assert res["n"] == 2


def test_commonsense_qa_scores_letters_and_lists_choices():
    rec = MCQRecord("c", "Where do fish live?", ("tree", "water", "sky", "car", "desk"), 1,
                    style="commonsense_qa")
    assert continuations(rec) == [" A", " B", " C", " D", " E"]
    assert context(rec).splitlines() == ["Question: Where do fish live?", "A. tree", "B. water",
                                         "C. sky", "D. car", "E. desk", "Answer:"]
