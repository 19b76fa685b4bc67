"""Server aggregation: the example-weighted mean of the valid client adapters, with each
client's claimed weight capped and its step θ_k − θ_global bounded."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedcollm.federated.strategy import FedCoLLMStrategy
from fedcollm.models.lora import adapter_to_ndarrays
from fedcollm.report import Recorder


@pytest.fixture
def strategy(smoke_cfg, tmp_path):
    # distill.epochs = 0: no KD steps, so the broadcast adapter is the aggregate itself; fp32
    # transport: the results below are built as plain fp32 arrays and the broadcast read back as such.
    cfg = dataclasses.replace(smoke_cfg, distill=dataclasses.replace(smoke_cfg.distill, epochs=0),
                              federation=dataclasses.replace(smoke_cfg.federation, max_client_examples=20,
                                                             max_update_norm=50.0, transport="fp32"))
    strategy = FedCoLLMStrategy(cfg, Recorder(tmp_path, echo=False))
    strategy.initialize_parameters(None)  # the reference the clients' updates are checked against
    return strategy


def _results(clients, weights):
    return [(_Proxy(str(k)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(c), w, {"loss": 1.0, "partition": k}))
            for k, (c, w) in enumerate(zip(clients, weights))]


def _noisy(base, rng, scale=0.1):
    return [a + rng.normal(scale=scale, size=a.shape).astype(np.float32) for a in base]


def test_aggregate_is_example_weighted_mean(strategy):
    base = adapter_to_ndarrays(strategy.slm)
    rng = np.random.default_rng(0)
    clients = [_noisy(base, rng) for _ in range(3)]
    weights = [5, 1, 14]
    params, _ = strategy.aggregate_fit(1, _results(clients, weights), [])
    got = parameters_to_ndarrays(params)
    for i, arr in enumerate(got):
        expected = sum(w * c[i] for c, w in zip(clients, weights)) / sum(weights)
        np.testing.assert_allclose(arr, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[0], np.mean([c[0] for c in clients], axis=0)), "unweighted mean"


def test_a_client_claiming_a_billion_examples_is_rejected(strategy):
    base = adapter_to_ndarrays(strategy.slm)
    rng = np.random.default_rng(1)
    honest, liar = [_noisy(base, rng) for _ in range(2)], _noisy(base, rng)
    params, _ = strategy.aggregate_fit(1, _results([*honest, liar], [10, 10, 10**9]), [])
    got = parameters_to_ndarrays(params)
    np.testing.assert_allclose(got[0], (honest[0][0] + honest[1][0]) / 2, rtol=1e-5, atol=1e-6)
    (rejected,) = strategy.round_stats["rejected"]
    assert rejected["client"] == 2
    assert rejected["reason"] == "example count 1000000000 exceeds federation.max_client_examples = 20"


def test_the_norm_check_measures_the_update_not_the_adapter(strategy):
    base = adapter_to_ndarrays(strategy.slm)
    # The global adapter itself is large (norm well above 50): a client that barely moves it passes.
    big_global = [a * 0 + 3.0 for a in base]
    assert np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in big_global)) > 50
    strategy.reference.publish(big_global)  # fp32 transport: the clients hold it as it is
    rng = np.random.default_rng(2)
    small_step = _noisy(big_global, rng, scale=1e-3)
    big_step = [a + 1.0 for a in big_global]  # ‖Δ‖ = sqrt(#params) ≫ 50
    strategy.aggregate_fit(1, _results([small_step, big_step], [10, 10]), [])
    (rejected,) = strategy.round_stats["rejected"]
    assert rejected["client"] == 1
    assert rejected["reason"].startswith("update norm ‖θ_k − θ_global‖ = ")
    assert rejected["reason"].endswith("exceeds federation.max_update_norm = 50")
    assert strategy.round_stats["clients_ok"] == 1


class _Proxy:  # the part of a ClientProxy that a client manager and FedAvg's sampling use
    def __init__(self, cid: str):
        self.cid, self.node_id = cid, int(cid)


def _manager(n: int):
    from flwr.server.client_manager import SimpleClientManager  # noqa: PLC0415

    cm = SimpleClientManager()
    for i in range(n):
        cm.register(_Proxy(str(i)))
    return cm


@pytest.mark.parametrize("min_clients,expected", [(1, 2), (3, 0)])
def test_a_round_waits_at_most_round_timeout_for_missing_clients(smoke_cfg, tmp_path, min_clients, expected):
    """2 of 4 clients connected: after round_timeout the round goes on with them if that is at
    least min_clients, and stops the run with the reason if not (Flower alone waits 24 hours)."""
    import time  # noqa: PLC0415

    cfg = dataclasses.replace(smoke_cfg, federation=dataclasses.replace(
        smoke_cfg.federation, round_timeout=1.0, min_clients=min_clients))
    strategy = FedCoLLMStrategy(cfg, Recorder(tmp_path, echo=False))
    t0 = time.time()
    chosen = strategy.configure_fit(1, strategy.initialize_parameters(None), _manager(2))
    assert time.time() - t0 < 10
    assert len(chosen) == expected
    if expected == 0:
        assert strategy.stopped == f"2 clients connected, fewer than federation.min_clients = {min_clients}"


def test_what_a_lossy_broadcast_rounded_off_travels_with_the_next_change(smoke_cfg, tmp_path):
    """Error feedback: under int1 the first broadcast R0 is the sign of the server's adapter θ0
    at each group's mean magnitude, far from θ0. The server keeps θ0 and adds the clients' mean
    change to it (not to R0), so the next broadcast carries θ0 − R0 too, and the clients' R
    closes in on the server's adapter; the SLM is scored and saved as R, what the clients hold."""
    from fedcollm import checkpoint  # noqa: PLC0415
    from fedcollm.federated import transport  # noqa: PLC0415

    cfg = dataclasses.replace(smoke_cfg, distill=dataclasses.replace(smoke_cfg.distill, epochs=0),
                              federation=dataclasses.replace(smoke_cfg.federation, transport="int1"))
    strategy = FedCoLLMStrategy(cfg, Recorder(tmp_path, echo=False))
    own0 = adapter_to_ndarrays(strategy.slm)
    r0 = parameters_to_ndarrays(strategy.initialize_parameters(None))
    gap0 = _distance(own0, r0)
    assert gap0 > 0.1 * _distance(own0, [0 * a for a in own0])  # 1 bit a value rounds off a lot
    # Each client moved every value by the same small step: int1 sends such a change exactly.
    steps = [1e-4, 3e-4]
    wires = [transport.encode([np.full_like(a, s) for a in r0], "int1") for s in steps]
    params, _ = strategy.aggregate_fit(1, _results(wires, [1, 1]), [])
    own1 = adapter_to_ndarrays(strategy.slm)
    for a, o in zip(own1, own0):
        np.testing.assert_allclose(a, o + np.mean(steps), rtol=1e-5, atol=1e-7)  # θ0 + the mean change
    r1 = parameters_to_ndarrays(params)
    assert _distance(own1, r1) < 0.9 * gap0
    strategy.evaluate(1, params)  # scores R1, then keeps its own adapter
    assert _distance(adapter_to_ndarrays(strategy.slm), own1) == 0
    saved = checkpoint.load(tmp_path)
    assert _distance([t.numpy() for t in saved["reference"]], r1) == 0
    strategy.hold_reference()  # as the run's end does, before saving adapters/slm
    assert _distance(adapter_to_ndarrays(strategy.slm), r1) == 0


def _distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.square(x.astype(np.float64) - y)) for x, y in zip(a, b))))
