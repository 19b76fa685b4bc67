"""Secure aggregation with Flower's SecAgg+: its settings as resolved for a run, the values a
client hands it, and a compact uplink for its masked vectors.

What travels up is one masked integer per adapter value, each below SecAgg+'s modulus. Three
choices keep that small (issue #14: < 0.3% of the fp32 SLM up):

- **Levels.** Under a lossy transport the clients hand SecAgg+ a round's *change* (federated/
  reference.py), not the adapter. Stochastic rounding is unbiased, so a few levels suffice:
  auto (`secagg_quantization_range = 0`) is 7 levels for changes and 2^22 (Flower's default, a
  step of 4.8e-7 over ±1) for the adapter itself (fp32, as differential privacy needs).
- **Units.** A change is handed over in units of `value_scale` = client lr × the largest
  client's optimizer steps: AdamW moves a value by about lr per step at most, so a change lies
  in about ±1 of that unit and 7 levels over ±1 cover it. The server multiplies the unmasked
  mean back. What lies outside ±secagg_clipping_range is clipped by the client and counted
  (`secagg_clipped` per round), never silently; a non-finite value is refused.
- **Modulus and packing.** The masked sum of n clients' values in 0..levels needs a modulus
  above n × levels, not Flower's 2^32: the smallest power of two above it (4 clients × 7 levels
  = 28 < 32: 5 bits). Flower ships each masked vector as int64; the client packs it into the
  bits its largest value needs (`pack_masked_vectors`), the server unpacks it before the workflow
  sums it (`UnpackingGrid`). Lossless.

SecAgg+ also rounds each client's weight n_k / max_weight to the same levels
(`weights_as_sent`): exact for equal parts, approximate otherwise, and a weight that would round
to 0 (silently dropping the client from the mean) is refused before training.
"""

from __future__ import annotations

import struct

import numpy as np
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.workflow import SecAggPlusWorkflow

from fedcollm.config import Config
from fedcollm.errors import FedCoLLMError
from fedcollm.federated.reference import sends_changes
from fedcollm.train.batches import num_batches

SCALE = "secagg_value_scale"  # fit-config key: the unit the server multiplies the mean back by


def modulus(num_clients: int, num_levels: int) -> int:
    """The smallest power of two the masked sum of num_clients values in 0..num_levels cannot reach."""
    return 1 << (num_clients * num_levels).bit_length()


def value_scale(cfg: Config, max_examples: int) -> float:
    """The unit clients hand SecAgg+ their values in: client lr × the optimizer steps of the
    largest client part (a bound on a round's change under AdamW), or 1 for the adapter itself."""
    if not sends_changes(cfg.transport_mode()):
        return 1.0
    c = cfg.client
    return c.lr * c.local_epochs * num_batches(max_examples, c.batch_size)


def quantized_weight(weight: int, max_weight: int, num_levels: int) -> int:
    """The integer weight SecAgg+ sends (secaggplus_mod: round(weight / max_weight · levels))."""
    return round(weight / max_weight * num_levels)


def weights_as_sent(weights: list[int], max_weight: int, num_levels: int) -> list[float]:
    """Each client's weight relative to max_weight, as SecAgg+ rounds it (not n_k / max_weight)."""
    return [quantized_weight(w, max_weight, num_levels) / num_levels for w in weights]


def check_weight(weight: int, max_weight: int, num_levels: int, who: str) -> None:
    """Refuse a weight SecAgg+ would round to 0: that client would silently drop out of the mean."""
    if quantized_weight(weight, max_weight, num_levels) == 0:
        raise FedCoLLMError(
            f"{who}: weight {weight} of max_weight {max_weight} rounds to 0 of SecAgg+'s {num_levels} levels "
            f"(needs > 1/{2 * num_levels} of it); raise federation.secagg_quantization_range")


def check_in_range(arrays: list[np.ndarray], clipping_range: float, who: str) -> None:
    peak = max(float(np.max(np.abs(a))) for a in arrays if a.size)
    if not np.isfinite(peak) or peak > clipping_range:
        raise FedCoLLMError(
            f"{who}: adapter value {peak:.4g} is outside the secure-aggregation range "
            f"±{clipping_range:g}; raise federation.secagg_clipping_range")


def to_secagg_units(arrays: list[np.ndarray], scale: float, clipping_range: float,
                    who: str) -> tuple[list[np.ndarray], int, float]:
    """Client side: the values divided by `scale` and clipped to ±clipping_range, in fp32 (SecAgg+
    quantizes in the input's dtype); how many were clipped, and the largest |value| before (AdamW
    can step a hair past lr, so a few values at 1.00x are usual). A non-finite value is refused."""
    out, clipped, peak = [], 0, 0.0
    for a in arrays:
        v = np.asarray(a, np.float32) / np.float32(scale)
        if not np.isfinite(v).all():
            raise FedCoLLMError(f"{who}: the update holds NaN or Inf; refusing to hand it to secure aggregation")
        if v.size:
            peak = max(peak, float(np.max(np.abs(v))))
        clipped += int(np.count_nonzero(np.abs(v) > clipping_range))
        out.append(np.clip(v, -clipping_range, clipping_range))
    return out, clipped, peak


def make_fit_workflow(cfg: Config, max_weight: int) -> SecAggPlusWorkflow:
    """SecAgg+ as the fit stage of the legacy DefaultWorkflow.

    max_weight is the largest client part: each client's weight n_k / max_weight is then ≤ 1,
    as SecAgg+ needs, and as large as possible (its quantization precision scales with it).
    """
    f, q = cfg.federation, cfg.secagg_levels()
    return SecAggPlusWorkflow(
        num_shares=float(f.secagg_num_shares),
        reconstruction_threshold=float(f.secagg_reconstruction_threshold),
        max_weight=float(max_weight), clipping_range=f.secagg_clipping_range,
        quantization_range=q, modulus_range=modulus(cfg.data.num_clients, q), timeout=f.round_timeout)


def error_bound(cfg: Config, weights: list[int], max_weight: int) -> float:
    """Worst-case max abs error of the SecAgg+ weighted mean against exact FedAvg (weighted by
    `weights_as_sent`) of the values as clients handed them over (clipped ones clipped).

    Each client sends round(x·w · Q/2c) with stochastic rounding (error < 1 level), so the sum
    is off by < N levels of 2c/Q, divided back by Σ w; in adapter units, times value_scale.
    """
    q = cfg.secagg_levels()
    step = 2 * cfg.federation.secagg_clipping_range / q
    return value_scale(cfg, max_weight) * len(weights) * step / sum(weights_as_sent(weights, max_weight, q))


# A bit-packed masked vector: magic, bits a value, number of dimensions, the shape (uint64 each),
# then the values' bits, lowest first. Anything else in the list is Flower's own npy bytes.
_MAGIC = b"FCBP"
_HEAD = struct.Struct("<4sBB")


def pack(a: np.ndarray) -> bytes | None:
    """Non-negative integers in the bits the largest one needs; None for any other array."""
    if a.dtype.kind not in "iu" or (a.size and a.min() < 0):
        return None
    bits = max(1, int(a.max()).bit_length()) if a.size else 1
    flat = a.reshape(-1).astype(np.uint64)
    planes = ((flat[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return (_HEAD.pack(_MAGIC, bits, a.ndim) + struct.pack(f"<{a.ndim}Q", *a.shape)
            + np.packbits(planes, bitorder="little").tobytes())


def is_packed(b: bytes) -> bool:
    return b[:len(_MAGIC)] == _MAGIC


def unpack(b: bytes) -> np.ndarray:
    """The int64 array `pack` packed (as Flower's workflow sums it)."""
    _, bits, ndim = _HEAD.unpack_from(b)
    shape = struct.unpack_from(f"<{ndim}Q", b, _HEAD.size)
    count = int(np.prod(shape, dtype=np.int64))
    payload = np.frombuffer(b, np.uint8, offset=_HEAD.size + 8 * ndim)
    planes = np.unpackbits(payload, count=count * bits, bitorder="little").reshape(count, bits)
    return (planes.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(axis=1).reshape(shape)


def _recode_masked_vectors(msg, recode) -> None:
    """Apply `recode` (bytes → bytes) to every array of a SecAgg+ masked-vector reply (no-op on
    other messages)."""
    if not msg.has_content():
        return
    record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if record is None or Key.MASKED_PARAMETERS not in record:
        return
    record[Key.MASKED_PARAMETERS] = [recode(b) for b in record[Key.MASKED_PARAMETERS]]


def _packed(b: bytes) -> bytes:
    packed = pack(bytes_to_ndarray(b))
    return b if packed is None or len(packed) >= len(b) else packed


def _unpacked(b: bytes) -> bytes:
    return ndarray_to_bytes(unpack(b)) if is_packed(b) else b


def pack_masked_vectors(reply) -> None:
    """Client side, on the reply secaggplus_mod built: each int64 masked vector, bit-packed."""
    _recode_masked_vectors(reply, _packed)


class UnpackingGrid:
    """The server's grid for the SecAgg+ workflow: bit-packed masked vectors are unpacked to the
    int64 arrays Flower's workflow sums, after the grid below counted them as they travelled."""

    def __init__(self, grid):
        self._grid = grid

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            _recode_masked_vectors(r, _unpacked)
        return replies
