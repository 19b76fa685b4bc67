"""lora.freeze_a (FFA-LoRA): every party draws the same frozen A from the run's seed, B alone
trains and travels, and FedAvg of the B's is then the exact mean of the clients' updates B·A."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.common import parameters_to_ndarrays
from test_aggregation import _results
from test_client import first_message

from fedcollm import components
from fedcollm.errors import FedCoLLMError
from fedcollm.federated.client_app import SLMClient
from fedcollm.federated.strategy import FedCoLLMStrategy
from fedcollm.federated.transport import decode
from fedcollm.models.lora import adapter_state, adapter_to_ndarrays, frozen_a_digest, load_adapter_ndarrays
from fedcollm.report import Recorder


def _frozen(cfg):
    return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, freeze_a=True))


def _a_matrices(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}


def _deltas(model) -> list[torch.Tensor]:
    """Each adapted layer's update to its base weight, scale · B·A."""
    return [m.get_delta_weight("default").detach().clone() for m in model.modules() if hasattr(m, "get_delta_weight")]


def test_a_frozen_slm_trains_and_sends_b_alone(smoke_cfg):
    cfg = _frozen(smoke_cfg)
    torch.manual_seed(123)  # whatever the caller's RNG did before, the draw is the run seed's
    slm = components.build_slm(cfg)
    torch.rand(1000)
    other = components.build_slm(cfg)
    assert frozen_a_digest(slm) == frozen_a_digest(other) != ""
    assert frozen_a_digest(components.build_slm(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=7)))) \
        != frozen_a_digest(slm)
    keys = list(adapter_state(slm))
    assert keys and all(".lora_B." in k for k in keys)
    trained = adapter_state(components.build_slm(smoke_cfg))
    assert len(trained) == 2 * len(keys)  # A and B, as before
    assert frozen_a_digest(components.build_llm(cfg)) == ""  # the LLM's adapter never travels: A trains

    a_before = _a_matrices(components.cached_client_slm(cfg))
    message, config = first_message(cfg)  # int4, the default transport: decoded to count tensors
    assert len(decode(message, cfg.transport_mode())) == len(keys)
    wire, _, _ = SLMClient(cfg, 2).fit(message, {**config, "frozen_a": frozen_a_digest(slm)})
    arrays = decode(wire, cfg.transport_mode())
    assert [a.shape for a in arrays] == [tuple(t.shape) for t in adapter_state(slm).values()]
    after = _a_matrices(components.cached_client_slm(cfg))
    assert all(torch.equal(a_before[n], after[n]) for n in a_before), "A trained"
    assert any(np.any(a != 0) for a in arrays), "B did not train"


@pytest.mark.parametrize("servers", ["0123456789abcdef", ""])
def test_a_client_whose_frozen_a_is_not_the_servers_refuses(smoke_cfg, servers):
    cfg = _frozen(smoke_cfg)
    message, config = first_message(cfg)
    config = {**config, **({"frozen_a": servers} if servers else {})}
    with pytest.raises(FedCoLLMError, match=r"client 1: its frozen LoRA A \(digest [0-9a-f]{16}\) is not the "
                                            rf"server's \({servers or 'none: A trains'}\)"):
        SLMClient(cfg, 1).fit(message, config)


def test_with_a_frozen_fedavg_is_the_exact_mean_of_the_clients_updates(smoke_cfg, tmp_path):
    """The same three clients' B's, once with A frozen (everyone's A the same) and once with A
    trained (each client's A moved too): only the first aggregate's update B̄·A is the weighted
    mean of the clients' updates B_k·A_k."""
    weights, rng = [5, 1, 14], np.random.default_rng(0)
    for freeze in (True, False):
        cfg = dataclasses.replace(smoke_cfg, distill=dataclasses.replace(smoke_cfg.distill, epochs=0),
                                  lora=dataclasses.replace(smoke_cfg.lora, freeze_a=freeze),
                                  federation=dataclasses.replace(smoke_cfg.federation, transport="fp32",
                                                                 max_client_examples=20, max_update_norm=1e9))
        strategy = FedCoLLMStrategy(cfg, Recorder(tmp_path / str(freeze), echo=False))
        keys, base = list(adapter_state(strategy.slm)), parameters_to_ndarrays(strategy.initialize_parameters(None))
        clients = [[a + rng.normal(scale=0.1, size=a.shape).astype(np.float32) for a in base] for _ in weights]
        client_deltas = []
        for c in clients:  # each client's own update, on a copy of the server's SLM
            probe = components.build_slm(cfg)
            load_adapter_ndarrays(probe, c)
            client_deltas.append(_deltas(probe))
        a_before = _a_matrices(strategy.slm)
        strategy.aggregate_fit(1, _results(clients, weights), [])
        mean = [sum(w * d[i] for d, w in zip(client_deltas, weights)) / sum(weights) for i in range(len(client_deltas[0]))]
        exact = all(torch.allclose(got, want, atol=1e-6) for got, want in zip(_deltas(strategy.slm), mean))
        assert exact == freeze
        if freeze:
            assert all(torch.equal(a_before[n], a) for n, a in _a_matrices(strategy.slm).items())
            assert len(adapter_to_ndarrays(strategy.slm)) == len(keys)
