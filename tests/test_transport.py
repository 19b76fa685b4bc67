"""Adapter transport encodings: exact fp32, fp16, int8 with per-tensor scales, int4, int2 and int1 with
per-group scales."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fedcollm.config import load_config
from fedcollm.federated.transport import BITS, GROUPS, INT4_GROUP, TERNARY_THRESHOLD, decode, encode
from fedcollm.runs.simulation import run_simulation

ARRAYS = [np.random.default_rng(0).normal(scale=0.05, size=s).astype(np.float32) for s in [(8, 64), (64, 8), (5,)]]


def test_fp32_is_exact_and_fp16_is_close():
    assert all(np.array_equal(a, b) for a, b in zip(decode(encode(ARRAYS, "fp32"), "fp32"), ARRAYS))
    wire = encode(ARRAYS, "fp16")
    assert all(w.dtype == np.float16 for w in wire)
    for a, b in zip(decode(wire, "fp16"), ARRAYS):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_int8_error_is_at_most_half_a_step():
    wire = encode(ARRAYS, "int8")
    assert len(wire) == 2 * len(ARRAYS) and wire[0].dtype == np.int8 and wire[1].shape == (1,)
    for a, b in zip(decode(wire, "int8"), ARRAYS):
        step = np.max(np.abs(b)) / 127
        assert np.max(np.abs(a - b)) <= step / 2 + 1e-7


def test_int4_error_is_at_most_half_a_step_of_each_group():
    """Each group of INT4_GROUP values (a tensor's last group padded) rounds on its own scale,
    so a small tensor next to a large one keeps its precision."""
    arrays = [*ARRAYS, np.full((3, 5), 1e-4, np.float32), np.zeros((0,), np.float32)]
    wire = encode(arrays, "int4")
    _assert_layout(wire, arrays, "int4")
    for a, b in zip(decode(wire, "int4"), arrays):
        assert a.shape == b.shape and a.dtype == np.float32
        flat, got = np.pad(b.ravel(), (0, -b.size % INT4_GROUP)), np.pad(a.ravel(), (0, -a.size % INT4_GROUP))
        step = np.abs(flat).reshape(-1, INT4_GROUP).max(axis=1, initial=0) / 7
        assert np.all(np.abs(got - flat).reshape(-1, INT4_GROUP).max(axis=1, initial=0) <= step / 2 + 1e-9)
    np.testing.assert_array_equal(decode(wire, "int4")[3], arrays[3])  # every value its group's peak: exact


def _assert_layout(wire: list[np.ndarray], arrays: list[np.ndarray], mode: str) -> None:
    """[packed codes, a scale per group, shapes]: each tensor padded to whole groups."""
    group = GROUPS[mode]
    groups = sum(-(-a.size // group) for a in arrays)
    assert [w.dtype for w in wire] == [np.uint8, np.float32, np.int64]
    assert wire[0].size == groups * group * BITS[mode] // 8 and wire[1].size == groups


def _groups(a: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """A tensor's values and a mask of its real (not padding) values, one row per group."""
    flat = np.pad(a.ravel(), (0, -a.size % group))
    return flat.reshape(-1, group), np.pad(np.ones(a.size, bool), (0, -a.size % group)).reshape(-1, group)


def test_int1_sends_each_sign_at_its_groups_mean_magnitude():
    """A bit a value: +s or −s, s = the mean |x| of the value's group (padding left out), the
    scale with the least squared error for sign codes; a group of one magnitude comes back exact."""
    group = GROUPS["int1"]
    arrays = [*ARRAYS, np.full((3, 5), -2e-3, np.float32), np.zeros((0,), np.float32)]
    wire = encode(arrays, "int1")
    _assert_layout(wire, arrays, "int1")
    for got, sent in zip(decode(wire, "int1"), arrays):
        assert got.shape == sent.shape and got.dtype == np.float32
        values, real = _groups(sent, group)
        scale = np.abs(values).sum(axis=1, keepdims=True) / np.maximum(real.sum(axis=1, keepdims=True), 1)
        want = np.where(values >= 0, scale, -scale)[real]
        np.testing.assert_allclose(got.ravel(), want, rtol=1e-6)
    np.testing.assert_array_equal(decode(wire, "int1")[3], arrays[3])


def test_int2_rounds_small_values_to_zero_and_the_rest_to_their_groups_scale():
    """Ternary (Ternary Weight Networks' rule): |x| ≤ 0.7·mean|x| of the group → 0, the others
    → ±s, s = the mean |x| of those kept."""
    group = GROUPS["int2"]
    arrays = [*ARRAYS, np.full((3, 5), 3e-3, np.float32)]
    wire = encode(arrays, "int2")
    _assert_layout(wire, arrays, "int2")
    for got, sent in zip(decode(wire, "int2"), arrays):
        values, real = _groups(sent, group)
        mean_abs = np.abs(values).sum(axis=1, keepdims=True) / real.sum(axis=1, keepdims=True)
        kept = np.abs(values) > TERNARY_THRESHOLD * mean_abs
        scale = (np.abs(values) * kept).sum(axis=1, keepdims=True) / kept.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(got.ravel(), (np.sign(values) * kept * scale)[real], rtol=1e-6)
    assert 0.2 < np.mean([(g == 0).mean() for g in decode(wire, "int2")[:3]]) < 0.8  # bell-shaped: some dropped
    np.testing.assert_array_equal(decode(wire, "int2")[3], arrays[3])


@pytest.mark.parametrize("mode", ["int8", "int4", "int2", "int1"])
def test_zero_tensor_survives(mode):
    assert not decode(encode([np.zeros((3, 3), np.float32)], mode), mode)[0].any()


@pytest.mark.parametrize("wire,mode,message", [
    ([np.zeros(3, np.float64)], "fp32", "tensor 0 arrived as float64, expected float32"),
    ([np.zeros(3, np.float32)], "fp16", "expected float16"),
    ([np.zeros(3, np.int8)], "int8", "needs (values, scale) pairs"),
    ([np.zeros(3, np.float32), np.ones(1, np.float32)], "int8", "not an int8 array"),
    ([np.zeros(32, np.uint8), np.ones(1, np.float32)], "int4", "needs 3 arrays"),
    ([np.zeros(32, np.int8), np.ones(1, np.float32), np.array([1, 64])], "int4", "arrived as int8, float32, int64"),
    ([np.zeros(31, np.uint8), np.ones(1, np.float32), np.array([1, 64])], "int4", "31 packed bytes do not fit 1 scales"),
    ([np.zeros(32, np.uint8), np.ones(1, np.float32), np.array([1, 65])], "int4", "tensor 0 (shape (65,)) does not fit"),
    ([np.zeros(64, np.uint8), np.ones(2, np.float32), np.array([1, 64])], "int4", "the shapes cover 64 of the 128 values"),
    ([np.zeros(31, np.uint8), np.ones(1, np.float32), np.array([1, 256])], "int1", "31 packed bytes do not fit 1 scales of 256"),
    ([np.zeros(32, np.uint8), np.ones(1, np.float32), np.array([1, 129])], "int2", "tensor 0 (shape (129,)) does not fit"),
])
def test_decode_refuses_what_does_not_fit(wire, mode, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode(wire, mode)


def test_auto_is_int4_except_under_differential_privacy():
    assert load_config(preset="smoke").transport_mode() == "int4"
    dp = ['privacy.mode="central-client-clipping"', "privacy.clipping_norm=1.0", "privacy.noise_multiplier=1.0",
          "federation.min_clients=4"]
    private = load_config(preset="smoke", overrides=dp)
    assert private.transport_mode() == "fp32"
    # the same run as an explicit fp32: cached results are found under either spelling
    explicit = load_config(preset="smoke", overrides=[*dp, 'federation.transport="fp32"'])
    assert private.digest() == explicit.digest()
    assert load_config(preset="smoke", overrides=['federation.transport="fp16"']).transport_mode() == "fp16"


def test_default_run_sends_a_fraction_of_fp32_bytes(smoke_cfg, tmp_path):
    """The default transport ("auto") is int4 without DP: about a seventh of fp32's bytes, in
    round 2 too, where every client gets the change since round 1 (federated/reference.py) and
    rebuilds the server's reference from it (a mismatch would fail its fit)."""
    assert smoke_cfg.federation.transport == "auto"
    cfg = dataclasses.replace(smoke_cfg, federation=dataclasses.replace(smoke_cfg.federation, rounds=2),
                              run=dataclasses.replace(smoke_cfg.run, out_dir=str(tmp_path / "default")))
    summary = run_simulation(cfg)
    comm = summary["comm"]
    fp32_payload = 4 * comm["adapter_params"]
    assert comm["transport"] == "int4"
    for way in ("up", "down"):  # half a byte a value, a scale per 64, framing (~1 kB: a tiny model here)
        assert 0.5 * comm["adapter_params"] < comm[f"bytes_{way}_per_client_round"] < 0.25 * fp32_payload
    rows = [json.loads(line) for line in (tmp_path / "default" / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        assert row["clients_ok"] == 4 and row["clients_failed"] == 0 and not row["rejected"]
        assert row["sent_whole"] == 0
    assert rows[2]["bytes_down_per_client"] == rows[1]["bytes_down_per_client"] < 0.25 * fp32_payload
