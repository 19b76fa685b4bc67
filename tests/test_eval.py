"""The evaluator against hand-computed log-likelihoods and lm-evaluation-harness's definitions.

These tests also run in CI's lowest-version environment (transformers, peft at the lowest
versions pyproject.toml allows), where a wrong cache keyword once scored choices without context.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedcollm.data.records import MCQRecord, context, continuations
from fedcollm.eval import scoring
from fedcollm.eval.mcq import accuracy, choice_logliks, encode_requests
from fedcollm.models.loading import tiny_model, tiny_tokenizer

RECORDS = [
    MCQRecord("a", "Which is hot?", ("the sun", "snow", "a very long icy glacier"), 0),
    MCQRecord("b", "What is blue?", ("sky", "coal"), 0, style="openbookqa"),
    MCQRecord("c", "Which factor will most likely cause a person to develop a fever, and why would it?",
              ("a bacterial population", "a leg muscle relaxing", "eating vegetables", "sleep"), 0),
    MCQRecord("d", "Sky?", ("blue", "red", "green"), 0),
]


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_model(len(tok)).eval(), tok


def _by_hand(model, tok, ctx: str, cont: str) -> float:
    """Sum of log p(continuation token | everything before it), one unpadded sequence, no cache."""
    ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
    ids = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ctx_ids), len(ids)))


def _without_cache(model, requests, pad_id: int) -> list[list[float]]:
    """Every context+choice as one right-padded sequence in one batch: no shared cache at all."""
    seqs = [(r.context + ch, len(ch)) for r in requests for ch in r.choices]
    width = max(len(s) for s, _ in seqs)
    ids = torch.tensor([list(s) + [pad_id] * (width - len(s)) for s, _ in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in seqs])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    flat = [sum(logp[b, t - 1, s[t]].item() for t in range(len(s) - n, len(s))) for b, (s, n) in enumerate(seqs)]
    out, k = [], 0
    for r in requests:
        out.append(flat[k:k + len(r.choices)])
        k += len(r.choices)
    return out


def test_logliks_match_hand_computation(tiny):
    model, tok = tiny
    requests = encode_requests(tok, RECORDS, 128)
    got = choice_logliks(model, requests, batch_size=3, device=torch.device("cpu"), pad_id=tok.pad_token_id)
    for rec, row in zip(RECORDS, got):
        for cont, value in zip(continuations(rec), row):
            assert value == pytest.approx(_by_hand(model, tok, context(rec), cont), abs=1e-4)


@pytest.mark.parametrize("batch_size", [1, 4, 7, 64])
def test_shared_cache_and_batching_give_the_same_logliks(tiny, batch_size):
    # batch 64 puts every question (contexts of different lengths: left padding) in one pass.
    model, tok = tiny
    requests = encode_requests(tok, RECORDS, 128)
    assert len({len(r.context) for r in requests}) > 1
    reference = _without_cache(model, requests, tok.pad_token_id)
    got = choice_logliks(model, requests, batch_size=batch_size, device=torch.device("cpu"), pad_id=tok.pad_token_id)
    for ref_row, row in zip(reference, got):
        assert row == pytest.approx(ref_row, abs=1e-4)


def test_lm_eval_definitions_on_hand_computed_items():
    # lm-eval: acc = argmax of the summed log-likelihood of " " + choice; acc_norm = argmax of
    # that sum divided by len(choice) in characters.
    # x: "a" has the higher sum (acc picks it: wrong); "bbbb" the higher per-character score
    #    (-4/4 = -1 > -2/1: acc_norm right).
    # y: "é" is 1 character (2 bytes): per character -3/1 = -3 < -2/1, so acc_norm picks "a"
    #    (right); per byte (-1.5) it would pick "é".
    # z: "ccc" vs "dd": sums -6 and -5 → acc picks "dd" (right); per char -2 vs -2.5 → acc_norm
    #    picks "ccc" (wrong).
    recs = [MCQRecord("x", "q", ("a", "bbbb"), 1), MCQRecord("y", "q", ("a", "é"), 0),
            MCQRecord("z", "q", ("ccc", "dd"), 1)]
    res = accuracy(recs, [[-2.0, -4.0], [-2.0, -3.0], [-6.0, -5.0]])
    assert res["correct"] == [0, 1, 1] and res["correct_norm"] == [1, 1, 0]
    assert res["acc"] == pytest.approx(2 / 3) and res["acc_norm"] == pytest.approx(2 / 3)
    assert res["n"] == 3


def test_scoring_scores_the_tiny_model_end_to_end(tiny):
    model, tok = tiny
    res = scoring.score(model, tok, RECORDS, scoring.prepare(tok, RECORDS, scoring.MCQ, 128), batch_size=5,
                        device=torch.device("cpu"))
    by_hand = [[_by_hand(model, tok, context(r), c) for c in continuations(r)] for r in RECORDS]
    assert res == accuracy(RECORDS, by_hand)


def test_commonsense_qa_scores_letters_and_lists_choices():
    rec = MCQRecord("c", "Where do fish live?", ("tree", "water", "sky", "car", "desk"), 1,
                    style="commonsense_qa")
    assert continuations(rec) == [" A", " B", " C", " D", " E"]
    assert context(rec).splitlines() == ["Question: Where do fish live?", "A. tree", "B. water",
                                         "C. sky", "D. car", "E. desk", "Answer:"]


def test_pairs_longer_than_max_length_are_cut_from_the_left_and_counted(capsys):
    from fedcollm.data.encode import bos_prefix, encode_pairs  # noqa: PLC0415

    tok = tiny_tokenizer()
    pairs = [("Hot?", " sun"), ("Q " * 40 + "Which is hot?", " the sun")]
    whole = [bos_prefix(tok) + tok(c + a, add_special_tokens=False)["input_ids"] for c, a in pairs]
    limit = len(whole[0]) + 2  # the first fits, the second does not
    short, long_ = encode_pairs(tok, pairs, limit)
    assert list(short.ids) == whole[0]
    assert list(long_.ids) == whole[1][-limit:]  # its start cut, not the answer
    assert (f"1 of 2 prompt+answer pairs are longer than data.max_length = {limit} tokens (the longest "
            f"{len(whole[1])}) and were cut from the left") in capsys.readouterr().out
    encode_pairs(tok, pairs[:1], limit)
    assert "cut" not in capsys.readouterr().out  # nothing cut, nothing said


def test_nan_log_likelihoods_are_refused_not_scored():
    from fedcollm.errors import FedCoLLMError  # noqa: PLC0415

    good = [[-1.0, -2.0, -3.0], [-1.0, -0.5], [-4.0, -1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]]
    assert accuracy(RECORDS, good)["acc"] == 0.5  # items a and d right
    bad = [good[0], [float("nan"), float("nan")], *good[2:]]
    with pytest.raises(FedCoLLMError, match="log-likelihoods are NaN on 1 of 4 items: its weights diverged"):
        accuracy(RECORDS, bad)
