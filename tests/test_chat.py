"""Conversational instruction data (TRL's forms): read, rendered by each model's chat template into
the prompt-completion pair the template spells, BOS not doubled, and refused in one line where it
cannot be rendered; with two tokenizers, KD pairs tokens only within the text both renderings share."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from fedcollm import components
from fedcollm.config import load_config
from fedcollm.data.chat import Conversation, conversation, render
from fedcollm.data.encode import encode_pairs
from fedcollm.train.align import align, one_to_one, within_shared_text
from fedcollm.train.distill import aligned_kd_step
from fedcollm.data.loaders import read_records
from fedcollm.data.records import Completion, shared_items, training_pairs
from fedcollm.errors import FedCoLLMError
from fedcollm.eval import scoring

from conftest import COLORS, THINGS

# ChatML, as SmolLM2's template writes it (without its default system message)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chatml(messages: list[tuple[str, str]]) -> tuple[str, str]:
    """The (prompt, completion) that CHATML renders, written out by hand."""
    prompt = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in messages[:-1]) + "<|im_start|>assistant\n"
    return prompt, f"{messages[-1][1]}<|im_end|>\n"


def _conversations(path: Path, n: int) -> tuple[Path, list[list[tuple[str, str]]]]:
    things = ["apple", "leaf", "sky", "sun", "coal", "snow"]
    colors = ["red", "green", "blue", "yellow", "black", "white"]
    chats = []
    with path.open("w") as fh:
        for i in range(n):
            k = i % len(things)
            chat = [("system", "Answer briefly."), ("user", f"What colour is the {things[k]}?"),
                    ("assistant", f"The {things[k]} is {colors[k]}.")]
            if i % 2:  # TRL's conversational prompt-completion form
                obj = {"prompt": [{"role": r, "content": c} for r, c in chat[:-1]],
                       "completion": [{"role": "assistant", "content": chat[-1][1]}]}
            else:
                obj = {"messages": [{"role": r, "content": c} for r, c in chat]}
            fh.write(json.dumps({"id": f"c{i}", **obj}) + "\n")
            chats.append(chat)
    return path, chats


@pytest.fixture
def chatml(smoke_cfg, monkeypatch):
    """The smoke config's tokenizer with a ChatML template (restored after the test)."""
    monkeypatch.setattr(components.tokenizer(smoke_cfg, "slm"), "chat_template", CHATML, raising=False)
    return smoke_cfg


def test_both_conversational_forms_are_read_as_conversations(tmp_path):
    path, chats = _conversations(tmp_path / "chats.jsonl", 2)
    assert read_records(path) == [Conversation(f"c{i}", tuple(chat), (2,)) for i, chat in enumerate(chats)]


@pytest.mark.parametrize("obj,message", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "yo"}]},
     "the last must be a non-empty 'assistant' message"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "at least one message before the last"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "{'role': str, 'content': str}"),
    ({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "a"},
                                                                     {"role": "assistant", "content": "b"}]},
     "a conversational 'completion' must be a list of one assistant message"),
])
def test_a_malformed_conversation_names_file_and_line(tmp_path, obj, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                 + json.dumps(obj) + "\n")
    with pytest.raises(FedCoLLMError) as err:
        read_records(f)
    assert str(err.value).startswith(f"{f}:2: ") and message in str(err.value)


def test_conversations_train_as_the_pairs_their_chat_template_spells(chatml, tmp_path):
    """Clients' examples and the auxiliary set from a conversation file are, to the token, those of
    the prompt-completion file holding what the template renders, written out by hand."""
    convs, chats = _conversations(tmp_path / "chats.jsonl", 30)
    spelled = tmp_path / "spelled.jsonl"
    spelled.write_text("".join(json.dumps({"id": f"c{i}", "prompt": _chatml(c)[0], "completion": _chatml(c)[1]})
                               + "\n" for i, c in enumerate(chats)))
    a, b = (dataclasses.replace(chatml, data=dataclasses.replace(chatml.data, train_file=str(f)))
            for f in (convs, spelled))
    assert components.train_split(a)[0] == read_records(spelled)
    for k in range(a.data.num_clients):
        assert components.client_examples(a, k) == components.client_examples(b, k)
    assert components.server_data(a).aux == components.server_data(b).aux


def test_a_conversation_evaluation_set_is_scored_by_the_loss_of_its_answers(chatml, tmp_path):
    convs, chats = _conversations(tmp_path / "eval.jsonl", 5)
    cfg = dataclasses.replace(chatml, data=dataclasses.replace(chatml.data, eval_file=str(convs)))
    data = components.server_data(cfg)
    assert data.eval_kind == scoring.COMPLETION
    assert [(r.prompt, r.completion) for r in data.evals] == [_chatml(c) for c in chats]


def test_a_template_that_writes_the_bos_gets_one_bos_not_two(tmp_path):
    """A tokenizer that puts BOS in front of every text (Gemma) and a template that writes it too:
    the rendered prompt leaves it out, and the encoded pair starts with one BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: PLC0415

    vocab = ["<unk>", "<s>", "</s>", "<user>", "<assistant>", "hi", "hello"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> "
                         "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}")
    (done,) = render([Conversation("c", (("user", "hi"), ("assistant", "hello")), (1,))], lambda: tok, "tiny")
    assert done == Completion("c", "<user> hi </s> <assistant> ", "hello </s> ")
    (enc,) = encode_pairs(tok, [(done.prompt, done.completion)], 64)
    assert list(enc.ids) == [1, 3, 5, 2, 4, 6, 2] and enc.n_target == 2


def test_a_conversation_without_a_chat_template_is_refused_in_one_line(smoke_cfg, tmp_path):
    convs, _ = _conversations(tmp_path / "chats.jsonl", 30)
    cfg = dataclasses.replace(smoke_cfg, data=dataclasses.replace(smoke_cfg.data, train_file=str(convs)))
    with pytest.raises(FedCoLLMError, match=r"^c0: a conversational record needs a chat template, and the tokenizer "
                                            r"of tiny-random has none; give 'prompt' and 'completion' strings"):
        components.client_examples(cfg, 0)


def _dialogues(path: Path, n: int) -> tuple[Path, list[list[tuple[str, str]]]]:
    """n `messages` conversations of two answered questions each; every third opens with an
    assistant greeting (not learnt: nothing is before it)."""
    chats = []
    with path.open("w") as fh:
        for i in range(n):
            a, b = i % 6, (i + 1) % 6
            chat = [("assistant", "Hello! Ask me about colours.")] if i % 3 == 0 else []
            chat += [("user", f"What colour is the {THINGS[a]}?"), ("assistant", f"The {THINGS[a]} is {COLORS[a]}."),
                     ("user", f"And the {THINGS[b]}?"), ("assistant", f"It is {COLORS[b]}.")]
            fh.write(json.dumps({"id": f"d{i}", "messages": [{"role": r, "content": c} for r, c in chat]}) + "\n")
            chats.append(chat)
    return path, chats


def _turns(chat: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each answer after the first message as CHATML renders it, written out by hand."""
    return [_chatml(chat[:i + 1]) for i, (role, _) in enumerate(chat) if i > 0 and role == "assistant"]


def test_every_answer_of_a_messages_conversation_is_learnt_after_the_conversation_up_to_it(chatml, tmp_path):
    """A client's examples are each record's turns, in order, as the template renders them (a
    record is not split between parts), and the server counts a client's examples as its clients
    do (the cap on the example counts they report)."""
    path, chats = _dialogues(tmp_path / "dialogues.jsonl", 40)
    assert [r.learnt for r in read_records(path)[:3]] == [(2, 4), (1, 3), (1, 3)]
    cfg = dataclasses.replace(chatml, data=dataclasses.replace(chatml.data, train_file=str(path)))
    train, split = components.train_split(cfg)
    by_id = {f"d{i}": _turns(chat) for i, chat in enumerate(chats)}
    assert all(len(by_id[r.id]) == 2 and training_pairs(r) == by_id[r.id] for r in train)
    tok = components.tokenizer(cfg, "slm")
    for k, part in enumerate(split.clients):
        want = encode_pairs(tok, [pair for i in part for pair in by_id[train[i].id]], cfg.data.max_length)
        assert components.client_examples(cfg, k) == want
    assert components.server_data(cfg).client_sizes == tuple(2 * len(part) for part in split.clients)
    assert len(components.server_data(cfg).aux.slm) == 2 * len(split.aux)


def test_the_conversational_prompt_completion_form_learns_its_completion_only(chatml):
    """TRL's completion_only_loss: an assistant message in the prompt is read, not learnt."""
    chat = [("user", "What colour is the sky?"), ("assistant", "Blue."), ("user", "And the sun?")]
    (rec,) = render([conversation("p", [{"role": r, "content": c} for r, c in chat], "f:1",
                                  [{"role": "assistant", "content": "Yellow."}])],
                    lambda: components.tokenizer(chatml, "slm"), "tiny")
    assert training_pairs(rec) == [_chatml([*chat, ("assistant", "Yellow.")])]


def test_a_conversation_evaluation_set_is_scored_over_every_learnt_answer(chatml, tmp_path):
    path, chats = _dialogues(tmp_path / "eval.jsonl", 5)
    cfg = dataclasses.replace(chatml, data=dataclasses.replace(chatml.data, eval_file=str(path)))
    data = components.server_data(cfg)
    tok, slm = components.tokenizer(cfg, "slm"), components.build_slm(cfg)
    pairs = [pair for chat in chats for pair in _turns(chat)]
    assert data.eval_requests["slm"] == encode_pairs(tok, pairs, cfg.data.max_length)
    got = scoring.score(slm, tok, data.evals, data.eval_requests["slm"], batch_size=4, device=torch.device("cpu"))
    alone = [scoring.score(slm, tok, [r], scoring.prepare(tok, [r], scoring.COMPLETION, cfg.data.max_length),
                           batch_size=4, device=torch.device("cpu")) for r in data.evals]
    # n counts conversations; the loss is over every answer token of the set, so it is the
    # token-weighted mean of the conversations' own losses
    assert got["n"] == 5 and got["tokens"] == sum(a["tokens"] for a in alone)
    assert got["loss"] == pytest.approx(sum(a["loss"] * a["tokens"] for a in alone) / got["tokens"], rel=1e-5)


def test_an_evaluation_conversation_trained_on_as_an_earlier_turn_counts_as_a_training_item():
    trained = Completion("t", "<u>Q2</u><a>", "A2", earlier=(("<u>Q1</u><a>", "A1"),))
    assert shared_items([Completion("e", "<u>Q1</u><a>", "A1")], [trained]) == 1
    assert shared_items([Completion("e", "<u>Q3</u><a>", "A3")], [trained]) == 0


def test_a_chat_template_that_refuses_a_conversation_is_refused_in_one_line(chatml, tmp_path, monkeypatch):
    tok = components.tokenizer(chatml, "slm")
    monkeypatch.setattr(tok, "chat_template", "{% if messages[0]['role'] == 'system' %}{{ raise_exception("
                        "'System role not supported') }}{% endif %}" + CHATML)
    path, _ = _conversations(tmp_path / "chats.jsonl", 1)
    with pytest.raises(FedCoLLMError, match=r"^c0: tiny's chat template refused the conversation up to message 2: "
                                            r"System role not supported$"):
        render(read_records(path), lambda: tok, "tiny")


# Gemma's turn marks: another template than the SLM's ChatML
TURNS = ("{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
         "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _turns_by_hand(messages: list[tuple[str, str]]) -> tuple[str, str]:
    """The (prompt, completion) that TURNS renders, written out by hand."""
    role = {"assistant": "model"}
    prompt = "".join(f"<start_of_turn>{role.get(r, r)}\n{c}<end_of_turn>\n" for r, c in messages[:-1])
    return prompt + "<start_of_turn>model\n", f"{messages[-1][1]}<end_of_turn>\n"


@pytest.fixture
def two_templates(smoke_overrides, monkeypatch):
    """The LLM on one tiny tokenizer with TURNS, the SLM its own tiny model on another with CHATML."""
    cache = smoke_overrides[3].split('"')[1] + "-cache"
    cfg = load_config(preset="smoke", overrides=[*smoke_overrides, 'model.slm="tiny-random-sp"',
                                                 f'model.cache_dir="{cache}"'])
    assert not components.shares_tokenizer(cfg)
    monkeypatch.setattr(components.tokenizer(cfg), "chat_template", TURNS, raising=False)
    monkeypatch.setattr(components.tokenizer(cfg, "slm"), "chat_template", CHATML, raising=False)
    return cfg


def test_each_model_learns_and_is_scored_on_conversations_in_its_own_template(two_templates, tmp_path):
    """The clients' SLM examples are ChatML's pairs, the LLM's (centralized baseline, auxiliary set,
    evaluation) those of its own template, to the token; the records and their split are one."""
    path, chats = _conversations(tmp_path / "chats.jsonl", 30)
    eval_chats = [[("user", f"How many legs has a {x}?"), ("assistant", f"A {x} has {k}.")]
                  for x, k in (("cat", 4), ("bird", 2), ("snake", 0))]
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"id": f"e{i}", "messages": [{"role": r, "content": c} for r, c in chat]})
                             + "\n" for i, chat in enumerate(eval_chats)))
    cfg = dataclasses.replace(two_templates, data=dataclasses.replace(two_templates.data, train_file=str(path),
                                                                      eval_file=str(evals)))
    by_id = {f"c{i}": c for i, c in enumerate(chats)}
    train, split = components.train_split(cfg)
    assert [r.id for r in components.train_split(cfg, "llm")[0]] == [r.id for r in train]
    assert components.train_split(cfg, "llm")[1] == split
    llm_tok, slm_tok, n = components.tokenizer(cfg), components.tokenizer(cfg, "slm"), cfg.data.max_length
    for k, part in enumerate(split.clients):
        chats_k = [by_id[train[i].id] for i in part]
        assert components.client_examples(cfg, k) == encode_pairs(slm_tok, [_chatml(c) for c in chats_k], n)
        assert components.client_examples(cfg, k, "llm") == encode_pairs(llm_tok, [_turns_by_hand(c) for c in chats_k],
                                                                        n)
    data = components.server_data(cfg)
    aux_chats = [by_id[train[i].id] for i in split.aux]
    assert [e.ids for e in data.aux.llm] == [e.ids for e in encode_pairs(llm_tok, [_turns_by_hand(c) for c in aux_chats], n)]
    assert [e.ids for e in data.aux.slm] == [e.ids for e in encode_pairs(slm_tok, [_chatml(c) for c in aux_chats], n)]
    assert data.eval_requests["llm"] == encode_pairs(llm_tok, [_turns_by_hand(c) for c in eval_chats], n)
    assert data.eval_requests["slm"] == encode_pairs(slm_tok, [_chatml(c) for c in eval_chats], n)
    assert [(r.prompt, r.completion) for r in data.evals] == [_chatml(c) for c in eval_chats]


def test_kd_pairs_the_two_models_tokens_only_within_the_answer_both_templates_render(two_templates, tmp_path):
    path, chats = _conversations(tmp_path / "chats.jsonl", 30)
    cfg = dataclasses.replace(two_templates, data=dataclasses.replace(two_templates.data, train_file=str(path)))
    train, split = components.train_split(cfg)
    aux = components.server_data(cfg).aux
    answers = [dict(enumerate(c))[2][1] for c in (dict((f"c{i}", c) for i, c in enumerate(chats))[train[i].id]
                                                  for i in split.aux)]
    for f, g, answer in zip(aux.llm, aux.slm, answers):
        # both spans end at one character, past the answer but not past the text both renderings
        # share ("<" of "<|im_end|>" and "<end_of_turn>"); each template's own marks after it are
        # still targets
        same = len(os.path.commonprefix([answer + "<|im_end|>\n", answer + "<end_of_turn>\n"]))
        assert len(answer) <= f.spans[-1][1] == g.spans[-1][1] <= same
        assert len(f.spans) < f.n_target and len(g.spans) < g.n_target
        assert one_to_one(align(list(f.spans), list(g.spans)))
    loss, parts = aligned_kd_step(components.build_llm(cfg), components.build_slm(cfg), aux, [0, 1, 2], cfg.distill,
                                  torch.device("cpu"), components.vocab_maps(cfg))
    assert torch.isfinite(loss) and parts


def test_spans_are_cut_at_the_last_boundary_both_share_within_the_same_text():
    a_text, b_text = "Hi there<|im_end|>\n", "Hi there<end_of_turn>\n"
    a, b = [(0, 2), (2, 8), (8, 18), (18, 19)], [(0, 1), (1, 2), (2, 8), (8, 21), (21, 22)]
    assert within_shared_text(a, a_text, b, b_text) == (a[:2], b[:3])  # "Hi there", and "<" is no boundary
    # a token across the place the texts part, on one side: no common boundary after 0, nothing paired
    assert within_shared_text([(0, 3), (3, 5)], "abcdX", [(0, 2), (2, 4), (4, 5)], "abcdY") == ([], [])
    assert within_shared_text(a, a_text, a, a_text) == (a, a)


def test_a_model_whose_tokenizer_has_no_template_reads_the_others(two_templates, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(components.tokenizer(two_templates), "chat_template", None, raising=False)
    components._say_borrowed_template.cache_clear()  # said once a process
    path, chats = _conversations(tmp_path / "chats.jsonl", 30)
    cfg = dataclasses.replace(two_templates, data=dataclasses.replace(two_templates.data, train_file=str(path)))
    train, _ = components.train_split(cfg, "llm")
    assert [(r.prompt, r.completion) for r in train] == [_chatml(c) for c in (dict((f"c{i}", c) for i, c in
                                                                                    enumerate(chats))[r.id] for r in train)]
    assert "the tokenizer of tiny-random has no chat template: its conversations are rendered by tiny-random-sp's" \
        in capsys.readouterr().out
