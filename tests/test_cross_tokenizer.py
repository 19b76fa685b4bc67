"""An LLM and an SLM with different tokenizers: vocabulary map, alignment of two tokenizations,
KD across them carrying gradient into both adapters, and choice-level KD by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from fedcollm import components
from fedcollm.config import load_config
from fedcollm.data.encode import encode_pairs
from fedcollm.data.records import Completion
from fedcollm.models.loading import tiny_tokenizer
from fedcollm.models.lora import adapter_state
from fedcollm.train.align import VocabMap, align, one_to_one
from fedcollm.train.distill import kd_kl, kd_step, mutual_distill, pass_weights

TEXTS = ["Question: Which factor will most likely cause a person to develop a fever?\nAnswer: a bacterial population",
         "The sun is responsible for plants sprouting, blooming and wilting.", "é ü 42 !?", " a", "x"]


def _tok_from_vocab(vocab: list[str]):
    """A word-level tokenizer over exactly these tokens (for a hand-checked map)."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=vocab[0])


def test_identical_tokenizers_map_to_the_identity(tmp_path):
    tok = tiny_tokenizer()
    vmap = VocabMap(tok, tok, tmp_path)
    ids = torch.arange(len(tok))
    assert torch.equal(vmap(ids), ids[[vmap.exact[t] for t in vmap.teacher_texts]])
    # ids with a text of their own map to themselves (only duplicate texts, e.g. specials, differ)
    assert sum(int(a == b) for a, b in zip(vmap(ids).tolist(), ids.tolist())) >= len(tok) - 4


def test_a_hand_made_pair_maps_by_text_then_by_edit_distance(tmp_path):
    teacher = _tok_from_vocab(["<unk>", "cat", "dogs", "bird", "zebra"])
    student = _tok_from_vocab(["<unk>", "dog", "cat", "birds", "zebu"])
    vmap = VocabMap(teacher, student, tmp_path)
    got = vmap(torch.tensor([1, 2, 3, 4])).tolist()
    # cat = cat (same text); dogs → dog (1 edit); bird → birds (1 edit); zebra → zebu (2 edits;
    # every other student token is 4 or more away)
    assert got == [2, 1, 3, 4]


def test_the_map_is_kept_on_disk_and_reused(tmp_path, monkeypatch):
    a, b = tiny_tokenizer(), tiny_tokenizer("tiny-random-sp")
    first = VocabMap(a, b, tmp_path)
    ids = torch.tensor([5, 17, 200, 301])
    want = first(ids)
    first.save()
    assert len(list(tmp_path.glob("vocab-map-*.json"))) == 1

    def no_search(*_):
        raise AssertionError("looked up again instead of reading the cache")

    second = VocabMap(a, b, tmp_path)
    monkeypatch.setattr(second, "_nearest", no_search)
    assert torch.equal(second(ids), want)


@pytest.mark.parametrize("text", TEXTS)
def test_alignment_covers_every_character_once(text):
    a, b = tiny_tokenizer(), tiny_tokenizer("tiny-random-sp")
    spans = [k(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"] for k in (a, b)]
    assert spans[0] != spans[1] or len(text) < 20  # the two really tokenize differently (long texts)
    groups = align(*spans)
    for side in (0, 1):  # each side's tokens: every one in exactly one group, in order
        assert [i for g in groups for i in g[side]] == list(range(len(spans[side])))
    covered = []
    for ga, gb in groups:  # both sides of a group cover the same characters, once
        chars_a = (spans[0][ga[0]][0], spans[0][ga[-1]][1])
        chars_b = (spans[1][gb[0]][0], spans[1][gb[-1]][1])
        assert chars_a == chars_b
        covered += range(*chars_a)
    assert covered == list(range(len(text)))


def test_one_to_one_pairs_are_the_single_token_groups():
    groups = align([(0, 2), (2, 5), (5, 6)], [(0, 2), (2, 3), (3, 5), (5, 6)])
    assert groups == [(range(0, 1), range(0, 1)), (range(1, 2), range(1, 3)), (range(2, 3), range(3, 4))]
    assert one_to_one(groups) == [(0, 0), (2, 3)]


@pytest.fixture
def pair_cfg(smoke_overrides):
    """The LLM on one tiny tokenizer, the SLM its own tiny model on another."""
    return load_config(preset="smoke", overrides=[*smoke_overrides, 'model.slm="tiny-random-sp"',
                                                  'model.cache_dir="' + str(smoke_overrides[3].split('"')[1]) + '-cache"'])


def test_the_pair_is_tokenized_per_model(pair_cfg):
    assert not components.shares_tokenizer(pair_cfg)
    data = components.server_data(pair_cfg)
    assert not data.aux.one_tokenizer
    assert [e.ids for e in data.aux.llm] != [e.ids for e in data.aux.slm]
    assert all(e.spans and len(e.spans) == e.n_target for e in data.aux.llm + data.aux.slm)
    assert data.eval_requests["llm"] != data.eval_requests["slm"]


def _changed(before, model) -> bool:
    after = adapter_state(model)
    return any(not torch.equal(before[k], after[k]) for k in before)


INSTRUCTIONS = [  # free-form answers of different lengths, as instruction data has
    ("Name a primary color.\n", "Red is one of the three primary colors."),
    ("What do plants need to grow?\n", "Light, water, air and nutrients from the soil."),
    ("Say hello in French.\n", "Bonjour."),
    ("Why is snow white?\n", "Its ice crystals scatter every wavelength of visible light about equally."),
]


@pytest.mark.parametrize("level,data", [("token", "mcq"), ("choice", "mcq"), ("token", "completions")])
def test_kd_across_tokenizers_carries_gradient_into_both_adapters(pair_cfg, level, data):
    cfg = dataclasses.replace(pair_cfg, distill=dataclasses.replace(pair_cfg.distill, level=level))
    llm, slm = components.build_llm(cfg), components.build_slm(cfg)
    if data == "mcq":
        aux = components.server_data(cfg).aux
    else:  # prompt-completion records: no choices, each tokenizer cuts the answers its own way
        aux = components._aux_set(cfg, [Completion(str(i), p, c) for i, (p, c) in enumerate(INSTRUCTIONS)])
        assert [e.n_target for e in aux.slm] != [e.n_target for e in aux.llm]
    kd = dataclasses.replace(cfg.distill, ce_weight=0.0, kd_lambda=1.0, epochs=1, batch_size=4)
    loss, parts = kd_step(llm, slm, aux, [0, 1, 2, 3], kd, torch.device("cpu"), components.vocab_maps(cfg))
    assert parts["kl_llm"] > 0 and parts["kl_slm"] > 0
    loss.backward()
    for model in (llm, slm):
        grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
        assert grads and sum(g.abs().sum().item() for g in grads) > 0
    llm.zero_grad(set_to_none=True)
    slm.zero_grad(set_to_none=True)
    before = {"llm": {k: v.clone() for k, v in adapter_state(llm).items()},
              "slm": {k: v.clone() for k, v in adapter_state(slm).items()}}
    short = dataclasses.replace(aux, llm=aux.llm[:4], slm=aux.slm[:4])
    mutual_distill(llm, slm, short, kd, seed=0, device=torch.device("cpu"), maps=components.vocab_maps(cfg))
    assert _changed(before["llm"], llm) and _changed(before["slm"], slm)


def test_choice_level_kd_equals_a_hand_computed_kl():
    # Two questions' choice log-likelihoods (3 choices and 2, the missing one padded); τ = 2.
    student = torch.tensor([[-3.0, -1.0, -2.0], [-1.0, -4.0, -1e4]])
    teacher = torch.tensor([[-1.0, -2.0, -4.0], [-2.0, -2.0, -1e4]])

    def softmax(xs):
        z = sum(math.exp(x) for x in xs)
        return [math.exp(x) / z for x in xs]

    by_hand = 0.0
    for s, t in (([-3.0, -1.0, -2.0], [-1.0, -2.0, -4.0]), ([-1.0, -4.0], [-2.0, -2.0])):
        p, q = softmax([x / 2 for x in t]), softmax([x / 2 for x in s])
        by_hand += sum(a * math.log(a / b) for a, b in zip(p, q))
    by_hand = by_hand / 2 * 4  # mean over the questions, × τ²
    assert kd_kl(student, teacher, temperature=2.0).item() == pytest.approx(by_hand, rel=1e-5)


def test_same_tokenizer_pairs_keep_the_exact_path(smoke_cfg):
    assert components.shares_tokenizer(smoke_cfg)
    aux = components.server_data(smoke_cfg).aux
    assert aux.one_tokenizer and aux.llm[0].spans is None and components.vocab_maps(smoke_cfg) is None


def test_encoded_spans_are_the_continuation_characters():
    tok = tiny_tokenizer("tiny-random-sp")
    (enc,) = encode_pairs(tok, [("Question: Which is hot?\nAnswer:", " the sun")], 64, with_spans=True)
    cont = " the sun"
    pieces = [cont[a:b] for a, b in enc.spans]
    assert "".join(pieces) == cont and len(pieces) == enc.n_target


@pytest.mark.parametrize("pair", [False, True], ids=["one tokenizer", "two tokenizers"])
@pytest.mark.parametrize("level", ["token", "choice"])
def test_kd_in_several_forward_passes_has_the_whole_batchs_gradient(request, pair, level):
    """distill.micro_batch_size: a batch of 4 questions cut into passes of 3 + 1 (answers of
    unequal lengths, in each model's own tokens) accumulates the gradient of the batch in one
    pass, in both adapters, for every level and tokenizer pair; and the loss parts add up to the
    batch's. Each term is weighted by its share of what it averages over (pass_weights)."""
    base = request.getfixturevalue("pair_cfg" if pair else "smoke_cfg")
    cfg = dataclasses.replace(base, lora=dataclasses.replace(base.lora, dropout=0.0),
                              distill=dataclasses.replace(base.distill, level=level, batch_size=4))
    aux, maps, idx = components.server_data(cfg).aux, components.vocab_maps(cfg), [0, 1, 2, 3]
    assert len({aux.llm[i].n_target for i in idx}) > 1
    grads, parts = {}, {}
    for cut in ([idx], [idx[:3], idx[3:]]):
        llm, slm = components.build_llm(cfg), components.build_slm(cfg)
        for model in (llm, slm):
            for n, p in model.named_parameters():  # B = 0 at init: no KL gradient to compare
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
        total = {}
        for part in cut:
            weights = pass_weights(aux, cfg.distill, part, idx) if len(cut) > 1 else None
            loss, got = kd_step(llm, slm, aux, part, cfg.distill, torch.device("cpu"), maps, weights)
            loss.backward()
            total = {k: total.get(k, 0.0) + v.item() for k, v in got.items()}
        grads[len(cut)] = {f"{m}.{n}": p.grad.clone() for m, model in (("llm", llm), ("slm", slm))
                           for n, p in model.named_parameters() if p.requires_grad}
        parts[len(cut)] = total
    assert parts[2] == pytest.approx(parts[1], rel=1e-4) and parts[1]["kl_llm"] > 0 and parts[1]["kl_slm"] > 0
    assert any("llm." in k for k in grads[1]) and any("slm." in k for k in grads[1])
    for key, g in grads[1].items():
        torch.testing.assert_close(grads[2][key], g, rtol=1e-4, atol=1e-7)
