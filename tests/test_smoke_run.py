"""End to end: `fedcollm run --preset smoke` runs a real Flower simulation and writes every output."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest
import torch
from peft import PeftModel

from fedcollm import components
from fedcollm.config import load_config


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, mcq_files):
    out = tmp_path_factory.mktemp("smoke") / "run"
    train, evals = mcq_files
    cmd = [sys.executable, "-m", "fedcollm.cli", "run", "--preset", "smoke", "--out", str(out),
           "--set", 'data.dataset="mcq_jsonl"', "--set", f'data.train_file="{train}"',
           "--set", f'data.eval_file="{evals}"', "--set", "data.num_clients=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_writes_every_output(smoke_run):
    out, proc = smoke_run
    for name in ("config.toml", "metrics.jsonl", "summary.json", "report.md", "accuracy.png",
                 "adapters/slm/adapter_config.json", "adapters/slm/adapter_model.safetensors",
                 "adapters/llm/adapter_config.json", "adapters/llm/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert f"{out}/report.md" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_ok"] == 3 and r["kd_steps"] > 0 for r in rows[1:])
    # The server's clock per round: the clients' part and the KD both fit inside the round.
    assert all(r["round_s"] >= r["fit_s"] + r["kd_s"] > 0 and r["fit_s"] > 0 for r in rows[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["dataset"] == "mcq_jsonl"
    assert summary["eval_examples"] == 12
    for model in ("slm", "llm"):
        assert set(summary[model]) == {"acc", "acc_norm"}
        assert summary[model] == {k: rows[-1][model][k] for k in ("acc", "acc_norm")}
    assert "| 2 |" in (out / "report.md").read_text()
    assert f"2: {rows[2]['round_s']:.0f} s (clients {rows[2]['fit_s']:.0f} s" in (out / "report.md").read_text()
    assert tomllib.loads((out / "config.toml").read_text())["data"]["num_clients"] == 3


def test_ratio_is_bytes_over_full_slm_size(smoke_run):
    out, _ = smoke_run
    comm = json.loads((out / "summary.json").read_text())["comm"]
    assert comm["up_ratio_to_fp32_slm"] == pytest.approx(comm["bytes_up_per_client_round"] / comm["full_slm_fp32_bytes"])
    assert comm["down_ratio_to_fp32_slm"] == pytest.approx(comm["bytes_down_per_client_round"] / comm["full_slm_fp32_bytes"])
    # Each way: the adapter's change in int4 (the default transport, "auto"), half a byte a
    # value, a scale per 64 values and a little framing; well under fp32's 4 bytes a parameter.
    assert comm["transport"] == "int4"
    for way in ("up", "down"):
        assert 0.5 * comm["adapter_params"] < comm[f"bytes_{way}_per_client_round"] < comm["adapter_params"]
    assert comm["full_slm_fp32_bytes"] == 4 * comm["full_slm_params"]


def test_saved_adapters_load_with_peft(smoke_run):
    out, _ = smoke_run
    cfg = load_config(out / "config.toml")
    ids = torch.tensor([[5, 6, 7, 8]])
    for name, base in (("slm", components.slm_base(cfg)), ("llm", components.llm_base(cfg))):
        model = PeftModel.from_pretrained(base, out / "adapters" / name)
        b = [v for k, v in model.state_dict().items() if "lora_B" in k]
        assert b and any(t.abs().sum() > 0 for t in b), f"{name} adapter was not trained"
        assert model(ids).logits.shape[-1] == base.config.vocab_size


@pytest.mark.parametrize("base", [["--model", "tiny-random", "--prune", "1,1"], []],
                         ids=["given", "from the run's config.toml"])
def test_eval_command_scores_the_saved_slm_like_the_run(smoke_run, mcq_files, base):
    out, _ = smoke_run
    _, evals = mcq_files
    proc = subprocess.run(
        [sys.executable, "-m", "fedcollm.cli", "eval", *base, "--adapter", str(out / "adapters" / "slm"),
         "--file", str(evals)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert got["n"] == 12
    assert got["acc"] == pytest.approx(summary["slm"]["acc"])
    assert got["acc_norm"] == pytest.approx(summary["slm"]["acc_norm"])


def _export(smoke_run, dest, *extra: str) -> subprocess.CompletedProcess:
    out, _ = smoke_run
    # --model and --prune left out: the run's config.toml names the SLM's base (tiny-random, pruned 1,1)
    return subprocess.run([sys.executable, "-m", "fedcollm.cli", "export",
                           "--adapter", str(out / "adapters" / "slm"), "--out", str(dest), *extra],
                          capture_output=True, text=True, timeout=300)


def test_export_merges_the_slm_adapter_into_a_folder_transformers_loads_alone(smoke_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    out, _ = smoke_run
    dest = tmp_path / "slm-merged"
    proc = _export(smoke_run, dest)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = load_config(out / "config.toml")
    adapted = PeftModel.from_pretrained(components.slm_base(cfg), out / "adapters" / "slm")
    merged = AutoModelForCausalLM.from_pretrained(dest)
    record = json.loads((dest / "fedcollm-export.json").read_text())
    assert merged.config.num_hidden_layers == record["layers"] == len(components.slm_base(cfg).model.layers)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        got = merged(ids).logits
        assert torch.allclose(got, adapted(ids).logits, atol=1e-4)
        with adapted.disable_adapter():  # the adapter is in the merged weights
            assert not torch.allclose(got, adapted(ids).logits, atol=1e-3)
    assert AutoTokenizer.from_pretrained(dest)("an apple")["input_ids"] == \
        components.tokenizer(cfg, "slm")("an apple")["input_ids"]


def test_export_never_writes_over_a_folder_that_holds_something(smoke_run, tmp_path):
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep")
    proc = _export(smoke_run, dest)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"fedcollm: error: --out {dest}: already exists and is not an empty folder; give a new one"
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]
