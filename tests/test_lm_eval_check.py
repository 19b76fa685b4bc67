"""scripts/check_lm_eval.py: lm-evaluation-harness itself (its task YAML, its HFLM) scores the
same items as fedcollm's evaluator, choice by choice, on each dataset's prompt form; and the
check fails when fedcollm's prompt is not lm-eval's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_lm_eval.py"


def _script():
    spec = importlib.util.spec_from_file_location("check_lm_eval", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _release_rows(n: int, n_choices: int, digits: bool = False) -> list[str]:
    """Rows in the AI2 release layout: some digit labels, a stem with spaces around it, and choices of
    one to about forty characters (dividing by the length then changes which choice wins)."""
    rows = []
    for i in range(n):
        labels = [str(k + 1) if digits and i % 2 else chr(65 + k) for k in range(n_choices)]
        texts = [chr(97 + (i + k) % 26) * (1 + (i * k) % 2) if (i + k) % 2 else f"choice {k} of item {i}" +
                 " long" * ((i + k) % 5) for k in range(n_choices)]
        choices = [{"text": t, "label": label} for t, label in zip(texts, labels)]
        stem = f"  What is item {i}, asked {'again ' * (i % 4)}? " if i % 3 == 0 else f"Which one is item {i}?"
        rows.append(json.dumps({"id": f"q{i}", "question": {"stem": stem, "choices": choices},
                                "answerKey": labels[i % n_choices]}))
    return rows


@pytest.fixture
def data_root(tmp_path):
    files = {"arc/ARC-Easy-Test.jsonl": _release_rows(10, 4, digits=True),
             "openbookqa/test.jsonl": _release_rows(8, 4),
             "commonsenseqa/dev_rand_split.jsonl": _release_rows(8, 5)}
    for rel, rows in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("\n".join(rows) + "\n")
    return tmp_path


@pytest.mark.parametrize("data, split, n", [("arc_easy", "test", 10), ("openbookqa", "test", 8),
                                            ("commonsense_qa", "validation", 8)])
def test_lm_eval_scores_every_choice_as_fedcollm_does(data_root, tmp_path, data, split, n):
    out = tmp_path / "check.json"
    rc = _script().main(["--model", "tiny-random", "--data", data, "--split", split, "--data-path", str(data_root),
                         "--limit", "20", "--out", str(out)])
    got = json.loads(out.read_text())
    assert rc == 0, got
    assert got["n"] == n and got["choices_compared"] == n * (5 if data == "commonsense_qa" else 4)
    assert got["max_abs_loglik_diff"] < 1e-3
    assert got["fedcollm"] == got["lm_eval"]
    assert got["differ"] == ({"acc": []} if data == "commonsense_qa" else {"acc": [], "acc_norm": []})


def test_the_check_fails_when_fedcollm_prompts_otherwise(data_root, tmp_path, monkeypatch):
    from fedcollm.data import records  # noqa: PLC0415

    real = records.context
    monkeypatch.setattr(records, "context", lambda rec: real(rec).replace("Question:", "Q:"))
    import fedcollm.eval.mcq as mcq  # noqa: PLC0415 - it imported the name itself

    monkeypatch.setattr(mcq, "context", records.context)
    out = tmp_path / "check.json"
    assert _script().main(["--model", "tiny-random", "--data", "arc_easy", "--data-path", str(data_root),
                           "--out", str(out)]) == 1
    assert json.loads(out.read_text())["max_abs_loglik_diff"] > 1e-3
