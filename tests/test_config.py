"""Config: presets, --set overrides, and bad input → exit code != 0 with a one-line error."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys

import pytest

from fedcollm.cli import main
from fedcollm.config import load_config
from fedcollm.errors import FedCoLLMError


def test_preset_and_overrides():
    cfg = load_config(preset="smoke", overrides=["federation.rounds=5", "distill.temperature=1",
                                                  'lora.target_modules=["q_proj"]'])
    assert cfg.federation.rounds == 5
    assert cfg.distill.temperature == 1.0 and isinstance(cfg.distill.temperature, float)
    assert cfg.lora.target_modules == ("q_proj",)
    assert cfg.model.llm == "tiny-random"


def test_toml_file_and_round_trip(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('preset = "smoke"\n[data]\nnum_clients = 3\n')
    cfg = load_config(f)
    assert cfg.data.num_clients == 3
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert load_config(again) == cfg


@pytest.mark.parametrize("overrides,message", [
    (["federation.roundz=3"], "config: unknown key 'federation.roundz' (known: client_cpus, client_gpus, "
     "fraction_fit, max_client_examples, max_update_norm, min_clients, round_timeout, rounds, secagg_clipping_range, "
     "secagg_num_shares, secagg_quantization_range, secagg_reconstruction_threshold, secure_aggregation, transport)"),
    (["federation.rounds=\"three\""], "config: federation.rounds must be an integer, got 'three'"),
    (["federation.rounds=0"], "config: federation.rounds must be > 0, got 0"),
    (["distill.top_k=-1"], "config: distill.top_k must be >= 0, got -1"),
    (["data.partition=\"zipf\""], "config: data.partition = 'zipf' is not one of iid, dirichlet, topic"),
    (["lora.dropout=1.5"], "config: lora.dropout must be in [0, 1), got 1.5"),
    (["data.dataset=\"mcq_jsonl\""], "config: data.dataset = 'mcq_jsonl' needs data.eval_file and data.train_file "
     "(or, for a server whose clients hold their own files, data.aux_file)"),
    (["federation.client_gpus=\"half\""], "config: federation.client_gpus must be 'auto' or a number >= 0, got 'half'"),
    (["federation.client_gpus=-1"], "config: federation.client_gpus must be 'auto' or a number >= 0, got -1.0"),
    (["data.aux_fraction=1.0"], "config: data.aux_fraction must be in [0, 1), got 1.0"),
    (["federation.min_clients=5"], "config: federation.min_clients = 5 exceeds data.num_clients = 4"),
    (["federation.transport=\"int3\""], "config: federation.transport = 'int3' is not one of auto, fp32, fp16, int8, int4, int2, int1"),
    (["lora=3"], "config: [lora] must be a table, got 3"),
    (["lora.target_modules=[1]"], "config: lora.target_modules must be a list of strings, got [1]"),
])
def test_bad_config_exact_one_line_error(overrides, message):
    with pytest.raises(FedCoLLMError) as err:
        load_config(overrides=overrides)
    assert str(err.value) == message


def test_missing_files_are_named_by_the_launchers_not_by_load_config(tmp_path):
    from fedcollm.config import check_files  # noqa: PLC0415

    cfg = load_config(overrides=['data.train_file="/nope.jsonl"'])  # a SuperNode may lack the server's files
    with pytest.raises(FedCoLLMError) as err:
        check_files(cfg)
    assert str(err.value) == "config: data.train_file = '/nope.jsonl': no such file"
    assert main(["run", "--set", 'data.aux_file="/nope/aux.jsonl"']) == 2


def test_client_gpus_takes_auto_or_a_number():
    assert load_config().federation.client_gpus == "auto"
    assert load_config(overrides=["federation.client_gpus=0.25"]).federation.client_gpus == 0.25
    assert load_config(overrides=["federation.client_gpus=1"]).federation.client_gpus == 1.0


def test_cli_bad_config_exits_nonzero_with_one_line(capsys, tmp_path):
    assert main(["run", "--set", "federation.rounds=x1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "federation.rounds" in err
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml' not found" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["eval", "--model", "tiny-random", "--split", "dev"], "argument --split: invalid choice: 'dev'"),
    (["eval", "--model", "tiny-random", "--limit", "-3"], "argument --limit: '-3': must be a whole number ≥ 0"),
    (["eval", "--model", "tiny-random", "--max-length", "0"], "argument --max-length: '0': must be a whole number ≥ 1"),
    (["eval", "--model", "tiny-random", "--batch-size", "x"], "argument --batch-size: invalid whole number value: 'x'"),
    (["eval", "--model", "tiny-random", "--prune", "10"], "--prune '10': expected FIRST,LAST, e.g. 10,10"),
    (["generate", "--prompt", "hi"], "fedcollm generate: give --model (it can be left out only with an --adapter "
                                     "from a run's folder, whose config.toml names the base)"),
    (["eval", "--model", "tiny-random", "--device", "gpu"], "--device = 'gpu' is not one of auto, cpu, cuda, cuda:N, mps"),
    (["experiment", "--preset", "smoke", "--jobs", "0"], "argument --jobs: '0': must be a whole number ≥ 1"),
    (["experiment", "--preset", "smoke", "--seeds", "0,1,0"], "--seeds '0,1,0': 0 given twice"),
    (["experiment", "--preset", "smoke", "--seeds", "0,,1"], "--seeds '0,,1': an empty item"),
    (["experiment", "--preset", "smoke", "--datasets", "arc_easy,arc_easy"], "--datasets 'arc_easy,arc_easy': arc_easy given twice"),
    (["experiment", "--preset", "smoke", "--aux-fractions", "0,0.2"], "--aux-fractions: 0 is no share of the training split"),
    (["deploy-local", "--preset", "smoke", "--clients", "0"], "argument --clients: '0': must be a whole number ≥ 1"),
    (["deploy-local", "--preset", "smoke", "--timeout", "-5"], "argument --timeout: '-5': must be a whole number ≥ 1"),
])
def test_cli_arguments_out_of_range_are_refused_in_one_line(argv, message, capsys):
    # (--limit -3 used to score all but the last 3 items; --split dev, --prune 10 and --device gpu
    # ended in tracebacks)
    with pytest.raises(SystemExit) if message.startswith("argument") else contextlib.nullcontext():
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_cli_process_exit_code_for_unknown_key():
    proc = subprocess.run([sys.executable, "-m", "fedcollm.cli", "run", "--set", "model.size=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines == ["fedcollm: error: config: unknown key 'model.size' (known: activation_checkpointing, cache_dir, "
                     "compile, device, dtype, llm, slm, slm_keep_first, slm_keep_last)"]


def test_the_shipped_experiment_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    gpu = load_config(root / "experiment-gpu.toml")
    # The paper's scale: whole training split in 5 equal parts, whole evaluation split.
    assert (gpu.data.max_train_examples, gpu.data.eval_examples, gpu.data.aux_fraction) == (0, 0, 0.0)
    assert gpu.data.num_clients == 4 and (gpu.lora.r, gpu.lora.alpha) == (8, 16)
    assert gpu.client.batch_size == gpu.distill.batch_size == 32
    assert gpu.model.dtype == "auto" and gpu.federation.client_gpus == "auto"
    cpu = load_config(root / "experiment-cpu.toml")
    assert cpu.data.max_train_examples > 0


def test_secagg_settings_leave_the_digest_of_a_run_without_secagg_alone():
    """Cached results are found by the config digest. SecAgg+'s settings change only a secure
    run: the pins are the digests at c25649f, before auto levels (quantization_range 0) became
    the default; a secure run with a lossy transport now has 7 levels, a new digest."""
    plain = load_config()
    assert plain.digest() == "f99497bb96eeb7fb"
    for key, value in (("secagg_clipping_range", 2.0), ("secagg_quantization_range", 100),
                       ("secagg_num_shares", 0.5), ("secagg_reconstruction_threshold", 0.5)):
        changed = dataclasses.replace(plain, federation=dataclasses.replace(plain.federation, **{key: value}))
        assert changed.digest() == plain.digest(), key
    secure = load_config(overrides=["federation.secure_aggregation=true"])
    explicit = load_config(overrides=["federation.secure_aggregation=true", "federation.secagg_quantization_range=4194304"])
    assert explicit.digest() == "15ac724bc666da4c" and secure.digest() not in (explicit.digest(), plain.digest())
    dp = load_config(overrides=["federation.secure_aggregation=true", 'privacy.mode="central-client-clipping"',
                                "privacy.clipping_norm=1.0", "privacy.noise_multiplier=0.5", "federation.min_clients=4"])
    assert dp.secagg_levels() == 2**22 and dp.digest() == "9590b061b71b3519"  # auto under fp32: as before


def test_activation_checkpointing_is_memory_not_results_the_digest_and_the_built_models():
    """The same numbers either way (tests/test_train_step.py proves it), so a run with it finds
    the cached results of one without; the models that train (the SLM, the LLM) checkpoint each
    decoder layer."""
    from fedcollm import components

    plain = load_config(preset="smoke")
    on = load_config(preset="smoke", overrides=["model.activation_checkpointing=true"])
    assert on.digest() == plain.digest()
    assert load_config().digest() == "f99497bb96eeb7fb"  # the default's pin, from before the field
    for build in (components.build_slm, components.build_llm):
        assert all(layer.gradient_checkpointing for layer in build(on).get_base_model().model.layers)
        assert not any(layer.gradient_checkpointing for layer in build(plain).get_base_model().model.layers)
    with pytest.raises(FedCoLLMError, match="model.activation_checkpointing must be"):
        load_config(overrides=['model.activation_checkpointing="yes"'])


def test_micro_batch_sizes_enter_the_digest_only_when_set():
    """Passes change float rounding, so a set size is a run of its own; unset (0), earlier
    digests stay (the default's pin is from before the fields)."""
    assert load_config().digest() == "f99497bb96eeb7fb"
    for key in ("client.micro_batch_size", "distill.micro_batch_size"):
        assert load_config(overrides=[f"{key}=2"]).digest() != load_config().digest()
        with pytest.raises(FedCoLLMError, match=f"{key} must be >= 0"):
            load_config(overrides=[f"{key}=-1"])
