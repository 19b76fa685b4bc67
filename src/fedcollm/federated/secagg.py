"""Secure aggregation with Flower's SecAgg+: workflow settings, the value-range guard, and a
compact uplink for its masked vectors.

SecAgg+ clips every value to ±clipping_range before quantizing, silently. Clients check their
adapter first and refuse (a clear error) instead, so an aggregate is never silently wrong.

Flower ships each client's masked vector as int64, though every value is reduced modulo its
modulus (2^32 by default) and so fits in uint32: the client narrows the masked vector to uint32
after `secaggplus_mod` made it (`narrow_masked_vectors`), the server widens it back before the
workflow sums it (`WideningGrid`). Lossless, and half of SecAgg+'s uplink. A vector with a value
of 2^32 or more (a larger modulus) travels as Flower made it.
"""

from __future__ import annotations

import numpy as np
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.workflow import SecAggPlusWorkflow

from fedcollm.config import Config
from fedcollm.errors import FedCoLLMError


def check_in_range(arrays: list[np.ndarray], clipping_range: float, who: str) -> None:
    peak = max(float(np.max(np.abs(a))) for a in arrays if a.size)
    if not np.isfinite(peak) or peak > clipping_range:
        raise FedCoLLMError(
            f"{who}: adapter value {peak:.4g} is outside the secure-aggregation range "
            f"±{clipping_range:g}; raise federation.secagg_clipping_range")


def make_fit_workflow(cfg: Config, max_weight: int) -> SecAggPlusWorkflow:
    """SecAgg+ as the fit stage of the legacy DefaultWorkflow.

    max_weight is the largest client part: each client's weight n_k / max_weight is then ≤ 1,
    as SecAgg+ needs, and as large as possible (its quantization precision scales with it).
    """
    f = cfg.federation
    return SecAggPlusWorkflow(
        num_shares=float(f.secagg_num_shares),
        reconstruction_threshold=float(f.secagg_reconstruction_threshold),
        max_weight=float(max_weight), clipping_range=f.secagg_clipping_range,
        quantization_range=f.secagg_quantization_range, timeout=f.round_timeout)


def error_bound(cfg: Config, weights: list[int], max_weight: int) -> float:
    """Worst-case max abs error of the SecAgg+ weighted mean against exact FedAvg.

    Each client sends round(x·w/W · Q/2c) with stochastic rounding (error < 1 level), so the
    sum is off by < N levels of 2c/Q, divided back by Σ w/W.
    """
    f = cfg.federation
    step = 2 * f.secagg_clipping_range / f.secagg_quantization_range
    return len(weights) * step / (sum(weights) / max_weight)


def _recode_masked_vectors(msg, recode) -> None:
    """Apply `recode` to every array of a SecAgg+ masked-vector reply (no-op on other messages)."""
    if not msg.has_content():
        return
    record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if record is None or Key.MASKED_PARAMETERS not in record:
        return
    vectors = record[Key.MASKED_PARAMETERS]
    record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(recode(bytes_to_ndarray(b))) for b in vectors]


def _narrow(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.int64 and (a.size == 0 or (a.min() >= 0 and a.max() < 2**32)):
        return a.astype(np.uint32)
    return a


def _widen(a: np.ndarray) -> np.ndarray:
    return a.astype(np.int64) if a.dtype == np.uint32 else a


def narrow_masked_vectors(reply) -> None:
    """Client side, on the reply secaggplus_mod built: int64 masked values → uint32."""
    _recode_masked_vectors(reply, _narrow)


class WideningGrid:
    """The server's grid for the SecAgg+ workflow: masked vectors that arrive as uint32 are
    widened back to the int64 Flower's workflow sums (its modular sum would not fit in uint32)."""

    def __init__(self, grid):
        self._grid = grid

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            _recode_masked_vectors(r, _widen)
        return replies
