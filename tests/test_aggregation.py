"""Server aggregation: the global adapter is the example-weighted mean of the client adapters."""

from __future__ import annotations

import dataclasses

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedcollm.federated.strategy import FedCoLLMStrategy
from fedcollm.models.lora import adapter_to_ndarrays
from fedcollm.report import Recorder


def test_aggregate_is_example_weighted_mean(smoke_cfg, tmp_path):
    # distill.epochs = 0: no KD steps, so the broadcast adapter is the aggregate itself.
    cfg = dataclasses.replace(smoke_cfg, distill=dataclasses.replace(smoke_cfg.distill, epochs=0))
    strategy = FedCoLLMStrategy(cfg, Recorder(tmp_path, echo=False))
    base = adapter_to_ndarrays(strategy.slm)
    rng = np.random.default_rng(0)
    clients = [[a + rng.normal(size=a.shape).astype(np.float32) for a in base] for _ in range(3)]
    weights = [5, 1, 14]
    results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(c), w, {"loss": 1.0}))
               for c, w in zip(clients, weights)]
    params, _ = strategy.aggregate_fit(1, results, [])
    got = parameters_to_ndarrays(params)
    for i, arr in enumerate(got):
        expected = sum(w * c[i] for c, w in zip(clients, weights)) / sum(weights)
        np.testing.assert_allclose(arr, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[0], np.mean([c[0] for c in clients], axis=0)), "unweighted mean"
