"""Secure aggregation with Flower's SecAgg+: workflow settings and the value-range guard.

SecAgg+ clips every value to ±clipping_range before quantizing, silently. Clients check their
adapter first and refuse (a clear error) instead, so an aggregate is never silently wrong.
"""

from __future__ import annotations

import numpy as np
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
