"""`fedcollm experiment`: every method lands in the tables, standalone is private, centralized pools
exactly the split, the cache makes reruns free, and mean ± std is formatted right."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from fedcollm import components
from fedcollm.data.encode import encode_for_training
from fedcollm.config import load_config
from fedcollm.experiment import methods
from fedcollm.experiment.methods import LABELS, METHODS
from fedcollm.experiment.tables import aux_size_table, claims, fmt_mean_std, items_scored


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, mcq_files):
    """Every method, 1 round on the smoke models (a real run of the CLI, 2 jobs at a time, each in
    its own process); then a rerun, one job at a time in-process, that adds a seed to the
    in-process methods. Returns the first run's results and tables and both logs."""
    out = tmp_path_factory.mktemp("experiment")
    train, evals = mcq_files
    cmd = [sys.executable, "-m", "fedcollm.cli", "experiment", "--preset", "smoke", "--out", str(out),
           "--set", 'data.dataset="mcq_jsonl"', "--set", f'data.train_file="{train}"',
           "--set", f'data.eval_file="{evals}"', "--set", "federation.rounds=1", "--set", "run.progress=false"]
    first = subprocess.run([*cmd, "--seeds", "0", "--jobs", "2"], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-3000:]  # the jobs' own output: stdout
    doc = json.loads((out / "results.json").read_text())
    table = (out / "table1.md").read_text() + (out / "table2.md").read_text()
    again = subprocess.run([*cmd, "--seeds", "0,1", "--methods", "zero_shot,standalone,centralized"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    return out, doc, table, first, again


def test_every_method_lands_in_the_tables(experiment):
    out, doc, table, _, _ = experiment
    res = doc["results"]["mcq_jsonl"]
    assert set(res) == set(METHODS)
    assert set(res["zero_shot"]) == {"all"}  # seed-independent
    assert all(set(res[m]) == {"0"} for m in METHODS if m != "zero_shot")
    slm_methods = {"zero_shot", "standalone", "fedavg", "fedcollm", "kd_llm_to_slm", "kd_slm_to_llm", "lambda0"}
    llm_methods = {"zero_shot", "fedcollm", "kd_llm_to_slm", "kd_slm_to_llm", "lambda0", "centralized"}
    first_result = {m: next(iter(res[m].values())) for m in METHODS}
    assert {m for m, r in first_result.items() if r["slm"]} == slm_methods
    assert {m for m, r in first_result.items() if r["llm"]} == llm_methods
    slm_block = table.split("## SLM (client model), acc")[1].split("##")[0]
    llm_block = table.split("## LLM (server model), acc")[1].split("##")[0]
    for m in slm_methods:
        assert f"| {LABELS[m]} |" in slm_block, m
    for m in llm_methods:
        assert f"| {LABELS[m]} |" in llm_block, m
    assert f"| {LABELS['fedcollm']} | {fmt_mean_std([res['fedcollm']['0']['slm']['acc']])} |" in slm_block
    assert doc["meta"]["git_commit"] and list(doc["meta"]["result_versions"]) == [doc["meta"]["code_version"]]
    # Per-item scores travel with every result (the paired tests need them).
    assert len(res["fedcollm"]["0"]["slm"]["correct"]) == len(res["fedcollm"]["0"]["llm"]["correct"]) == 12
    assert "Paired bootstrap over the test items" in table
    assert "Items scored (n, the same for every method and seed): mcq_jsonl 12\n" in table
    assert "ratio bytes up / full SLM fp32" in table
    assert (out / "table1.png").stat().st_size > 0


def test_rerun_computes_only_what_is_missing(experiment):
    out, _, _, first, again = experiment
    assert first.stdout.count(": running") == len(METHODS)
    # Two jobs at a time: each line a job's process printed says which job it is from.
    clients = [line for line in first.stdout.splitlines() if "[fedcollm] client " in line]
    assert clients and all(re.match(r"\[experiment\] \(\d/8\) mcq_jsonl (fedavg|fedcollm|kd_\w+|lambda0) seed 0 \| ",
                                    line) for line in clients), clients[:3]
    # zero-shot and seed 0 come from the cache; only seed 1 of the two trained methods runs.
    assert again.stdout.count(": cached") == 3 and again.stdout.count(": running") == 2
    res = json.loads((out / "results.json").read_text())["results"]["mcq_jsonl"]
    accs = [res["standalone"][s]["slm"]["acc"] for s in ("0", "1")]
    table = (out / "table1.md").read_text()
    assert f"| {LABELS['standalone']} | {fmt_mean_std(accs)} |" in table  # mean ± std of 2 seeds
    assert " ± " in fmt_mean_std(accs)


def test_jobs_in_their_own_processes_give_what_the_process_itself_computes(experiment, smoke_cfg, mcq_files):
    """--jobs runs each job in a child process: the same adapters, bit for bit, as running the
    method in this process."""
    _, doc, _, _, _ = experiment
    res = doc["results"]["mcq_jsonl"]
    train, evals = mcq_files
    cfg = load_config(preset="smoke", overrides=[
        'data.dataset="mcq_jsonl"', f'data.train_file="{train}"', f'data.eval_file="{evals}"',
        "federation.rounds=1", "run.progress=false"])
    here = methods.standalone(cfg, None)
    assert [c["adapter_sha256"] for c in here["clients"]] == \
        [c["adapter_sha256"] for c in res["standalone"]["0"]["clients"]]
    assert methods.centralized(cfg, None)["adapter_sha256"] == res["centralized"]["0"]["adapter_sha256"]


def test_standalone_uses_no_other_clients_data(smoke_cfg, monkeypatch):
    """Poison clients 1.. : client 0's standalone adapter and score must not change."""
    cfg = dataclasses.replace(smoke_cfg, federation=dataclasses.replace(smoke_cfg.federation, rounds=1))
    clean = methods.standalone(cfg, None)["clients"]
    train, _ = components.train_split(cfg)
    garbage = encode_for_training(components.tokenizer(cfg), [dataclasses.replace(
        train[0], question="poison " * 20, answer=(train[0].answer + 1) % 4)] * 12, cfg.data.max_length)
    honest = components.client_examples
    monkeypatch.setattr(components, "client_examples", lambda c, k: honest(c, k) if k == 0 else garbage)
    poisoned = methods.standalone(cfg, None)["clients"]
    assert poisoned[0] == clean[0]  # same adapter bits, same scores
    # ...while the poison did change the clients that got it.
    assert all(p["adapter_sha256"] != c["adapter_sha256"] for p, c in zip(poisoned[1:], clean[1:]))


def test_centralized_sees_exactly_the_union_of_parts(smoke_cfg):
    train, split = components.train_split(smoke_cfg)
    union = sorted([*split.aux, *(i for part in split.clients for i in part)])
    assert len(union) == len(set(union)) == smoke_cfg.data.max_train_examples  # disjoint, all of it
    pooled = methods.centralized_examples(smoke_cfg)
    expected = encode_for_training(components.tokenizer(smoke_cfg), [train[i] for i in union],
                                   smoke_cfg.data.max_length)
    assert sorted(e.ids for e in pooled) == sorted(e.ids for e in expected)
    result = methods.centralized(smoke_cfg, None)
    bs, epochs = smoke_cfg.client.batch_size, smoke_cfg.federation.rounds * smoke_cfg.client.local_epochs
    assert result["examples"] == len(union)
    assert result["steps"] == epochs * -(-len(union) // bs)
    assert result["slm"] is None and 0 <= result["llm"]["acc"] <= 1


@pytest.mark.parametrize("values, text", [
    ([0.50, 0.52, 0.54], "52.0 ± 2.0"),
    ([0.4125], "41.2"),  # one value (zero-shot): no ±
    ([0.3, 0.3], "30.0 ± 0.0"),
    ([], "–"),
])
def test_mean_std_format(values, text):
    assert fmt_mean_std(values) == text


def test_the_table_counts_the_items_scored_and_refuses_results_scored_on_different_ones():
    def r(n_slm, n_llm=None):
        return {"slm": {"acc": 0.5, "correct": [1] * n_slm}, "llm": n_llm and {"acc": 0.5, "correct": [0] * n_llm}}

    assert items_scored("d", {"zero_shot": {"all": r(2376, 2376)}, "standalone": {"0": r(2376)}}) == "2,376"
    assert items_scored("d", {"fedcollm": {"0": {"slm": {"acc": 0.5}, "llm": None}}}) == "–"  # none kept
    with pytest.raises(ValueError, match="d: results scored on different numbers of items: \\[500, 2376\\]"):
        items_scored("d", {"zero_shot": {"all": r(2376, 2376)}, "fedcollm": {"0": r(500, 500)}})


def test_the_aux_size_table_gives_each_share_and_its_difference_from_the_papers_20_percent():
    """Mean ± std per share, then each other share against 20% by the paired bootstrap: a share
    that gets every item right where 20% gets half is +50 points, significantly; one that scores
    the same items as 20% is +0.0 and not significant; a share with no LLM items says so."""
    half = [0] * 100 + [1] * 100

    def r(slm, llm, aux):
        return {"slm": {"acc": sum(slm) / 200, "acc_norm": 0.5, "correct": slm},
                "llm": llm and {"acc": sum(llm) / 200, "acc_norm": 0.5, "correct": llm}, "aux_examples": aux}

    results = {"0.05": {"fedcollm": {"0": r(half, None, 112), "1": r(half, None, 112)}},
               "0.2": {"fedcollm": {"0": r(half, half, 450), "1": r(half, half, 450)}},
               "0.4": {"fedcollm": {"0": r([1] * 200, half, 900), "1": r([1] * 200, half, 900)}}}
    meta = {"dataset": "arc_easy", "fractions": [0.05, 0.2, 0.4], "methods": ["fedcollm"], "seeds": [0, 1],
            "command": "fedcollm experiment --aux-fractions 0.05,0.2,0.4", "code_version": "v", "git_commit": "c" * 40,
            "result_versions": {"v": 6},
            "config": {"data": {"num_clients": 4, "eval_examples": 0, "eval_split": "test"}}}
    table = aux_size_table(results, meta)
    assert "| 40% | 900 | FedCoLLM | 100.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 0.0 |" in table
    against = table.split("## Against the paper's 20%")[1]
    row = re.search(r"\| 40% \| FedCoLLM \| \+50\.0 \[\+([\d.]+), \+([\d.]+)\] \(2 seeds\) \| "
                    r"\+0\.0 \[\+0\.0, \+0\.0\] \(2 seeds\), n\.s\. \|", against)
    assert row and 40 < float(row[1]) < 50 < float(row[2]) < 60, against  # half the items flip: ±~7 points
    assert "| 5% | FedCoLLM | +0.0 [+0.0, +0.0] (2 seeds), n.s. | – |" in against
    del meta["fractions"][1]  # without the paper's share there is nothing to compare against
    assert "Against the paper's" not in aux_size_table(results, meta)


def test_claims_are_computed_from_the_numbers():
    def r(slm=None, llm=None):
        return {"slm": slm and {"acc": slm}, "llm": llm and {"acc": llm}}

    results = {"d": {"fedcollm": {"0": r(0.75, 0.5), "1": r(0.25, 0.6)},
                     "standalone": {"0": r(0.5), "1": r(0.5)},
                     "centralized": {"0": r(llm=0.5), "1": r(llm=0.6)}}}
    lines = claims(results, ["d"])
    assert "| d | acc | SLM: FedCoLLM − Standalone (mean of clients) | – | – | no per-item scores kept" in lines[2]
    assert ("- d: SLM acc FedCoLLM − Standalone (mean of clients) = 0.0 ± 35.4 points over seeds "
            "(FedCoLLM better on 1/2 seeds).") in lines
    assert "- d: LLM acc FedCoLLM / centralized = 100.0 ± 0.0% over seeds (paper: 97–99%)." in lines


def _scored(correct: list[float]) -> dict:
    return {"acc": sum(correct) / len(correct), "correct": correct}


def test_claims_carry_a_paired_bootstrap_verdict():
    rng = random.Random(0)
    n = 400
    base = [float(rng.random() < 0.5) for _ in range(n)]
    better = [1.0 if rng.random() < 0.3 else x for x in base]  # right on ~15% more items
    results = {"d": {
        "fedcollm": {s: {"slm": _scored(better), "llm": _scored(base)} for s in ("0", "1")},
        "standalone": {s: {"slm": _scored(base), "llm": None} for s in ("0", "1")},
        "fedavg": {s: {"slm": _scored(better), "llm": None} for s in ("0", "1")},
        "centralized": {s: {"slm": None, "llm": _scored(better)} for s in ("0", "1")}}}
    rows = {line.split(" | ")[2]: line for line in claims(results, ["d"]) if line.startswith("| d |")}
    assert rows["SLM: FedCoLLM − Standalone (mean of clients)"].endswith("| holds: significantly better |")
    assert "s0: +" in rows["SLM: FedCoLLM − Standalone (mean of clients)"]
    assert rows["SLM: FedCoLLM − FedAvg (clients only)"].endswith("| not significant (the interval covers 0) |")
    assert rows["LLM: FedCoLLM − centralized"].endswith("| does not hold: significantly worse |")
    assert rows["LLM: FedCoLLM / centralized (paper: 97–99%)"].endswith("| does not hold: < 97% at 95% |")
    assert "(2 seeds) |" in rows["SLM: FedCoLLM − FedAvg (clients only)"]

    # A third seed whose FedAvg result kept its accuracy but not its items: pooled over 2, said.
    for method in ("fedcollm", "standalone", "centralized"):
        results["d"][method]["2"] = results["d"][method]["0"]
    results["d"]["fedavg"]["2"] = {"slm": {"acc": 0.5}, "llm": None}
    rows = {line.split(" | ")[2]: line for line in claims(results, ["d"]) if line.startswith("| d |")}
    assert "(2 seeds; 1 more without per-item scores) |" in rows["SLM: FedCoLLM − FedAvg (clients only)"]
    assert "(3 seeds) |" in rows["SLM: FedCoLLM − Standalone (mean of clients)"]


def test_claims_go_by_each_datasets_headline_metric():
    # The same per-item scores under two datasets: FedCoLLM's SLM is better in acc_norm, worse in
    # acc. OpenBookQA's claims go by acc_norm (its right answers tend to be the longest choice),
    # a dataset of one's own by acc.
    rng = random.Random(1)
    n = 400
    base = [float(rng.random() < 0.5) for _ in range(n)]
    better = [1.0 if rng.random() < 0.3 else x for x in base]
    worse = [0.0 if rng.random() < 0.3 else x for x in base]

    def scored(acc_items, norm_items):
        return {"acc": sum(acc_items) / n, "correct": acc_items, "acc_norm": sum(norm_items) / n, "correct_norm": norm_items}

    per_dataset = {"fedcollm": {"0": {"slm": scored(worse, better), "llm": None}},
                   "standalone": {"0": {"slm": scored(base, base), "llm": None}}}
    lines = claims({"openbookqa": per_dataset, "mine": per_dataset}, ["openbookqa", "mine"])
    row = {line.split(" | ")[0][2:]: line for line in lines if " | SLM: FedCoLLM − Standalone" in line}
    assert row["openbookqa"].startswith("| openbookqa | acc_norm |")
    assert row["openbookqa"].endswith("| holds: significantly better |")
    assert row["mine"].startswith("| mine | acc |") and row["mine"].endswith("| does not hold: significantly worse |")
    assert any(x.startswith("- openbookqa: SLM acc_norm FedCoLLM − Standalone") and "better on 1/1" in x for x in lines)


def test_paired_bootstrap_intervals():
    from fedcollm.experiment.significance import paired_bootstrap  # noqa: PLC0415

    all_right, all_wrong = [[1.0] * 50], [[0.0] * 50]
    iv = paired_bootstrap(all_right, all_wrong)
    assert (iv.value, iv.low, iv.high, iv.significant) == (1.0, 1.0, 1.0, True)
    same = paired_bootstrap([[1.0, 0.0] * 25], [[1.0, 0.0] * 25])
    assert (same.value, same.low, same.high, same.significant) == (0.0, 0.0, 0.0, False)
    # One item in 50 differs: a +2-point difference whose interval reaches 0.
    one = paired_bootstrap([[1.0] + [0.0] * 49], [[0.0] * 50])
    assert one.value == pytest.approx(0.02) and one.low == 0.0 and not one.significant
    ratio = paired_bootstrap([[1.0, 1.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]], "ratio")
    assert ratio.value == pytest.approx(0.5) and ratio.reference == 1.0
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap([[1.0, 0.0]], [[1.0]])



def test_paired_bootstrap_of_a_loss_is_a_ratio_of_sums():
    """Two items of 1 and 3 answer tokens, summed losses 2, 4 (a) and 1, 2 (b): the set's losses are
    6/4 and 3/4, a difference of 0.75; a resample of item 1 twice gives (8 − 4)/6, of item 0 twice
    (4 − 2)/2: the 2.5th and 97.5th percentiles."""
    from fedcollm.experiment.significance import paired_bootstrap  # noqa: PLC0415

    iv = paired_bootstrap([[2.0, 4.0]], [[1.0, 2.0]], sizes=[1, 3])
    assert iv.value == pytest.approx(0.75) and iv.low == pytest.approx(2 / 3) and iv.high == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one per item"):
        paired_bootstrap([[2.0, 4.0]], [[1.0, 2.0]], sizes=[1])


def _lossed(nll: list[float], tokens: list[int]) -> dict:
    loss = sum(nll) / sum(tokens)
    return {"loss": loss, "ppl": math.exp(loss), "item_nll": nll, "item_tokens": tokens}


def test_claims_on_losses_count_lower_as_better_and_leave_out_the_share_of_centralized():
    rng = random.Random(0)
    tokens = [rng.randint(3, 12) for _ in range(300)]
    base = [t * rng.uniform(1.5, 2.5) for t in tokens]
    lower = [x * 0.8 for x in base]  # 20% less loss on every item
    results = {"d": {
        "fedcollm": {s: {"slm": _lossed(lower, tokens), "llm": _lossed(base, tokens)} for s in ("0", "1")},
        "standalone": {s: {"slm": _lossed(base, tokens), "llm": None} for s in ("0", "1")},
        "centralized": {s: {"slm": None, "llm": _lossed(lower, tokens)} for s in ("0", "1")}}}
    lines = claims(results, ["d"])
    rows = {line.split(" | ")[2]: line for line in lines if line.startswith("| d |")}
    assert set(rows) == {"SLM: FedCoLLM − Standalone (mean of clients)", "LLM: FedCoLLM − centralized"}
    want = -0.2 * sum(base) / sum(tokens)
    slm = rows["SLM: FedCoLLM − Standalone (mean of clients)"]
    assert slm.startswith(f"| d | loss | SLM: FedCoLLM − Standalone (mean of clients) | s0: {want:+.3f} [")
    assert slm.endswith("| holds: significantly better |")
    assert rows["LLM: FedCoLLM − centralized"].endswith("| does not hold: significantly worse |")
    assert (f"- d: SLM loss FedCoLLM − Standalone (mean of clients) = {want:.3f} ± 0.000 over seeds "
            "(FedCoLLM better on 2/2 seeds).") in lines
    assert not any("centralized =" in line for line in lines)

# --- one table, one code version ---------------------------------------------------------------

def _fake_method(acc: float, workdirs: list | None = None):
    def run(cfg, workdir):
        if workdirs is not None:
            workdirs.append(workdir)
        return {"slm": {"acc": acc, "acc_norm": acc, "n": 1}, "llm": None}
    return run


def test_results_of_other_code_are_recomputed_or_refused(smoke_cfg, tmp_path, monkeypatch, capsys):
    from fedcollm.errors import FedCoLLMError  # noqa: PLC0415
    from fedcollm.experiment import runner  # noqa: PLC0415

    old_dirs, new_dirs = [], []
    monkeypatch.setitem(runner.METHODS, "standalone", _fake_method(0.5, old_dirs))
    monkeypatch.setattr(runner, "code_version", lambda: "old")
    runner.run_experiment(smoke_cfg, ["mcq_jsonl"], [0, 1], ["standalone"], tmp_path, "cmd")
    done = [line for line in capsys.readouterr().out.splitlines() if ": done in" in line]  # the log's progress
    assert [re.sub(r"\d+ s", "T", line.rsplit("(", 1)[1]) for line in done] == [
        "1 of 2 jobs to compute done, T, ~T left)", "2 of 2 jobs to compute done, T)"]
    # The code changes; seed 1 is computed by the new code, seed 0 kept from the old.
    monkeypatch.setattr(runner, "code_version", lambda: "new")
    monkeypatch.setitem(runner.METHODS, "standalone", _fake_method(0.75, new_dirs))
    cache = tmp_path / "cache" / "mcq_jsonl" / "standalone"
    next(cache.glob("seed1-*-old.json")).unlink()
    runner.run_experiment(smoke_cfg, ["mcq_jsonl"], [1], ["standalone"], tmp_path, "cmd")
    with pytest.raises(FedCoLLMError) as err:  # the tables would mix old and new
        runner.run_experiment(smoke_cfg, ["mcq_jsonl"], [0, 1], ["standalone"], tmp_path, "cmd", compute=False)
    assert str(err.value).startswith("experiment: the cached results come from 2 code versions (")
    assert "--allow-mixed-versions" in str(err.value) and "\n" not in str(err.value)
    doc = runner.run_experiment(smoke_cfg, ["mcq_jsonl"], [0, 1], ["standalone"], tmp_path, "cmd",
                                compute=False, allow_mixed=True)
    assert doc["meta"]["result_versions"] == {"old": 1, "new": 1}
    assert "**Mixed code versions**" in (tmp_path / "table1.md").read_text()
    # Computing (not --report-only) recomputes the old result with the new code: one version.
    doc = runner.run_experiment(smoke_cfg, ["mcq_jsonl"], [0, 1], ["standalone"], tmp_path, "cmd")
    assert doc["meta"]["result_versions"] == {"new": 2}
    assert {r["slm"]["acc"] for r in doc["results"]["mcq_jsonl"]["standalone"].values()} == {0.75}
    assert "Mixed" not in (tmp_path / "table1.md").read_text()
    # ... each in a run folder of its own code: never resuming the old code's checkpoint there
    assert [d.name.rsplit("-", 1)[1] for d in old_dirs + new_dirs] == ["old"] * 2 + ["new"] * 2
    assert not set(old_dirs) & set(new_dirs)


def test_mixed_versions_use_the_last_computed_result_whatever_the_files_mtime(smoke_cfg, tmp_path, monkeypatch):
    """A checkout gives committed cache files one mtime (or any order): the result recorded as
    computed last is the one tabulated."""
    from fedcollm.experiment import runner  # noqa: PLC0415

    for code, acc in (("old", 0.5), ("new", 0.75)):
        monkeypatch.setattr(runner, "code_version", lambda code=code: code)
        monkeypatch.setitem(runner.METHODS, "standalone", _fake_method(acc))
        runner.run_experiment(smoke_cfg, ["mcq_jsonl"], [0], ["standalone"], tmp_path, "cmd")
    cache = tmp_path / "cache" / "mcq_jsonl" / "standalone"
    old, new = next(cache.glob("seed0-*-old.json")), next(cache.glob("seed0-*-new.json"))
    os.utime(old, (new.stat().st_mtime + 100,) * 2)  # the older result now looks newer on disk
    monkeypatch.setattr(runner, "code_version", lambda: "other")
    doc = runner.run_experiment(smoke_cfg, ["mcq_jsonl"], [0], ["standalone"], tmp_path, "cmd",
                                compute=False, allow_mixed=True)
    assert doc["results"]["mcq_jsonl"]["standalone"]["0"]["slm"]["acc"] == 0.75


def test_a_report_on_a_cpu_names_the_dtype_of_results_computed_on_a_gpu(smoke_cfg, tmp_path, monkeypatch, capsys):
    """model.dtype "auto" is bf16 on a GPU and fp32 on a CPU, two config digests: reporting here
    a table computed on a GPU finds none of it, and says how to report it."""
    from fedcollm.experiment import runner  # noqa: PLC0415

    monkeypatch.setitem(runner.METHODS, "standalone", _fake_method(0.5))
    assert smoke_cfg.model.dtype == "auto" and not smoke_cfg.on_cuda()
    on_gpu = dataclasses.replace(smoke_cfg, model=dataclasses.replace(smoke_cfg.model, dtype="bfloat16"))
    runner.run_experiment(on_gpu, ["mcq_jsonl"], [0], ["standalone"], tmp_path, "cmd")  # as a GPU digests it
    capsys.readouterr()
    doc = runner.run_experiment(smoke_cfg, ["mcq_jsonl"], [0], ["standalone"], tmp_path, "cmd", compute=False)
    line = capsys.readouterr().out.splitlines()[0]
    assert "not computed yet" in line and "add --set model.dtype='\"bfloat16\"'" in line
    assert doc["results"]["mcq_jsonl"]["standalone"] == {}
    doc = runner.run_experiment(on_gpu, ["mcq_jsonl"], [0], ["standalone"], tmp_path, "cmd", compute=False)
    assert doc["results"]["mcq_jsonl"]["standalone"]["0"]["slm"]["acc"] == 0.5
    # Seed 1, cached under neither digest: no hint.
    runner.run_experiment(smoke_cfg, ["mcq_jsonl"], [1], ["standalone"], tmp_path, "cmd", compute=False)
    assert "model.dtype" not in capsys.readouterr().out


def test_missing_seeds_are_counted_in_the_cell():
    from fedcollm.experiment.tables import _cell

    one_seed = {"0": {"slm": {"acc": 0.5}}}
    assert _cell(one_seed, "slm", "acc", 3, "fedcollm") == "50.0 (n=1)"  # 2 of 3 seeds missing
    assert _cell({"all": {"slm": {"acc": 0.5}}}, "slm", "acc", 3, "zero_shot") == "50.0"  # seed-independent
    assert _cell({}, "slm", "acc", 3, "fedcollm") == "–"


def test_compute_time_sums_each_datasets_results():
    from fedcollm.experiment.tables import compute_time

    results = {"a": {"zero_shot": {"all": {"seconds": 60.0}}, "fedcollm": {"0": {"seconds": 120.0}, "1": {}}},
               "b": {}}
    assert compute_time(results, ["a", "b"]) == ["- a: 3 min for 2 results"]
    results["a"]["fedcollm"]["1"] = {"seconds": 60.0, "continued": True}
    assert compute_time(results, ["a"]) == [
        "- a: 4 min for 3 results (1 of them continued where a try was cut short: that try's time is not in it)"]


def test_a_job_that_fails_beside_others_runs_again_alone(smoke_cfg, tmp_path, monkeypatch, capsys):
    from fedcollm.errors import FedCoLLMError  # noqa: PLC0415
    from fedcollm.experiment import runner  # noqa: PLC0415

    calls = []

    def compute_job(self, job, in_child, gpu=None):  # seed 1 fails the first time, like a job out of GPU memory
        calls.append(job.seed_key)
        if job.seed_key == "1" and calls.count("1") == 1:
            raise FedCoLLMError("experiment: job failed with exit code 1")
        return {"seed": job.seed_key}

    monkeypatch.setattr(runner.Cache, "compute_job", compute_job)
    jobs = [runner.Job(smoke_cfg, "standalone", str(s), f"job {s}", (s,)) for s in range(3)]
    results = runner.Cache(tmp_path, compute=True, allow_mixed=False).run(jobs, parallel=2)
    assert results == {(s,): {"seed": str(s)} for s in range(3)}
    assert sorted(calls) == ["0", "1", "1", "2"] and calls[-1] == "1"  # retried after the others
    assert "job 1: failed beside other jobs" in capsys.readouterr().out

    def always_fails(self, job, in_child, gpu=None):
        raise FedCoLLMError("experiment: job failed with exit code 1")

    monkeypatch.setattr(runner.Cache, "compute_job", always_fails)
    with pytest.raises(FedCoLLMError):  # alone too: a real failure, raised
        runner.Cache(tmp_path, compute=True, allow_mixed=False).run(jobs[:1], parallel=2)


def test_concurrent_jobs_spread_over_the_gpus_of_the_host(smoke_cfg, tmp_path, monkeypatch):
    """On a host with several GPUs, each concurrent job's process is shown one GPU, the least busy
    one, instead of every job starting on GPU 0. (The jobs here stand in for real ones: they
    record the GPU they were given and how many jobs shared it meanwhile.)"""
    import threading  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from fedcollm.experiment import runner  # noqa: PLC0415

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert runner.visible_gpus(smoke_cfg) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")  # the user's choice of GPUs is kept
    assert runner.visible_gpus(smoke_cfg) == ["3", "5"]
    pinned = dataclasses.replace(smoke_cfg, model=dataclasses.replace(smoke_cfg.model, device="cuda:1"))
    assert runner.visible_gpus(pinned) == []  # a device the user named: every job on it, as asked
    on_cpu = dataclasses.replace(smoke_cfg, model=dataclasses.replace(smoke_cfg.model, device="cpu"))
    assert runner.visible_gpus(on_cpu) == []

    given, sharing, lock, busy = [], [], threading.Lock(), {"3": 0, "5": 0}

    def compute_job(self, job, in_child, gpu=None):
        with lock:
            busy[gpu] += 1
            given.append(gpu)
            sharing.append(busy[gpu])
        time.sleep(0.05)
        with lock:
            busy[gpu] -= 1
        return {"seed": job.seed_key}

    monkeypatch.setattr(runner.Cache, "compute_job", compute_job)
    jobs = [runner.Job(smoke_cfg, "standalone", str(s), f"job {s}", (s,)) for s in range(6)]
    runner.Cache(tmp_path, compute=True, allow_mixed=False).run(jobs, parallel=4)
    assert len(given) == 6 and set(given) == {"3", "5"} and max(sharing) == 2  # 4 at a time: never more than 2 a GPU

    env = runner.child_env("5")
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with runner.GpuPool(runner.visible_gpus(smoke_cfg)).one() as gpu:  # one GPU: jobs see what the experiment sees
        assert gpu is None and "CUDA_VISIBLE_DEVICES" not in runner.child_env(gpu)


@pytest.mark.parametrize("method, saved", [("centralized", "centralized.pt"),
                                           ("standalone", "standalone-client0.pt")])
def test_a_job_killed_mid_training_continues_to_the_same_adapters(method, saved, smoke_cfg, tmp_path, monkeypatch,
                                                                  capfd):
    """A GPU lease can end in the middle of a long job. Killed once its first epoch is saved, the
    job run again continues from there (adapter, optimizer, RNG) and ends with the adapters of an
    uninterrupted run, bit for bit; its result says it was continued, and standalone also writes
    each finished client's result."""
    from fedcollm.errors import FedCoLLMError  # noqa: PLC0415
    from fedcollm.experiment import runner  # noqa: PLC0415

    cfg = dataclasses.replace(smoke_cfg, federation=dataclasses.replace(smoke_cfg.federation, rounds=2))
    cache, job = runner.Cache(tmp_path, compute=True, allow_mixed=False), runner.Job(cfg, method, "0", method, (method,))
    monkeypatch.setenv("FEDCOLLM_TEST_KILL_AT", "pass:1")
    with pytest.raises(FedCoLLMError, match=f"exit code {-signal.SIGKILL}"):
        cache.compute_job(job, in_child=True)
    (workdir,) = (tmp_path / "runs").glob(f"*/{method}/*/")
    assert [p.name for p in workdir.iterdir()] == [saved]
    monkeypatch.delenv("FEDCOLLM_TEST_KILL_AT")
    resumed = cache.compute_job(job, in_child=True)
    assert "continuing after epoch 1 of 2" in capfd.readouterr().out and resumed["continued"] is True
    whole = getattr(methods, method)(cfg, None)
    if method == "centralized":
        assert resumed["adapter_sha256"] == whole["adapter_sha256"] and resumed["llm"] == whole["llm"]
    else:
        assert resumed["clients"] == whole["clients"]
        assert sorted(p.name for p in workdir.glob("*.json")) == [
            f"standalone-client{k}.json" for k in range(cfg.data.num_clients)]


def test_standalone_does_not_train_again_the_clients_it_finished(smoke_cfg, tmp_path, monkeypatch):
    cfg = dataclasses.replace(smoke_cfg, federation=dataclasses.replace(smoke_cfg.federation, rounds=1))
    first = methods.standalone(cfg, tmp_path)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished client was trained again")

    monkeypatch.setattr(methods, "_sft", no_training)
    assert methods.standalone(cfg, tmp_path) == first


def test_the_experiments_progress_says_the_time_left_at_its_pace():
    from fedcollm.experiment.runner import _progress  # noqa: PLC0415

    assert _progress(14, 56, 720.0) == "14 of 56 jobs to compute done, 12 min, ~36 min left"
    assert _progress(1, 3, 30.0) == "1 of 3 jobs to compute done, 30 s, ~60 s left"
    assert _progress(3, 3, 95.0) == "3 of 3 jobs to compute done, 95 s"
