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
from fedcollm.federated import secagg
from fedcollm.federated.secagg import check_in_range, error_bound
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


def _in_secagg_units(cfg, updates):
    """The clients' changes as they hand them to SecAgg+: in units of value_scale, clipped to
    its range (what the unmasked mean the strategy receives is the mean of)."""
    scale = secagg.value_scale(cfg, max(components.server_data(cfg).client_sizes))
    c = cfg.federation.secagg_clipping_range
    return [(n, p, [np.clip(a / scale, -c, c) for a in arrs]) for n, p, arrs in updates], scale


def _masked_vectors(replies) -> list[np.ndarray]:
    """Every array among the replies the server received: SecAgg+'s masked vectors (bit-packed)
    and any array in the clear."""
    received = []
    for msg in replies:
        for record in msg.content.array_records.values():
            received += [arr.numpy() for arr in record.values()]
        for record in msg.content.config_records.values():
            for value in record.values():
                if isinstance(value, list) and value and isinstance(value[0], bytes):
                    for b in value:
                        if secagg.is_packed(b):
                            received.append(secagg.unpack(b))
                            continue
                        try:
                            received.append(bytes_to_ndarray(b))
                        except Exception:  # noqa: BLE001 - ciphertexts and keys are not arrays
                            pass
    return received


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


def test_at_7_levels_4_clients_send_5_bits_a_value_the_mean_stays_within_its_bound_and_the_server_is_blind(
        smoke_cfg_module, plain_round, tmp_path):
    """The default: a round's change in units of lr × steps, 7 levels, modulus 32 for 4 clients,
    so each masked value travels in 5 bits; the unmasked mean is the plain run's (clipped as the
    clients clip) within SecAgg+'s bound, and no reply holds a client's change in the clear."""
    cfg = _one_round(smoke_cfg_module, tmp_path / "secure", secure=True)
    assert cfg.federation.secagg_quantization_range == 0 and cfg.secagg_levels() == 7
    seen = simulate(cfg)
    updates, scale = _in_secagg_units(cfg, [(n, p, arrs) for p, (n, arrs) in plain_round.items()])
    expected = _weighted_mean(updates)
    fit_inputs = seen["fit_inputs"][1]
    assert len(fit_inputs) == 4
    sizes = list(components.server_data(cfg).client_sizes)
    bound = error_bound(cfg, sizes, max(sizes)) / scale
    for _, _, arrs in fit_inputs:  # every "result" carries the same unmasked aggregate, in SecAgg+'s units
        worst = max(float(np.max(np.abs(a - e))) for a, e in zip(arrs, expected))
        assert worst <= bound + 1e-6, (worst, bound)
    # No reply the server received holds any client's change in the clear.
    client_arrays = [a for _, arrs in plain_round.values() for a in arrs]
    received = _masked_vectors(seen["replies"])
    assert any(a.size > 1 for a in received), "expected the masked vectors among the replies"
    for got in received:
        assert got.min() >= 0 and got.max() < 32  # below the modulus: 5 bits
        for ref in client_arrays:
            if got.shape == ref.shape:
                assert not np.allclose(got.astype(np.float64), ref, atol=1e-3)
    summary = json.loads((tmp_path / "secure" / "summary.json").read_text())
    secure, comm = summary["secure_aggregation"], summary["comm"]
    assert (secure["quantization_range"], secure["modulus"], secure["bits_per_value"]) == (7, 32, 5)
    assert secure["value_scale"] == pytest.approx(scale) and secure["weights_as_sent"] == [1.0] * 4
    assert secure["max_weight"] == max(sizes)
    assert secure["max_abs_error_bound"] == pytest.approx(bound * scale)
    # 5 bits a value travel, as the masked vectors were received (before the server unpacked
    # them), plus a short header per tensor; the round's uplink counts them with the key shares.
    n_arrays = len(fit_inputs[0][2]) + 1  # and SecAgg+'s weight
    assert len(seen["masked_bytes"]) == 4
    for sent in seen["masked_bytes"]:
        assert 5 / 8 * comm["adapter_params"] < sent < 5 / 8 * comm["adapter_params"] + 32 * n_arrays
    assert comm["bytes_up_per_client_round"] > seen["masked_bytes"][0]
    report = (tmp_path / "secure" / "report.md").read_text()
    assert "7 levels, modulus 2^5 (bits a value)" in report and f"values in units of {scale:.3g}" in report
    row = json.loads((tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()[1])
    assert f"by round: 1: {row['secagg_clipped']:,} (largest {row['secagg_peak']:.4g})" in report
    largest = max(float(np.max(np.abs(a))) for _, arrs in plain_round.values() for a in arrs) / scale
    assert row["secagg_peak"] == pytest.approx(largest, rel=1e-5)
    assert row["secagg_clipped"] == sum(int(np.count_nonzero(np.abs(a) / scale > 1.0))
                                        for _, arrs in plain_round.values() for a in arrs)


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
    # 2^22 levels over ±4 units: nothing is clipped, and the bound is tight.
    base = _with(smoke_cfg_module, transport=transport, secagg_quantization_range=2**22, secagg_clipping_range=4.0)
    plain_seen = simulate(_one_round(base, tmp_path / "plain", secure=False))
    _assert_counted_bytes_are_the_wire_size(plain_seen, tmp_path / "plain")
    plain = plain_seen["fit_inputs"][1]
    cfg = _one_round(base, tmp_path / "secure", secure=True)
    decoded, scale = _in_secagg_units(cfg, [(n, p, decode(arrs, transport)) for n, p, arrs in plain])
    expected = _weighted_mean(decoded)
    fit_inputs = simulate(cfg)["fit_inputs"][1]
    assert len(fit_inputs) == 4
    sizes = list(components.server_data(cfg).client_sizes)
    bound = error_bound(cfg, sizes, max(sizes)) / scale
    assert bound < 1e-5
    for _, _, arrs in fit_inputs:
        worst = max(float(np.max(np.abs(a.astype(np.float64) - e))) for a, e in zip(arrs, expected))
        assert worst <= bound + 1e-7, (transport, worst, bound)
    summary = json.loads((tmp_path / "secure" / "summary.json").read_text())
    assert summary["rounds"] == 1 and not summary["stopped"]
    row = json.loads((tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()[1])
    assert row["clients_ok"] == 4 and not row["rejected"] and row["secagg_clipped"] == 0


def test_one_dropout_after_key_sharing_gives_survivors_mean(smoke_cfg_module, plain_round, tmp_path):
    cfg = _one_round(smoke_cfg_module, tmp_path / "drop1", secure=True)
    seen = simulate(cfg, extra_mods=(fail_partition_3_after_key_sharing,))
    survivors, scale = _in_secagg_units(cfg, [(n, p, arrs) for p, (n, arrs) in plain_round.items() if p != 3])
    expected = _weighted_mean(survivors)
    fit_inputs = seen["fit_inputs"][1]
    assert len(fit_inputs) == 3
    sizes = [n for n, _, _ in survivors]
    bound = error_bound(cfg, sizes, max(components.server_data(cfg).client_sizes)) / scale
    worst = max(float(np.max(np.abs(a - e))) for a, e in zip(fit_inputs[0][2], expected))
    assert worst <= bound + 1e-6
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


def test_masked_vectors_travel_bit_packed_and_unpack_exactly():
    """The compact SecAgg+ uplink is lossless: each masked vector (Flower's int64) travels in the
    bits its largest value needs and comes back as the same int64 array; an array that is not
    non-negative integers is left as Flower made it."""
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict  # noqa: PLC0415
    from flwr.common import ndarray_to_bytes  # noqa: PLC0415
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key  # noqa: PLC0415

    rng = np.random.default_rng(0)
    five_bits = rng.integers(0, 32, size=(64, 48), dtype=np.int64)
    wide = np.array([[0, 1], [2**40 + 3, 12345]], dtype=np.int64)
    negative = np.array([3, -1], dtype=np.int64)
    vectors = [five_bits, wide, negative, np.array([7], dtype=np.int64), np.zeros((0, 3), dtype=np.int64)]

    def reply():
        content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(
            {Key.MASKED_PARAMETERS: [ndarray_to_bytes(v) for v in vectors]})})
        meta = Metadata(run_id=0, message_id="m", src_node_id=1, dst_node_id=0, reply_to_message_id="q",
                        group_id="", created_at=0.0, ttl=60.0, message_type="train")
        return Message(content=content, metadata=meta)

    def sent(msg):
        return msg.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]

    msg = reply()
    secagg.pack_masked_vectors(msg)
    packed = sent(msg)
    assert [secagg.is_packed(b) for b in packed] == [True, True, False, True, True]
    assert len(packed[0]) < 5 / 8 * five_bits.size + 64  # 5 bits a value and a short header
    assert len(packed[0]) < len(ndarray_to_bytes(five_bits)) / 12

    class Inner:  # the grid below: hands back the packed reply
        def send_and_receive(self, messages, *, timeout=None):
            return [msg]

    (unpacked,) = secagg.UnpackingGrid(Inner()).send_and_receive([])
    back = [bytes_to_ndarray(b) for b in sent(unpacked)]
    for got, want in zip(back, vectors):
        assert got.dtype == np.int64 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_the_modulus_is_the_smallest_power_of_two_the_sum_cannot_reach(smoke_cfg_module):
    assert secagg.modulus(4, 7) == 32  # the sum of 4 values in 0..7 is at most 28
    assert secagg.modulus(4, 8) == 64  # ... in 0..8 reaches 32
    assert secagg.modulus(1, 1) == 2 and secagg.modulus(4, 2**22) == 2**25
    # auto levels: 7 for a round's change (lossy transports), 2^22 for the adapter itself (fp32)
    assert smoke_cfg_module.transport_mode() == "int4" and smoke_cfg_module.secagg_levels() == 7
    assert _with(smoke_cfg_module, transport="fp32").secagg_levels() == 2**22
    assert _with(smoke_cfg_module, secagg_quantization_range=100).secagg_levels() == 100
    big = _with(smoke_cfg_module, secagg_quantization_range=2**31)
    assert secagg.make_fit_workflow(big, 10).modulus_range == 2**34  # refused by the server (next test)


def test_the_server_refuses_a_modulus_above_flowers_and_a_weight_that_rounds_to_0(smoke_cfg_module, tmp_path):
    """Both before any training: the run's outputs show no round."""
    cfg = _with(_one_round(smoke_cfg_module, tmp_path / "mod", secure=True), secagg_quantization_range=2**31)
    with pytest.raises(FedCoLLMError, match=r"modulus of 17179869184, above Flower's 2\^32"):
        simulate(cfg)
    # Parts of 10 examples against max_weight 200: 10/200 × 7 = 0.35 rounds to 0 of 7 levels.
    cfg = _with(_one_round(smoke_cfg_module, tmp_path / "zero", secure=True), max_client_examples=200)
    with pytest.raises(FedCoLLMError, match="config: client 0: weight 10 of max_weight 200 rounds to 0 of SecAgg"):
        simulate(cfg)
    assert (tmp_path / "zero" / "metrics.jsonl").read_text() == ""  # not even round 0 was scored
    secagg.check_weight(11, 140, 7, "client 1")  # 0.55 of a level rounds to 1
    with pytest.raises(FedCoLLMError, match="client 1: weight 9 of max_weight 140 rounds to 0"):
        secagg.check_weight(9, 140, 7, "client 1")
    assert secagg.weights_as_sent([80, 40, 30], 80, 7) == [1.0, 4 / 7, 3 / 7]  # not 1/2 and 3/8: as SecAgg+ rounds


def test_clients_clip_to_the_range_and_count_and_refuse_what_is_not_a_number():
    units, clipped, peak = secagg.to_secagg_units(
        [np.array([0.001, -0.004, 0.0025], np.float32), np.array([[0.0, 0.003]], np.float32)], 0.002, 1.0, "client 0")
    assert clipped == 3 and peak == pytest.approx(2.0)  # -2, 1.25 and 1.5 units
    np.testing.assert_allclose(units[0], [0.5, -1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(units[1], [[0.0, 1.0]], rtol=1e-6)
    assert all(u.dtype == np.float32 for u in units)
    with pytest.raises(FedCoLLMError, match="client 3: the update holds NaN or Inf"):
        secagg.to_secagg_units([np.array([0.1, np.inf], np.float32)], 1.0, 1.0, "client 3")


def test_the_unit_of_secaggs_values_is_a_rounds_largest_change_or_1_for_the_adapter_itself(smoke_cfg_module):
    from fedcollm.config import load_config  # noqa: PLC0415

    cfg = load_config()  # the default: lr 3e-4, 1 local epoch, batches of 8
    assert secagg.value_scale(cfg, 80) == pytest.approx(3e-4 * 10)  # 80 examples: 10 steps
    assert secagg.value_scale(cfg, 81) == pytest.approx(3e-4 * 11)
    epochs = dataclasses.replace(cfg, client=dataclasses.replace(cfg.client, local_epochs=3))
    assert secagg.value_scale(epochs, 80) == pytest.approx(3e-4 * 30)
    assert secagg.value_scale(_with(cfg, transport="fp32"), 80) == 1.0
