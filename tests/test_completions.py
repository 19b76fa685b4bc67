"""Instruction data in prompt-completion form: read beside MCQ lines, trained on as the MCQ items
it can spell (to the token), distilled across tokenizers, and refused where choices are needed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fedcollm import components
from fedcollm.config import load_config
from fedcollm.data.loaders import read_jsonl
from fedcollm.data.partition import split_indices
from fedcollm.data.records import Completion, MCQRecord, continuations, context, shared_items
from fedcollm.errors import FedCoLLMError
from fedcollm.train.distill import kd_step

INSTRUCTIONS = [  # free-form answers of different lengths, as instruction data has
    ("Name a primary color.\n", "Red is one of the three primary colors."),
    ("What do plants need to grow?\n", "Light, water, air and nutrients from the soil."),
    ("Say hello in French.\n", "Bonjour."),
    ("Why is snow white?\n", "Its ice crystals scatter every wavelength of visible light about equally."),
]


def _as_completions(mcq_file: Path, out: Path) -> Path:
    """The MCQ file's items as prompt-completion lines: the lm-eval prompt and the correct answer."""
    with out.open("w") as fh:
        for r in read_jsonl(mcq_file):
            fh.write(json.dumps({"id": r.id, "prompt": context(r), "completion": continuations(r)[r.answer]}) + "\n")
    return out


def _with(cfg, **data):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data))


def _pair(cfg):
    """The same config with the SLM on its own tiny model and tokenizer (KD across tokenizers)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, slm="tiny-random-sp"))


def test_prompt_completion_lines_are_read_beside_mcq_lines(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text('{"id": "c1", "prompt": "Say hi.\\n", "completion": "Hi!"}\n'
                 '{"question": "2+2?", "choices": ["3", "4"], "answer": "B"}\n'
                 '{"prompt": "", "completion": " 42"}\n')
    first, second, third = read_jsonl(f)
    assert first == Completion("c1", "Say hi.\n", "Hi!")
    assert isinstance(second, MCQRecord) and second.answer == 1
    assert third == Completion(f"{f}:3", "", " 42")  # no id: its file and line


@pytest.mark.parametrize("line,message", [
    ('{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}',
     "a conversational record (lists of messages) is not read; render it with your model's chat template"),
    ('{"prompt": "q"}', "a prompt-completion record needs a 'prompt' string and a non-empty 'completion' string"),
    ('{"prompt": "q", "completion": "  "}', "non-empty 'completion' string"),
    ('{"prompt": 3, "completion": "a"}', "needs a 'prompt' string"),
])
def test_a_malformed_completion_line_names_file_and_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok", "completion": " yes"}\n' + line + "\n")
    with pytest.raises(FedCoLLMError) as err:
        read_jsonl(f)
    assert str(err.value).startswith(f"{f}:2: ") and message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("tokenizers", ["one", "two"])
def test_completions_train_to_the_token_as_the_mcq_items_they_spell(smoke_cfg, tmp_path, tokenizers):
    """Every client's examples and the server's auxiliary set (with each model's character spans,
    across tokenizers) are the same ids from the prompt-completion copy of a file as from the file:
    the training that follows sees nothing else, so it is the same training."""
    mcq = smoke_cfg if tokenizers == "one" else _pair(smoke_cfg)
    done = _with(mcq, train_file=str(_as_completions(Path(mcq.data.train_file), tmp_path / "train.jsonl")))
    assert all(isinstance(r, Completion) for r in components.train_split(done)[0])
    assert components.train_split(done)[1] == components.train_split(mcq)[1]
    for k in range(mcq.data.num_clients):
        assert components.client_examples(done, k) == components.client_examples(mcq, k)
        assert components.client_examples(done, k, "llm") == components.client_examples(mcq, k, "llm")
    aux = {c: components._aux_set(c, [components.train_split(c)[0][i] for i in components.train_split(c)[1].aux])
           for c in (mcq, done)}
    assert aux[done] == aux[mcq] and aux[done].llm and aux[done].one_tokenizer == (tokenizers == "one")


def test_token_level_kd_on_free_form_completions_carries_gradient_into_both_adapters(smoke_cfg):
    cfg = _pair(smoke_cfg)
    llm, slm = components.build_llm(cfg), components.build_slm(cfg)
    aux = components._aux_set(cfg, [Completion(str(i), p, c) for i, (p, c) in enumerate(INSTRUCTIONS)])
    assert [e.n_target for e in aux.slm] != [e.n_target for e in aux.llm]  # two tokenizations of each
    kd = dataclasses.replace(cfg.distill, ce_weight=0.0, kd_lambda=1.0, batch_size=4)
    loss, parts = kd_step(llm, slm, aux, [0, 1, 2, 3], kd, torch.device("cpu"), components.vocab_maps(cfg))
    assert parts["kl_llm"] > 0 and parts["kl_slm"] > 0
    loss.backward()
    for model in (llm, slm):
        grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
        assert grads and sum(g.abs().sum().item() for g in grads) > 0


def test_an_evaluation_set_must_be_multiple_choice(smoke_cfg, tmp_path):
    evals = _as_completions(Path(smoke_cfg.data.eval_file), tmp_path / "eval.jsonl")
    with pytest.raises(FedCoLLMError, match=r"evaluation set \(.*eval.jsonl\): 12 of 12 records are prompt-completion "
                                            r"records \(the first: q1-0\), and scoring \(accuracy over the choices\) "
                                            r"needs multiple-choice records"):
        components.server_data(_with(smoke_cfg, eval_file=str(evals)))
    # Items held out of a training split of completions cannot be scored either.
    train = _as_completions(Path(smoke_cfg.data.train_file), tmp_path / "train.jsonl")
    with pytest.raises(FedCoLLMError, match=r"evaluation set \(.* train_holdout\): 10 of 10 records are prompt-"):
        components.server_data(_with(smoke_cfg, train_file=str(train), eval_split="train_holdout",
                                     holdout_examples=10))


def test_choice_level_kd_and_the_answer_position_split_are_refused_for_completions(smoke_cfg, tmp_path):
    train = str(_as_completions(Path(smoke_cfg.data.train_file), tmp_path / "train.jsonl"))
    choice = load_config(preset="smoke", overrides=[f'data.train_file="{train}"', 'distill.level="choice"',
                                                    'data.dataset="mcq_jsonl"',
                                                    f'data.eval_file="{smoke_cfg.data.eval_file}"'])
    with pytest.raises(FedCoLLMError, match=r"the server's auxiliary data: 12 of 12 records are prompt-completion "
                                            r"records .* distill.level = 'choice' needs multiple-choice records "
                                            r"\(question, choices, answer\); use 'token'"):
        components._aux_set(choice, [components.train_split(choice)[0][i]
                                     for i in components.train_split(choice)[1].aux])
    records = read_jsonl(train)
    with pytest.raises(FedCoLLMError, match=r"data.partition = 'dirichlet': 48 of 48 records .* its label \(the "
                                            r"answer's position\) needs multiple-choice .*; use 'iid' or 'topic'"):
        split_indices(records, 4, "dirichlet", seed=0)
    topic = split_indices(records, 4, "topic", seed=0, topics=4)  # the words of prompt and completion
    assert sorted(i for part in [topic.aux, *topic.clients] for i in part) == list(range(len(records)))


def test_an_evaluation_item_whose_prompt_a_completion_trained_on_counts_as_a_training_item():
    item = MCQRecord("e", "What is 2+2?", ("3", "4"), 1)
    assert shared_items([item], [Completion("t", "Question: What is 2+2?\nAnswer:", " 4")]) == 1
    assert shared_items([item], [Completion("t", "Question: What is 3+3?\nAnswer:", " 6")]) == 0


def test_the_eval_command_refuses_a_completion_file_before_it_loads_a_model(smoke_cfg, tmp_path, capsys, monkeypatch):
    from fedcollm.cli import main  # noqa: PLC0415

    def no_model(*_, **__):
        raise AssertionError("a model was loaded for items that cannot be scored")

    monkeypatch.setattr("fedcollm.models.loading.load_base_model", no_model)
    evals = _as_completions(Path(smoke_cfg.data.eval_file), tmp_path / "eval.jsonl")
    assert main(["eval", "--model", "tiny-random", "--file", str(evals)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"{evals}: 12 of 12 records are prompt-completion records (the first: q1-0), and scoring "
                            "needs multiple-choice records (question, choices, answer)")
