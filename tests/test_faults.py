"""Nothing lost, nothing silently wrong: kill-and-resume, client faults, bad updates."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from safetensors.numpy import load_file
from sim import simulate

from fedcollm import checkpoint
from fedcollm.cli import _resume_config
from fedcollm.errors import FedCoLLMError
from fedcollm.federated.validate import update_problem
from fedcollm.version import code_version


# --- kill and resume -------------------------------------------------------------------------

def _run_cmd(out: Path, mcq_files, *extra: str) -> list[str]:
    train, evals = mcq_files
    return [sys.executable, "-m", "fedcollm.cli", "run", "--preset", "smoke", "--out", str(out),
            "--set", 'data.dataset="mcq_jsonl"', "--set", f'data.train_file="{train}"',
            "--set", f'data.eval_file="{evals}"', "--set", "federation.rounds=3",
            "--set", "run.progress=false", *extra]


def _adapters(out: Path) -> dict:
    return {m: load_file(out / "adapters" / m / "adapter_model.safetensors") for m in ("slm", "llm")}


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    for model in ("slm", "llm"):
        assert a[model].keys() == b[model].keys()
        for k in a[model]:
            assert np.array_equal(a[model][k], b[model][k]), f"{model} {k} differs"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _killed_at(out: Path, mcq_files, point: str) -> None:
    """Run until the server process kills itself at `point` (crash.py: "kd:2", "outputs:3", ...)."""
    env = dict(os.environ, FEDCOLLM_TEST_KILL_AT=point)
    proc = subprocess.Popen(_run_cmd(out, mcq_files), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    try:
        proc.wait(timeout=600)
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL


def _resumed(out: Path, mcq_files) -> str:
    """`--resume` the run in `out` to its end; what it printed."""
    resumed = subprocess.run(_run_cmd(out, mcq_files, "--resume", str(out)), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return resumed.stdout


@pytest.fixture(scope="module")
def uninterrupted(mcq_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = subprocess.run(_run_cmd(out, mcq_files), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _adapters(out)


def test_sigkill_mid_round_then_resume_gives_identical_adapters(mcq_files, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = subprocess.Popen(_run_cmd(out, mcq_files), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:  # kill once round 1 is scored and checkpointed, i.e. during round 2
        deadline = time.time() + 300
        while time.time() < deadline:
            lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
            if len(lines) >= 2:
                break
            time.sleep(0.2)
        assert len(lines) >= 2, "the run never finished round 1"
    finally:
        _kill_group(proc)
    assert not (out / "summary.json").exists()
    # Where the kill landed is up to the machine's load: after round 1's checkpoint as a rule, but
    # a starved watcher can miss round 2's end too, and a kill between the row and its checkpoint
    # resumes after round 0.
    done = int(re.search(r"resuming \S+ after round (\d+)", _resumed(out, mcq_files)).group(1))
    assert done < 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    # The resumed server knows no client's reference: its first round sends the adapter whole
    # (fp32), the next ones changes again; the clients rebuilt the same reference, so the
    # adapters are bit for bit equal.
    assert [r.get("sent_whole") for r in rows] == [None, *(4 if r == done + 1 else 0 for r in (1, 2, 3))]
    assert all(rows[done + 1]["bytes_down_per_client"] > 2 * rows[r]["bytes_down_per_client"]
               for r in (1, 2, 3) if r != done + 1)
    _assert_bitwise_equal(_adapters(out), uninterrupted)


# Killed in round 1's KD, the run resumes from its round-0 checkpoint: round 0 must not be
# recorded twice (it was, where "resumed" was read off the round offset, 0 there).
@pytest.mark.parametrize(("point", "rnd"), [("kd", 2), ("checkpoint", 2), ("kd", 1)])
def test_sigkill_in_kd_or_while_writing_the_checkpoint_then_resume(mcq_files, tmp_path, uninterrupted, point, rnd):
    out = tmp_path / "run"
    _killed_at(out, mcq_files, f"{point}:{rnd}")
    if point == "checkpoint":
        assert list(out.glob(".checkpoint.pt.tmp-*")), "expected the half-done checkpoint file"
    # the checkpoint of the round killed never replaced the one before it
    assert f"after round {rnd - 1}" in _resumed(out, mcq_files)
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3]
    _assert_bitwise_equal(_adapters(out), uninterrupted)


def test_sigkill_after_the_last_round_then_resume_keeps_which_items_were_right(mcq_files, tmp_path, uninterrupted):
    """Cut short after its last round's checkpoint but before its outputs (a device lease's end,
    say), the run resumes with no round left. Its summary must still say which items each model
    got right (the paired tests need them): session 15's table got one such result without."""
    out = tmp_path / "run"
    _killed_at(out, mcq_files, "outputs:3")
    assert not (out / "summary.json").exists()
    assert "after round 3" in _resumed(out, mcq_files)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    items = json.loads((out / "summary.json").read_text())["items"]
    assert items["round"] == 3
    for model in ("slm", "llm"):
        correct = items[model]["correct"]
        assert len(correct) == rows[-1][model]["n"] and np.mean(correct) == pytest.approx(rows[-1][model]["acc"])
    _assert_bitwise_equal(_adapters(out), uninterrupted)


def test_resume_refuses_a_changed_config_unless_forced(mcq_files, tmp_path, uninterrupted):
    out = tmp_path / "run"
    subprocess.run(_run_cmd(out, mcq_files, "--set", "federation.rounds=1"), capture_output=True, timeout=600)
    changed = subprocess.run(_run_cmd(out, mcq_files, "--resume", str(out), "--set", "client.lr=0.5"),
                             capture_output=True, text=True, timeout=600)
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines()[-1] == (
        f"fedcollm: error: --resume {out}: the config differs from the one its checkpoint was made "
        "with; pass --force to resume with it anyway")
    missing = subprocess.run(_run_cmd(tmp_path / "nothing", mcq_files, "--resume", str(tmp_path / "nothing")),
                             capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2 and "no checkpoint.pt there" in missing.stderr


def test_resume_by_other_code_is_allowed_and_said(smoke_cfg, tmp_path, capsys):
    """A fix installed mid-run may continue it, but the run must say which rounds the old code made."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text(smoke_cfg.to_toml())
    checkpoint.save(out, 1, smoke_cfg.digest(), {}, {}, [])
    args = argparse.Namespace(resume=str(out), config=None, overrides=[], preset=None, force=False)
    assert _resume_config(args).run.resume and "warning" not in capsys.readouterr().err  # same code: silent
    state = torch.load(out / checkpoint.NAME, weights_only=True)
    torch.save({**state, "code_version": "0123456789ab"}, out / checkpoint.NAME)
    assert _resume_config(args).run.resume
    assert capsys.readouterr().err.strip() == (
        f"[fedcollm] warning: --resume {out}: its rounds 0-1 were computed by other code "
        f"(version 0123456789ab, this is {code_version()})")


# --- client faults and bad updates -----------------------------------------------------------

def _partition(context) -> int:
    return int(context.node_config["partition-id"])


def crash_partition_1(msg, context, call_next):
    if _partition(context) == 1:
        raise RuntimeError("client 1 crashed mid-training")
    return call_next(msg, context)


def stall_partition_1_in_round_2(msg, context, call_next):
    """Round 1 warms every actor up; in round 2 client 1 goes silent past the timeout."""
    if _partition(context) == 1 and compat.recorddict_to_fitins(msg.content, True).config.get("round") == 2:
        time.sleep(75)
    return call_next(msg, context)


def corrupt_updates(msg, context, call_next):
    """Client 1 sends NaN, client 2 a wrong shape, client 3 a huge update; client 0 is honest."""
    reply = call_next(msg, context)
    part = _partition(context)
    if part == 0:
        return reply
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    arrays = parameters_to_ndarrays(fitres.parameters)
    if part == 1:
        arrays[0] = np.full_like(arrays[0], np.nan)
    elif part == 2:
        arrays[1] = arrays[1][:, :-1]
    else:
        arrays = [a * 1e6 for a in arrays]
    fitres.parameters = ndarrays_to_parameters(arrays)
    return Message(compat.fitres_to_recorddict(fitres, True), reply_to=msg)


def _cfg(base, tmp_path, **federation):
    cfg = dataclasses.replace(base, federation=dataclasses.replace(base.federation, rounds=1, **federation))
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(tmp_path / "run")))


def test_bad_updates_are_rejected_and_the_round_completes(smoke_cfg, tmp_path):
    # fp32 transport: the corruptions are written for plain fp32 arrays (int8 sends pairs)
    seen = simulate(_cfg(smoke_cfg, tmp_path, transport="fp32"), extra_mods=(corrupt_updates,))
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1]
    reasons = {r["client"]: r["reason"] for r in row["rejected"]}
    assert reasons[1] == "tensor 0 holds NaN or Inf"
    assert reasons[2].startswith("tensor 1 has shape")
    assert reasons[3].startswith("update norm ‖θ_k − θ_global‖") and "exceeds federation.max_update_norm = 100" in reasons[3]
    assert row["clients_ok"] == 1 and row["kd_steps"] > 0
    assert len(seen["fit_inputs"][1]) == 4  # all four arrived; three were not averaged


def test_crashing_client_is_dropped_and_logged(smoke_cfg, tmp_path):
    simulate(_cfg(smoke_cfg, tmp_path), extra_mods=(crash_partition_1,))
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1]
    assert row["clients_ok"] == 3 and row["clients_failed"] == 1
    assert len(row["dropped"]) == 1 and "client 1 crashed mid-training" in row["dropped"][0]["reason"]


def test_silent_client_times_out_and_is_dropped(smoke_cfg, tmp_path):
    # Round 1 includes the actors' start-up; 60 s leaves room for a loaded machine.
    cfg = _cfg(smoke_cfg, tmp_path, round_timeout=60.0)
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, rounds=2))
    simulate(cfg, extra_mods=(stall_partition_1_in_round_2,))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["clients_ok"] == 4 and not rows[1]["dropped"]
    assert rows[2]["clients_ok"] == 3 and rows[2]["kd_steps"] > 0
    assert [d["reason"] for d in rows[2]["dropped"]] == ["no reply within 60 s"]


def test_below_min_clients_the_run_stops_cleanly(smoke_cfg, tmp_path):
    with pytest.raises(FedCoLLMError, match="run stopped in round 1: 3 valid client updates, fewer than "
                                            "federation.min_clients = 4"):
        simulate(_cfg(smoke_cfg, tmp_path, min_clients=4), extra_mods=(crash_partition_1,))
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 0 and summary["failed_rounds"][0]["round"] == 1
    saved = load_file(out / "adapters" / "slm" / "adapter_model.safetensors")
    assert all(not v.any() for k, v in saved.items() if "lora_B" in k)  # the initial global adapter


def test_a_diverged_kd_ends_the_run_on_the_last_good_state(smoke_cfg, tmp_path):
    # distill.lr = 1e8 turns the LLM adapter to NaN in round 1's KD (its losses still read finite):
    # that round fails, and neither NaN adapter is scored, saved or sent.
    cfg = _cfg(smoke_cfg, tmp_path)
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, lr=1e8),
                              federation=dataclasses.replace(cfg.federation, rounds=2))
    with pytest.raises(FedCoLLMError, match=r"run stopped in round 1: the server's mutual KD diverged: the LLM "
                                            r"adapter holds NaN or Inf .*; lower distill.lr = 1e\+08"):
        simulate(cfg)
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 0 and summary["failed_rounds"][0]["round"] == 1
    saved = _adapters(out)
    assert all(np.isfinite(v).all() for m in saved.values() for v in m.values())
    assert all(not v.any() for k, v in saved["slm"].items() if "lora_B" in k)  # the initial global adapter


@pytest.mark.parametrize("arrays,n,reason", [
    ([np.zeros((2, 3), np.float32)], 0, "example count 0 is not a positive integer"),
    ([np.zeros((2, 3), np.float32)], -4, "example count -4 is not a positive integer"),
    ([], 5, "0 adapter tensors, expected 1"),
    ([np.zeros((2, 3), np.float32)] * 2, 5, "2 adapter tensors, expected 1"),
    ([np.zeros((3, 2), np.float32)], 5, "tensor 0 has shape (3, 2), expected (2, 3)"),
    ([np.zeros((2, 3), np.int64)], 5, "tensor 0 has dtype int64, expected a float type"),
    ([np.full((2, 3), np.inf, np.float32)], 5, "tensor 0 holds NaN or Inf"),
    ([np.full((2, 3), 1e3, np.float32)], 5, "update norm ‖θ_k − θ_global‖ = 2449 exceeds federation.max_update_norm = 1000"),
    ([np.full((2, 3), 0.5, np.float32)], 5, None),
    ([np.full((2, 3), 0.5, np.float32)], 101, "example count 101 exceeds federation.max_client_examples = 100"),
    ([np.full((2, 3), 0.5, np.float32)], 10**9, "example count 1000000000 exceeds federation.max_client_examples = 100"),
])
def test_update_problems(arrays, n, reason):
    assert update_problem(arrays, [np.zeros((2, 3), np.float32)], n, 1000.0, 100) == reason


def test_a_large_but_unchanged_adapter_passes_the_norm_check():
    large = [np.full((2, 3), 1e3, np.float32)]
    assert update_problem([large[0] + 0.01], large, 5, 1000.0, 100) is None


def test_the_server_out_of_memory_in_kd_ends_the_run_on_the_last_good_state(smoke_cfg, tmp_path, monkeypatch):
    """Out of memory part-way through round 2's KD: the run stops in one line that names the
    settings to change, on round 1's state (saved and resumable), not on half-trained adapters."""
    import torch

    import fedcollm.federated.strategy as strategy

    real, calls = strategy.mutual_distill, []

    def oom_in_round_2(llm, slm, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            real(llm, slm, *args, **kwargs)  # both adapters move: the run must not keep them
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real(llm, slm, *args, **kwargs)

    monkeypatch.setattr(strategy, "mutual_distill", oom_in_round_2)
    cfg = _cfg(smoke_cfg, tmp_path)
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, rounds=2))
    with pytest.raises(FedCoLLMError, match=r"run stopped in round 2: the server's mutual KD on cpu: out of memory "
                                            r"\(CUDA out of memory. Tried to allocate 20.00 MiB\); set "
                                            r"model.activation_checkpointing = true .* or distill.micro_batch_size "
                                            r"below distill.batch_size = 4"):
        simulate(cfg)
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["failed_rounds"][0]["round"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and "out of memory" in rows[2]["failed"] and "slm" not in rows[2]
    saved = _adapters(out)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["round"] == 1
    for key, value in saved["llm"].items():  # round 1's LLM adapter, as its checkpoint holds it
        np.testing.assert_array_equal(value, ckpt["llm"][key].numpy())
