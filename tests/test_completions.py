"""Instruction data in prompt-completion form: read beside MCQ lines, trained on as the MCQ items
it can spell (to the token), scored by its loss as an evaluation set (end to end: a Flower run
and `fedcollm eval`), and refused where choices are needed. (Malformed lines: test_data.py; KD
on free-form completions across tokenizers: test_cross_tokenizer.py.)"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedcollm import components
from fedcollm.config import load_config
from fedcollm.data.loaders import read_records
from fedcollm.data.partition import split_indices
from fedcollm.data.records import Completion, MCQRecord, continuations, context, shared_items
from fedcollm.errors import FedCoLLMError
from fedcollm.eval import scoring

from conftest import COLORS, THINGS

def _as_completions(mcq_file: Path, out: Path) -> Path:
    """The MCQ file's items as prompt-completion lines: the lm-eval prompt and the correct answer."""
    with out.open("w") as fh:
        for r in read_records(mcq_file):
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
    first, second, third = read_records(f)
    assert first == Completion("c1", "Say hi.\n", "Hi!")
    assert isinstance(second, MCQRecord) and second.answer == 1
    assert third == Completion(f"{f}:3", "", " 42")  # no id: its file and line


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


def _instructions(path: Path, n: int, template: str, seed: int) -> Path:
    """n prompt-completion records about the colours of things, prompts phrased by `template`."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(n):
            k = rng.randrange(len(THINGS))
            fh.write(json.dumps({"id": f"{path.stem}-{i}", "prompt": template.format(THINGS[k]),
                                 "completion": f" The {THINGS[k]} is {COLORS[k]}."}) + "\n")
    return path


def _hand_loss(model, examples) -> float:
    """Mean NLL over the completion tokens, from whole-sequence logits, one example at a time."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logp = torch.log_softmax(model(input_ids=torch.tensor([e.ids])).logits[0].double(), -1)
            for t in range(len(e.ids) - e.n_target, len(e.ids)):
                total -= logp[t - 1, e.ids[t]].item()
            tokens += e.n_target
    return total / tokens


def test_a_completion_evaluation_set_is_scored_by_its_loss(smoke_cfg, tmp_path):
    evals = _instructions(tmp_path / "eval.jsonl", 7, "Tell me the colour of the {}.\n", 1)
    cfg = _with(smoke_cfg, eval_file=str(evals))
    data = components.server_data(cfg)
    assert data.eval_kind == scoring.COMPLETION and len(data.eval_requests["slm"]) == 7
    slm = components.build_slm(cfg)
    got = scoring.score(slm, components.tokenizer(cfg, "slm"), data.evals, data.eval_requests["slm"],
                        batch_size=3, device=torch.device("cpu"))
    assert got["loss"] == pytest.approx(_hand_loss(slm, data.eval_requests["slm"]), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(got["loss"])) and got["n"] == 7
    assert got["tokens"] == sum(e.n_target for e in data.eval_requests["slm"])
    assert scoring.metrics_of(got) == ("loss", "ppl")


def test_an_evaluation_set_of_both_kinds_is_refused(smoke_cfg, tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(Path(smoke_cfg.data.eval_file).read_text()
                     + _instructions(tmp_path / "more.jsonl", 2, "Colour of the {}?\n", 2).read_text())
    with pytest.raises(FedCoLLMError, match=r"evaluation set \(.*mixed.jsonl\): mixes multiple-choice records "
                                            r"\(the first: q1-0\) with prompt-completion records \(the first: "
                                            r"more-0\); score them as two sets"):
        components.server_data(_with(smoke_cfg, eval_file=str(mixed)))


def test_a_completion_evaluation_set_whose_prompts_training_saw_is_refused(smoke_cfg, tmp_path):
    train = _as_completions(Path(smoke_cfg.data.train_file), tmp_path / "train.jsonl")
    # The synthetic questions repeat: every held-out prompt (16 picked for scoring) was trained on.
    with pytest.raises(FedCoLLMError, match=r"data: 16 of 16 evaluation items \(.*train_holdout\) are training"):
        components.server_data(_with(smoke_cfg, train_file=str(train), eval_split="train_holdout",
                                     holdout_examples=48))


def _experiment_argv(smoke_overrides, out: Path, evals: Path, train: Path, *extra: str) -> list[str]:
    argv = ["experiment", "--preset", "smoke", "--out", str(out), *extra]
    for o in [*smoke_overrides, f'data.eval_file="{evals}"', f'data.train_file="{train}"']:
        argv += ["--set", o]
    return argv


def test_an_experiment_on_instruction_data_compares_the_methods_by_loss(smoke_overrides, tmp_path, capsys):
    """Table 1 holds each method's loss, and each claim a paired bootstrap whose value is the
    difference of the two losses in the table (a ratio of sums over the items, not a mean of
    per-item losses)."""
    from fedcollm.cli import main  # noqa: PLC0415
    from fedcollm.experiment.significance import paired_bootstrap  # noqa: PLC0415

    train = _instructions(tmp_path / "train.jsonl", 60, "What colour is the {}? Answer in a sentence.\n", 0)
    evals = _instructions(tmp_path / "eval.jsonl", 9, "Tell me the colour of the {}.\n", 1)
    out = tmp_path / "exp"
    assert main(_experiment_argv(smoke_overrides, out, evals, train, "--seeds", "0",
                                 "--methods", "zero_shot,standalone,fedcollm,centralized")) == 0
    results = json.loads((out / "results.json").read_text())["results"]["mcq_jsonl"]
    slm = {m: next(iter(results[m].values()))["slm"] for m in ("zero_shot", "standalone", "fedcollm")}
    for scores in slm.values():
        assert len(scores["item_nll"]) == 9
        assert scores["loss"] == pytest.approx(sum(scores["item_nll"]) / sum(scores["item_tokens"]))
    table = (out / "table1.md").read_text()
    block = table.split("## SLM (client model), loss (nats per answer token, lower is better)")[1].split("##")[0]
    assert f"| FedCoLLM | {slm['fedcollm']['loss']:.3f} |" in block
    assert f"| Standalone (mean of clients) | {slm['standalone']['loss']:.3f} |" in block
    iv = paired_bootstrap([slm["fedcollm"]["item_nll"]], [slm["standalone"]["item_nll"]],
                          sizes=slm["fedcollm"]["item_tokens"])
    assert iv.value == pytest.approx(slm["fedcollm"]["loss"] - slm["standalone"]["loss"])
    row = next(line for line in table.splitlines() if "| SLM: FedCoLLM − Standalone" in line)
    assert f"| loss | SLM: FedCoLLM − Standalone (mean of clients) | s0: {iv.value:+.3f} [" in row
    assert "FedCoLLM / centralized" not in table and "## SLM (client model), acc" not in table
    assert (out / "table1.png").is_file()


def test_an_aux_size_study_refuses_a_completion_evaluation_set_before_it_runs(smoke_overrides, tmp_path, capsys):
    from fedcollm.cli import main  # noqa: PLC0415

    evals = _instructions(tmp_path / "eval.jsonl", 4, "Tell me the colour of the {}.\n", 1)
    train = _instructions(tmp_path / "train.jsonl", 60, "What colour is the {}?\n", 0)
    assert main(_experiment_argv(smoke_overrides, tmp_path / "exp", evals, train, "--aux-fractions", "0.1,0.2")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "is prompt-completion data; --aux-fractions compares accuracies, so it needs a multiple-choice evaluation "
        "set (Table 1, without it, compares the methods by loss)")
    assert not (tmp_path / "exp").exists()


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
    records = read_records(train)
    with pytest.raises(FedCoLLMError, match=r"data.partition = 'dirichlet': 48 of 48 records .* its label \(the "
                                            r"answer's position\) needs multiple-choice .*; use 'iid' or 'topic'"):
        split_indices(records, 4, "dirichlet", seed=0)
    topic = split_indices(records, 4, "topic", seed=0, topics=4)  # the words of prompt and completion
    assert sorted(i for part in [topic.aux, *topic.clients] for i in part) == list(range(len(records)))


def test_an_evaluation_item_whose_prompt_a_completion_trained_on_counts_as_a_training_item():
    item = MCQRecord("e", "What is 2+2?", ("3", "4"), 1)
    assert shared_items([item], [Completion("t", "Question: What is 2+2?\nAnswer:", " 4")]) == 1
    assert shared_items([item], [Completion("t", "Question: What is 3+3?\nAnswer:", " 6")]) == 0


def test_a_run_on_instruction_data_reports_its_loss_as_fedcollm_eval_scores_it(tmp_path):
    """A Flower simulation trains on prompt-completion data and scores a prompt-completion set
    every round; `fedcollm eval` on the saved SLM adapter gives the run's last loss."""
    train = _instructions(tmp_path / "train.jsonl", 60, "What colour is the {}? Answer in a sentence.\n", 0)
    evals = _instructions(tmp_path / "eval.jsonl", 9, "Tell me the colour of the {}.\n", 1)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fedcollm.cli", "run", "--preset", "smoke", "--out", str(out),
                           "--set", 'data.dataset="mcq_jsonl"', "--set", f'data.train_file="{train}"',
                           "--set", f'data.eval_file="{evals}"', "--set", "data.num_clients=3",
                           "--set", "run.progress=false"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "slm" in r]
    assert [r["round"] for r in scored] == [0, 1, 2]
    for r in scored:
        for model in ("slm", "llm"):
            assert set(r[model]) == {"loss", "ppl", "n"} and r[model]["n"] == 9
            assert r[model]["ppl"] == pytest.approx(math.exp(r[model]["loss"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slm"] == {k: scored[-1]["slm"][k] for k in ("loss", "ppl")}
    report = (out / "report.md").read_text()
    assert "| round | SLM loss | SLM ppl | LLM loss | LLM ppl | client loss |" in report
    assert f"Evaluation: 9 items of {evals}, the completions' mean negative log-likelihood per token (nats) and its " \
        "perplexity, lower is better." in report
    assert (out / "loss.png").stat().st_size > 0 and not (out / "accuracy.png").exists()
    assert f"SLM loss {scored[-1]['slm']['loss']:.3f}" in proc.stdout
    got = subprocess.run([sys.executable, "-m", "fedcollm.cli", "eval", "--model", "tiny-random", "--prune", "1,1",
                          "--adapter", str(out / "adapters" / "slm"), "--file", str(evals)],
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    line = json.loads(got.stdout.strip().splitlines()[-1])
    assert line["n"] == 9 and line["loss"] == pytest.approx(summary["slm"]["loss"], rel=1e-5)
    assert line["split"] is None  # a file is scored whole, not a split of it
