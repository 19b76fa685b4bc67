"""Secure aggregation with Flower's SecAgg+: exact enough, blind server, dropouts, range guard."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from sim import simulate

from fedcollm import components
from fedcollm.errors import FedCoLLMError
from fedcollm.federated.secagg import WideningGrid, check_in_range, error_bound, narrow_masked_vectors
from fedcollm.federated.transport import decode


def fail_partition_3_after_key_sharing(msg, context, call_next):
    """Client 3 dies once it has shared its keys (at the masked-vector stage)."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if (int(context.node_config["partition-id"]) == 3 and configs is not None
            and configs.get(SecAggKey.STAGE) == Stage.COLLECT_MASKED_VECTORS):
        raise RuntimeError("client 3 crashed")
    return call_next(msg, context)


def fail_partitions_2_and_3_after_key_sharing(msg, context, call_next):
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if (int(context.node_config["partition-id"]) in (2, 3) and configs is not None
            and configs.get(SecAggKey.STAGE) == Stage.COLLECT_MASKED_VECTORS):
        raise RuntimeError("client crashed")
    return call_next(msg, context)


def _with(cfg, **federation):
    return dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, **federation))


def _one_round(cfg, out: Path, secure: bool):
    cfg = _with(cfg, rounds=1, secure_aggregation=secure)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(out)))


def _weighted_mean(updates):
    total = sum(n for n, _, _ in updates)
    return [sum(n * arrs[i] for n, _, arrs in updates) / total for i in range(len(updates[0][2]))]


@pytest.fixture(scope="module")
def plain_round(smoke_cfg_module, tmp_path_factory):
    """Round-1 client updates in the clear (plain FedAvg), decoded from the default transport
    (int4): the changes each client holds, which it hands SecAgg+ in a secure round."""
    out = tmp_path_factory.mktemp("plain")
    cfg = _one_round(smoke_cfg_module, out, secure=False)
    seen = simulate(cfg)
    _assert_counted_bytes_are_the_wire_size(seen, out)
    return {part: (n, decode(arrs, cfg.transport_mode())) for n, part, arrs in seen["fit_inputs"][1]}


@pytest.fixture(scope="module")
def smoke_cfg_module(mcq_files, tmp_path_factory):
    from fedcollm.config import load_config  # noqa: PLC0415

    train, evals = mcq_files
    return load_config(preset="smoke", overrides=[
        'data.dataset="mcq_jsonl"', f'data.train_file="{train}"', f'data.eval_file="{evals}"',
        "run.progress=false", "data.max_train_examples=50"])  # 10 per part, 4 clients


def test_secure_aggregate_equals_weighted_fedavg_and_server_is_blind(smoke_cfg_module, plain_round, tmp_path):
    cfg = _one_round(smoke_cfg_module, tmp_path / "secure", secure=True)
    seen = simulate(cfg)
    updates = [(n, p, arrs) for p, (n, arrs) in plain_round.items()]
    expected = _weighted_mean(updates)
    fit_inputs = seen["fit_inputs"][1]
    assert len(fit_inputs) == 4
    sizes = list(components.server_data(cfg).client_sizes)
    bound = error_bound(cfg, sizes, max(sizes))
    for _, _, arrs in fit_inputs:  # every "result" carries the same unmasked aggregate
        worst = max(float(np.max(np.abs(a - e))) for a, e in zip(arrs, expected))
        assert worst <= bound + 1e-7, (worst, bound)
    # No reply the server received holds any client's adapter in the clear.
    client_arrays = [a for _, arrs in plain_round.values() for a in arrs]
    received = []
    for msg in seen["replies"]:
        for record in msg.content.array_records.values():
            received += [arr.numpy() for arr in record.values()]
        for record in msg.content.config_records.values():
            for value in record.values():
                if isinstance(value, list) and value and isinstance(value[0], bytes):
                    for b in value:
                        try:
                            received.append(bytes_to_ndarray(b))
                        except Exception:  # noqa: BLE001 - ciphertexts and keys are not arrays
                            pass
    assert received, "expected the masked vectors among the replies"
    for got in received:
        for ref in client_arrays:
            if got.shape == ref.shape:
                assert not np.allclose(got.astype(np.float64), ref, atol=1e-3)
    summary = json.loads((tmp_path / "secure" / "summary.json").read_text())
    # The masked vectors travelled as uint32 (Flower makes int64): 4 bytes a value, not 8, as
    # counted on the messages received (before the server widened them for Flower's sum); the
    # rest is key shares and framing.
    comm = summary["comm"]
    assert 4 * comm["adapter_params"] < comm["bytes_up_per_client_round"] < 8 * comm["adapter_params"]
    assert summary["secure_aggregation"]["max_weight"] == max(sizes)
    assert summary["secure_aggregation"]["max_abs_error_bound"] == pytest.approx(bound)


def _assert_counted_bytes_are_the_wire_size(seen: dict, out: Path) -> None:
    """The bytes the report counts up per client are those of the reply messages as Flower
    serializes them for the wire (its protobuf form), less only the message's metadata."""
    sizes = seen["reply_sizes"]
    assert len(sizes) == 4
    counted = json.loads((out / "summary.json").read_text())["comm"]["bytes_up_per_client_round"]
    assert counted == pytest.approx(sum(s["payload"] for s in sizes) / len(sizes))
    assert all(0 < s["wire"] - s["payload"] < 1024 for s in sizes)  # the rest is metadata
    assert all(s["arrays"] < s["payload"] < s["arrays"] * 1.05 + 4096 for s in sizes)  # adapter + a little framing


@pytest.mark.parametrize("transport", ["fp16", "int8", "int4", "int1"])
def test_secure_aggregation_with_every_transport_equals_the_plain_runs_mean(smoke_cfg_module, tmp_path, transport):
    """SecAgg+ once averaged garbage with fp16 (it quantizes in the input's dtype) and refused
    int8: now the clients hand it the transport's values in fp32 (int4's too), and the aggregate
    equals the plain run's weighted mean of the decoded updates within SecAgg+'s bound."""
    base = _with(smoke_cfg_module, transport=transport)
    plain_seen = simulate(_one_round(base, tmp_path / "plain", secure=False))
    _assert_counted_bytes_are_the_wire_size(plain_seen, tmp_path / "plain")
    plain = plain_seen["fit_inputs"][1]
    decoded = [(n, p, decode(arrs, transport)) for n, p, arrs in plain]
    expected = _weighted_mean(decoded)
    cfg = _one_round(base, tmp_path / "secure", secure=True)
    fit_inputs = simulate(cfg)["fit_inputs"][1]
    assert len(fit_inputs) == 4
    sizes = list(components.server_data(cfg).client_sizes)
    bound = error_bound(cfg, sizes, max(sizes))
    for _, _, arrs in fit_inputs:
        worst = max(float(np.max(np.abs(a.astype(np.float64) - e))) for a, e in zip(arrs, expected))
        assert worst <= bound + 1e-7, (transport, worst, bound)
    summary = json.loads((tmp_path / "secure" / "summary.json").read_text())
    assert summary["rounds"] == 1 and not summary["stopped"]
    row = json.loads((tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()[1])
    assert row["clients_ok"] == 4 and not row["rejected"]


def test_one_dropout_after_key_sharing_gives_survivors_mean(smoke_cfg_module, plain_round, tmp_path):
    cfg = _one_round(smoke_cfg_module, tmp_path / "drop1", secure=True)
    seen = simulate(cfg, extra_mods=(fail_partition_3_after_key_sharing,))
    survivors = [(n, p, arrs) for p, (n, arrs) in plain_round.items() if p != 3]
    expected = _weighted_mean(survivors)
    fit_inputs = seen["fit_inputs"][1]
    assert len(fit_inputs) == 3
    sizes = [n for n, _, _ in survivors]
    bound = error_bound(cfg, sizes, max(components.server_data(cfg).client_sizes))
    worst = max(float(np.max(np.abs(a - e))) for a, e in zip(fit_inputs[0][2], expected))
    assert worst <= bound + 1e-7
    row = json.loads((tmp_path / "drop1" / "metrics.jsonl").read_text().splitlines()[1])
    assert row["clients_ok"] == 3 and row["clients_failed"] == 1


def test_too_many_dropouts_fail_the_round_and_keep_the_adapter(smoke_cfg_module, tmp_path):
    cfg = _one_round(smoke_cfg_module, tmp_path / "drop2", secure=True)
    with pytest.raises(FedCoLLMError, match="run stopped in round 1: secure aggregation halted"):
        simulate(cfg, extra_mods=(fail_partitions_2_and_3_after_key_sharing,))
    out = tmp_path / "drop2"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["round"] == 0 and rows[1]["round"] == 1 and "secure aggregation halted" in rows[1]["failed"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 0 and "halted" in summary["stopped"]
    # The saved SLM adapter is the initial global one (B = 0), not a partial aggregate.
    from safetensors.numpy import load_file  # noqa: PLC0415

    saved = load_file(out / "adapters" / "slm" / "adapter_model.safetensors")
    assert all(not v.any() for k, v in saved.items() if "lora_B" in k)


def test_out_of_range_values_are_refused_not_clipped():
    ok = [np.array([0.5, -0.99], dtype=np.float32)]
    check_in_range(ok, 1.0, "client 0")
    with pytest.raises(FedCoLLMError, match=r"client 2: adapter value 1\.5 is outside the secure-aggregation range ±1"):
        check_in_range([np.array([0.1, -1.5], dtype=np.float32)], 1.0, "client 2")
    with pytest.raises(FedCoLLMError, match="outside"):
        check_in_range([np.array([np.nan], dtype=np.float32)], 1.0, "client 2")


def test_run_refuses_a_range_the_initial_adapter_does_not_fit(smoke_cfg_module, tmp_path):
    cfg = _with(_one_round(smoke_cfg_module, tmp_path / "tiny", secure=True), secagg_clipping_range=1e-3)
    with pytest.raises(FedCoLLMError, match="the initial global adapter .* outside the secure-aggregation range"):
        simulate(cfg)


def test_masked_vectors_narrow_to_uint32_and_widen_back_exactly():
    """The compact SecAgg+ uplink is lossless: values below 2^32 go as uint32 and come back as
    the int64 Flower made; a vector with a larger value (a larger modulus) is left as it is."""
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict  # noqa: PLC0415
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes  # noqa: PLC0415
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key  # noqa: PLC0415

    fits = np.array([[0, 1], [2**32 - 1, 12345]], dtype=np.int64)
    too_big = np.array([2**32, 3], dtype=np.int64)

    def reply():
        content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(
            {Key.MASKED_PARAMETERS: [ndarray_to_bytes(fits), ndarray_to_bytes(too_big)]})})
        meta = Metadata(run_id=0, message_id="m", src_node_id=1, dst_node_id=0, reply_to_message_id="q",
                        group_id="", created_at=0.0, ttl=60.0, message_type="train")
        return Message(content=content, metadata=meta)

    def arrays(msg):
        return [bytes_to_ndarray(b) for b in msg.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]

    msg = reply()
    narrow_masked_vectors(msg)
    narrowed = arrays(msg)
    assert narrowed[0].dtype == np.uint32 and narrowed[1].dtype == np.int64
    assert len(ndarray_to_bytes(narrowed[0])) < len(ndarray_to_bytes(fits))

    class Inner:  # the grid below: hands back the narrowed reply
        def send_and_receive(self, messages, *, timeout=None):
            return [msg]

    (widened,) = WideningGrid(Inner()).send_and_receive([])
    back = arrays(widened)
    assert [a.dtype for a in back] == [np.int64, np.int64]
    np.testing.assert_array_equal(back[0], fits)
    np.testing.assert_array_equal(back[1], too_big)
