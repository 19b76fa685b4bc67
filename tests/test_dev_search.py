"""`fedcollm experiment --dev-grid`: cells parsed right, every dataset scored on its dev split
(never on test), and the best cell chosen from the numbers."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedcollm.errors import FedCoLLMError
from fedcollm.experiment.dev_search import Cell, choose, dev_split, parse_dev_grid


def test_grid_cells_are_every_combination_with_tied_keys_set_together():
    cells = parse_dev_grid("client.lr+distill.lr=1e-3,3e-3; client.local_epochs=1,2")
    assert [c.overrides for c in cells] == [
        ("client.lr=1e-3", "distill.lr=1e-3", "client.local_epochs=1"),
        ("client.lr=1e-3", "distill.lr=1e-3", "client.local_epochs=2"),
        ("client.lr=3e-3", "distill.lr=3e-3", "client.local_epochs=1"),
        ("client.lr=3e-3", "distill.lr=3e-3", "client.local_epochs=2"),
    ]
    assert cells[0].label == "client.lr=1e-3 distill.lr=1e-3 client.local_epochs=1"


@pytest.mark.parametrize("text", ["", "client.lr", "client.lr=", "=1,2"])
def test_a_malformed_grid_is_refused(text):
    with pytest.raises(FedCoLLMError, match="--dev-grid"):
        parse_dev_grid(text)


def test_dev_split_is_never_the_split_scored_as_test():
    assert dev_split("arc_easy") == "validation" and dev_split("openbookqa") == "validation"
    # CommonsenseQA's validation split is its test split (lm-eval): hold items out of training.
    assert dev_split("commonsense_qa") == "train_holdout"
    assert dev_split("mcq_jsonl") == "train_holdout"  # your own files: no validation split known


def _fed(slm: float, llm: float) -> dict:
    return {"slm": {"acc": slm}, "llm": {"acc": llm}}


def test_choice_is_the_best_mean_score_over_datasets_among_complete_cells():
    # Cell a wins on d1 (0.60 vs 0.55 score) but loses on d2 (0.40 vs 0.50): b's mean over the
    # datasets is higher (0.525 vs 0.50). Cell c is best everywhere but misses seed 1: left out.
    results = {
        "d1": {"a": {"fedcollm": {"0": _fed(0.5, 0.7), "1": _fed(0.5, 0.7)}},
               "b": {"fedcollm": {"0": _fed(0.5, 0.6), "1": _fed(0.5, 0.6)}},
               "c": {"fedcollm": {"0": _fed(0.9, 0.9)}}},
        "d2": {"a": {"fedcollm": {"0": _fed(0.4, 0.4), "1": _fed(0.4, 0.4)}},
               "b": {"fedcollm": {"0": _fed(0.5, 0.5), "1": _fed(0.5, 0.5)}},
               "c": {"fedcollm": {"0": _fed(0.9, 0.9), "1": _fed(0.9, 0.9)}}},
    }
    choice = choose(results, ["a", "b", "c"], [0, 1])
    assert choice["label"] == "b" and choice["score"] == pytest.approx(0.525)
    assert choice["complete_cells"] == 2 and choice["per_dataset"] == {"d1": "a", "d2": "b"}
    assert choose(results, ["c"], [0, 1])["label"] is None


def test_choice_goes_by_each_datasets_headline_metric():
    # On OpenBookQA cell a is better in acc_norm and worse in acc: its headline metric, acc_norm, decides.
    def fed(acc, acc_norm):
        return {"slm": {"acc": acc, "acc_norm": acc_norm}, "llm": {"acc": acc, "acc_norm": acc_norm}}

    per_cell = {"a": {"fedcollm": {"0": fed(0.20, 0.40)}}, "b": {"fedcollm": {"0": fed(0.30, 0.30)}}}
    assert choose({"openbookqa": per_cell}, ["a", "b"], [0])["label"] == "a"
    assert choose({"arc_easy": per_cell}, ["a", "b"], [0])["label"] == "b"


def test_dev_search_through_the_cli_scores_each_cell_on_held_out_items(tmp_path, mcq_files):
    """Two cells on the smoke models (1 round, FedCoLLM only): each job ran on the dev split
    with its cell's values, the table lists both, and the choice is the better score."""
    train, evals = mcq_files
    out = tmp_path / "dev"
    cmd = [sys.executable, "-m", "fedcollm.cli", "experiment", "--preset", "smoke", "--out", str(out), "--seeds", "0",
           "--set", 'data.dataset="mcq_jsonl"', "--set", f'data.train_file="{train}"', "--set",
           f'data.eval_file="{evals}"', "--set", "federation.rounds=1", "--set", "run.progress=false",
           "--set", "data.holdout_examples=10", "--methods", "fedcollm",
           "--dev-grid", "client.lr+distill.lr=1e-4,3e-3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "dev.json").read_text())
    per_cell = doc["results"]["mcq_jsonl"]
    assert list(per_cell) == ["client.lr=1e-4 distill.lr=1e-4", "client.lr=3e-3 distill.lr=3e-3"]
    for label, per_method in per_cell.items():
        used = tomllib.loads((Path(per_method["fedcollm"]["0"]["run_dir"]) / "config.toml").read_text())
        lr = float(label.split()[0].split("=")[1])
        assert used["data"]["eval_split"] == "train_holdout"
        assert used["client"]["lr"] == used["distill"]["lr"] == lr
        assert len(per_method["fedcollm"]["0"]["slm"]["correct"]) == 10  # the held-out items, not the eval file's 12
    scores = {lab: (m["fedcollm"]["0"]["slm"]["acc"] + m["fedcollm"]["0"]["llm"]["acc"]) / 2 for lab, m in per_cell.items()}
    assert doc["choice"]["label"] == max(scores, key=scores.get)
    text = (out / "dev.md").read_text()
    assert all(lab in text for lab in per_cell) and "dev split: train_holdout" in text
    assert (out / "dev.png").stat().st_size > 0


def test_dev_grid_refuses_an_explicit_eval_split(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedcollm.cli", "experiment", "--preset", "smoke", "--out",
                           str(tmp_path), "--set", 'data.eval_split="test"', "--dev-grid", "client.lr=1e-3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "leave out --set data.eval_split" in proc.stderr
    assert Cell(("a=1",)).label == "a=1"
