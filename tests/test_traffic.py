"""`fedcollm experiment --traffic-grid`: the grid is parsed and validated, each point's bytes come
from its own run, and the choice is the cheapest point within a point of the best."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedcollm.errors import FedCoLLMError
from fedcollm.experiment.traffic import Point, choose, parse_grid


def test_grid_is_every_combination_with_paper_defaults_for_unnamed_axes():
    points = parse_grid("modules=qv,all; transport=fp32,int8")
    assert points == [Point("qv", 8, "fp32"), Point("qv", 8, "int8"), Point("all", 8, "fp32"), Point("all", 8, "int8")]
    assert Point("q_proj+o_proj", 4, "fp16").target_modules() == ("q_proj", "o_proj")
    union = parse_grid("modules=all,qv;transport=fp32,int8 | modules=qv;r=4,8")  # a sparse sweep, in order
    assert union == [Point("all", 8, "fp32"), Point("all", 8, "int8"), Point("qv", 8, "fp32"), Point("qv", 8, "int8"),
                     Point("qv", 4, "fp32")]
    assert parse_grid("transport=int2;a=train,frozen") == [Point("all", 8, "int2"), Point("all", 8, "int2", True)]
    assert Point("all", 8, "int2", True).label == "all r8 int2 A-frozen"
    assert parse_grid("transport=int4;secagg=off,on") == [Point("all", 8, "int4"), Point("all", 8, "int4", secure=True)]
    assert Point("all", 8, "int4", secure=True).label == "all r8 int4 SecAgg+"


@pytest.mark.parametrize("bad, message", [
    ("modules=qv;rank=4", "expected 'modules=…;r=…;transport=…;a=…;secagg=…'"),
    ("a=fixed", "a 'fixed' is not one of train, frozen"),
    ("secagg=yes", "secagg 'yes' is not one of off, on"),
    ("transport=bf16", "transport 'bf16' is not one of fp32, fp16, int8, int4, int2, int1"),
    ("r=4,eight", "r must be whole numbers"),
    ("r=0", "r must be ≥ 1"),
])
def test_bad_grids_are_refused_with_the_offending_part(bad, message):
    with pytest.raises(FedCoLLMError, match=message):
        parse_grid(bad)


def test_a_point_applies_modules_rank_alpha_transport_and_a(smoke_cfg):
    cfg = Point("qkvo", 16, "int8").apply(smoke_cfg)
    assert cfg.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.federation.transport, cfg.lora.freeze_a) == (16, 32, "int8", False)
    assert Point("qkvo", 16, "int8", True).apply(smoke_cfg).lora.freeze_a
    assert not cfg.federation.secure_aggregation
    assert Point("all", 8, "int4", secure=True).apply(smoke_cfg).federation.secure_aggregation


def _result(slm: float, llm: float, up: int) -> dict:
    return {"slm": {"acc": slm}, "llm": {"acc": llm},
            "comm": {"bytes_up_per_client_round": up, "bytes_down_per_client_round": up,
                     "up_ratio_to_fp32_slm": up / 1e8, "down_ratio_to_fp32_slm": up / 1e8}}


def test_choice_is_the_cheapest_within_one_point_on_every_dataset():
    points = [Point("qv", 4, "int8"), Point("qv", 8, "int8"), Point("all", 8, "fp32"), Point("qv", 4, "fp16")]
    a, b, c, d = (p.label for p in points)
    results = {
        "ds1": {a: {"0": _result(0.50, 0.60, 10), "1": _result(0.50, 0.60, 10)},   # 2 points below the best
                b: {"0": _result(0.515, 0.605, 20), "1": _result(0.525, 0.605, 20)},  # within 1 point
                c: {"0": _result(0.53, 0.61, 400), "1": _result(0.53, 0.61, 400)},   # the best, dear
                d: {"0": _result(0.60, 0.70, 5)}},                                    # a seed missing
        "ds2": {a: {"0": _result(0.40, 0.50, 10), "1": _result(0.40, 0.50, 10)},
                b: {"0": _result(0.40, 0.50, 20), "1": _result(0.40, 0.50, 20)},
                c: {"0": _result(0.40, 0.50, 400), "1": _result(0.40, 0.50, 400)},
                d: {"0": _result(0.40, 0.50, 5), "1": _result(0.40, 0.50, 5)}},
    }
    choice = choose(results, points, [0, 1])
    assert choice["label"] == b and choice["within_tolerance"] == sorted([b, c])
    assert choice["complete_points"] == 3 and choice["bytes_up_per_client_round"] == 20
    assert choose({"ds1": {p.label: {} for p in points}}, points, [0])["label"] is None
    # a SecAgg+ point is reported, never chosen: the choice sets a plain run's default
    secure = Point("qv", 8, "int8", secure=True)
    with_secure = {ds: {**per_point, secure.label: per_point[b]} for ds, per_point in results.items()}
    assert choose(with_secure, [*points, secure], [0, 1])["label"] == b
    only = {ds: {secure.label: per_point[b]} for ds, per_point in results.items()}
    assert choose(only, [secure], [0, 1])["label"] is None
    # each point falls short on one dataset: no choice, and the reason says so
    split = {"ds1": {a: {"0": _result(0.50, 0.60, 10)}, c: {"0": _result(0.53, 0.60, 400)}},
             "ds2": {a: {"0": _result(0.53, 0.60, 10)}, c: {"0": _result(0.50, 0.60, 400)}}}
    none = choose(split, [points[0], points[2]], [0])
    assert none["label"] is None and "on every dataset" in none["why"]


def test_choice_goes_by_each_datasets_headline_metric():
    # The cheap point is 5 points below in acc but level in acc_norm: chosen on OpenBookQA
    # (headline acc_norm), not on ARC-Easy (acc).
    cheap, dear = Point("qv", 4, "int8"), Point("all", 8, "int8")

    def result(acc, acc_norm, up):
        return {**_result(acc, acc, up), "slm": {"acc": acc, "acc_norm": acc_norm}, "llm": {"acc": acc, "acc_norm": acc_norm}}

    per_point = {cheap.label: {"0": result(0.25, 0.40, 10)}, dear.label: {"0": result(0.30, 0.40, 400)}}
    assert choose({"openbookqa": per_point}, [cheap, dear], [0])["label"] == cheap.label
    assert choose({"arc_easy": per_point}, [cheap, dear], [0])["label"] == dear.label


def test_sweep_runs_each_point_and_measures_its_bytes(tmp_path, mcq_files):
    """Five points through the real CLI (smoke models, 1 round): fewer modules, int8 and a frozen A
    (B alone travels, the clients' draws of A in their own processes matching the server's) send
    fewer bytes, each point's bytes are what its own run counted on the wire, and the outputs exist."""
    train, evals = mcq_files
    out = tmp_path / "traffic"
    cmd = [sys.executable, "-m", "fedcollm.cli", "experiment", "--preset", "smoke", "--out", str(out), "--seeds", "0",
           "--set", 'data.dataset="mcq_jsonl"', "--set", f'data.train_file="{train}"',
           "--set", f'data.eval_file="{evals}"', "--set", "federation.rounds=1", "--set", "run.progress=false",
           "--traffic-grid", "modules=qv,all;r=2;transport=fp32,int8 | modules=all;r=2;a=frozen"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "traffic.json").read_text())
    per_point = doc["results"]["mcq_jsonl"]
    up = {label: r["0"]["comm"]["bytes_up_per_client_round"] for label, r in per_point.items()}
    assert up["qv r2 int8"] < up["qv r2 fp32"] < up["all r2 fp32"] and up["all r2 int8"] < up["all r2 fp32"]
    assert 0.4 < up["all r2 fp32 A-frozen"] / up["all r2 fp32"] < 0.6  # B is about half the adapter
    for label, r in per_point.items():  # the run's own wire count, not a formula of this module
        rows = [json.loads(line) for line in open(f"{r['0']['run_dir']}/metrics.jsonl")]
        assert rows[-1]["bytes_up_per_client"] == r["0"]["comm"]["bytes_up_per_client_round"], label
    assert doc["choice"]["label"] in up
    assert (out / "pareto.png").stat().st_size > 0
    assert "## Choice" in (out / "traffic.md").read_text()
