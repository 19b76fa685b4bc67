"""Loaders: the four datasets from ../shared/data, the generic form, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcollm.data.loaders import candidate_roots, eval_split_note, load_split, read_records
from fedcollm.errors import FedCoLLMError

SHARED = next((r for r in candidate_roots() if (r / "arc").is_dir()), None)
needs_shared = pytest.mark.skipif(SHARED is None, reason="../shared/data not present")


@needs_shared
@pytest.mark.parametrize("name,split,rows,n_choices", [
    ("arc_easy", "train", 2251, None), ("arc_easy", "test", 2376, None),
    ("arc_challenge", "validation", 299, None), ("arc_challenge", "test", 1172, None),
    ("openbookqa", "test", 500, 4),
    ("commonsense_qa", "test", 1221, 5),  # lm-eval evaluates CSQA on its dev split
])
def test_shared_datasets_load(name, split, rows, n_choices):
    recs = load_split(name, split)
    assert len(recs) == rows
    assert all(0 <= r.answer < len(r.choices) for r in recs)
    if n_choices:
        assert {len(r.choices) for r in recs} == {n_choices}


@needs_shared
def test_digit_labels_map_by_position():
    recs = read_records(SHARED / "arc" / "ARC-Easy-Train.jsonl")
    raw = [json.loads(line) for line in (SHARED / "arc" / "ARC-Easy-Train.jsonl").open()]
    digit = [(r, rec) for r, rec in zip(raw, recs) if r["answerKey"].isdigit()]
    assert digit, "expected some ARC rows labelled 1-4"
    for r, rec in digit:
        assert rec.answer == int(r["answerKey"]) - 1


def test_generic_form_with_letter_or_index(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"question": "2+2?", "choices": ["3", "4"], "answer": "B"}\n\n'
                 '{"id": "z", "question": "1+1?", "choices": ["2", "5"], "answer": 0}\n')
    recs = read_records(f)
    assert [(r.answer, r.choices) for r in recs] == [(1, ("3", "4")), (0, ("2", "5"))]
    assert recs[1].id == "z"


@pytest.mark.parametrize("line,message", [
    ('{"question": "q", "choices": ["a", "b"], "answer": 5}', "'answer' must be a choice index or letter, got 5"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', "'choices' must be a list of at least 2 strings"),
    ("{not json", "not valid JSON"),
    ('{"question": {"stem": "q", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "C"}',
     "answerKey 'C' is not one of the labels ['A']"),
    ('{"text": "q"}', "no 'question' (AI2 format object or generic string), 'prompt' (prompt-completion form) or 'messages'"),
    ('{"prompt": "q"}', "a prompt-completion record needs a 'prompt' string and a non-empty 'completion' string"),
    ('{"prompt": "q", "completion": "  "}', "non-empty 'completion' string"),
    ('{"prompt": 3, "completion": "a"}', "needs a 'prompt' string"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "ok?", "choices": ["a", "b"], "answer": 0}\n' + line + "\n")
    with pytest.raises(FedCoLLMError) as err:
        read_records(f)
    text = str(err.value)
    assert text.startswith(f"{f}:2: ") and message in text and "\n" not in text


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist reads the first row's keys only
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    return path


@needs_shared
def test_a_parquet_file_in_the_hubs_layout_reads_as_the_release_jsonl(tmp_path):
    """ai2_arc's rows as the hub stores them (question a string, choices {text, label}) give the
    records of the release file, digit labels included."""
    release = SHARED / "arc" / "ARC-Easy-Train.jsonl"
    rows = [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]}}
            for r in map(json.loads, release.open())]
    assert read_records(_parquet(tmp_path / "train.parquet", rows)) == read_records(release)


def test_parquet_rows_of_every_kind_read_as_their_json_lines(tmp_path):
    """One file, rows of several kinds: a column is None where a row lacks the field."""
    objs = [{"id": "m", "question": "2+2?", "choices": ["3", "4"], "answer": 1},
            {"id": "p", "prompt": "Say hi.\n", "completion": "Hi!"},
            {"id": "c", "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}]
    lines = tmp_path / "mixed.jsonl"
    lines.write_text("".join(json.dumps(o) + "\n" for o in objs))
    assert read_records(_parquet(tmp_path / "mixed.parquet", objs)) == read_records(lines)
    obqa = {"id": "o", "question_stem": "Sun is a", "answerKey": "B",  # openbookqa's hub layout
            "choices": {"text": ["moon", "star"], "label": ["A", "B"]}}
    (rec,) = read_records(_parquet(tmp_path / "obqa.parquet", [obqa]), "openbookqa")
    assert (rec.question, rec.choices, rec.answer, rec.style) == ("Sun is a", ("moon", "star"), 1, "openbookqa")


def test_a_malformed_parquet_row_or_file_is_named(tmp_path):
    f = _parquet(tmp_path / "bad.parquet", [{"question": "ok?", "choices": ["a", "b"], "answer": 0},
                                            {"question": "q", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(FedCoLLMError, match=rf"^{f}: row 2: 'answer' must be a choice index or letter, got 5$"):
        read_records(f)
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(FedCoLLMError, match=rf"^{junk}: not a readable Parquet file \("):
        read_records(junk)


def test_missing_dataset_names_every_place_tried(tmp_path, monkeypatch, capsys):
    import dataclasses  # noqa: PLC0415

    from fedcollm.data import loaders  # noqa: PLC0415

    # A split that no root holds (every real one is in ../shared/data now).
    spec = loaders.DATASETS["arc_challenge"]
    monkeypatch.setitem(loaders.DATASETS, "arc_challenge", dataclasses.replace(
        spec, files={**spec.files, "test": "arc/ARC-Challenge-Missing.jsonl"}))
    monkeypatch.setenv("FEDCOLLM_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FedCoLLMError) as err:
        load_split("arc_challenge", "test", str(tmp_path / "mine"))
    text = str(err.value)
    assert str(tmp_path / "mine" / "arc" / "ARC-Challenge-Missing.jsonl") in text
    assert str(tmp_path / "env" / "arc" / "ARC-Challenge-Missing.jsonl") in text
    assert "shared/data/arc/ARC-Challenge-Missing.jsonl" in text
    assert "hub allenai/ai2_arc" in text
    # data.path names no folder: said at once (a typo would read the next place's data unnoticed)
    assert f"data.path '{tmp_path / 'mine'}' is not a folder on this host" in capsys.readouterr().err


def test_commonsense_qa_hub_fallback_reads_the_labelled_split():
    from fedcollm.data.loaders import DATASETS  # noqa: PLC0415

    # Its hub test split has no answers: "test" means validation there, as lm-eval does.
    assert dict(DATASETS["commonsense_qa"].hub_splits)["test"] == "validation"
    assert dict(DATASETS["arc_easy"].hub_splits)["test"] == "test"


def test_reports_say_when_the_test_split_is_the_validation_split():
    """A CommonsenseQA report said "1221 items (test split)" for its validation file."""
    from fedcollm.report import report_markdown  # noqa: PLC0415

    assert "validation split" in eval_split_note("commonsense_qa", "test")
    assert eval_split_note("commonsense_qa", "validation") == ""
    assert eval_split_note("arc_easy", "test") == "" and eval_split_note("mcq_jsonl", "test") == ""
    from fedcollm.experiment.tables import split_words  # noqa: PLC0415 - table1, traffic and aux-size tables

    assert split_words("test", ["arc_easy", "commonsense_qa"]).startswith("test split (commonsense_qa: its validation")
    assert split_words("validation", ["commonsense_qa"]) == "validation split"
    comm = {"adapter_params": 1, "full_slm_params": 10, "full_slm_fp32_bytes": 40, "transport": "fp32",
            "bytes_up_per_client_round": 4, "bytes_down_per_client_round": 4,
            "up_ratio_to_fp32_slm": 0.1, "down_ratio_to_fp32_slm": 0.1}
    summary = {"dataset": "commonsense_qa", "eval_split": "test", "eval_examples": 1221, "comm": comm,
               "llm_model": "tiny-random", "slm_model": "tiny-random", "num_clients": 4, "wall_s": 1.0,
               "secure_aggregation": False, "privacy": False}
    assert "(test split; commonsense_qa: its validation split" in report_markdown(summary, [], "fedcollm run")


def test_an_evaluation_set_of_training_items_is_refused_and_a_few_are_named(smoke_cfg, tmp_path, capsys):
    import dataclasses  # noqa: PLC0415

    from fedcollm import components  # noqa: PLC0415

    train = smoke_cfg.data.train_file
    same = dataclasses.replace(smoke_cfg, data=dataclasses.replace(smoke_cfg.data, eval_file=train))
    with pytest.raises(FedCoLLMError, match=r"data: 16 of 16 evaluation items \(.*train.jsonl\) are training items"):
        components.server_data(same)
    # One training item among the held-out ones: scored, and said.
    lines = Path(smoke_cfg.data.eval_file).read_text().splitlines() + Path(train).read_text().splitlines()[:1]
    mixed = tmp_path / "eval_plus_one.jsonl"
    mixed.write_text("\n".join(lines) + "\n")
    one = dataclasses.replace(smoke_cfg, data=dataclasses.replace(smoke_cfg.data, eval_file=str(mixed)))
    assert len(components.server_data(one).evals) == 13
    assert f"1 of 13 evaluation items ({mixed}) are also training items" in capsys.readouterr().out
