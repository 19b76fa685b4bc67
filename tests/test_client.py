"""The client's fit: trains only the adapter it was sent, on its own data."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_mcq

from fedcollm import components
from fedcollm.config import load_config
from fedcollm.errors import FedCoLLMError
from fedcollm.federated.client_app import SLMClient
from fedcollm.federated.reference import ServerReference
from fedcollm.federated.transport import decode
from fedcollm.models.lora import adapter_to_ndarrays


def first_message(cfg) -> tuple[list[np.ndarray], dict]:
    """Round 1's downlink message: the initial global adapter, as the server sends it."""
    server = ServerReference(cfg.transport_mode())
    server.publish(adapter_to_ndarrays(components.build_slm(cfg)))
    arrays, meta = server.message(node=0)
    return arrays, {"round": 1, **meta}


def test_fit_on_own_partition_and_on_own_file(smoke_cfg, tmp_path):
    message, config = first_message(smoke_cfg)
    arrays, n, metrics = SLMClient(smoke_cfg, 2).fit(message, config)
    assert n == len(components.client_examples(smoke_cfg, 2)) and metrics["partition"] == 2
    # int4 (the default) sends the change against the adapter it was sent: it trained, so not zero
    assert any(np.any(c != 0) for c in decode(arrays, smoke_cfg.transport_mode()))
    again, _, _ = SLMClient(smoke_cfg, 2).fit(message, config)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, again)), "same round, same client: same update"
    own = write_mcq(tmp_path / "mine.jsonl", 7, seed=5)
    _, n_own, _ = SLMClient(smoke_cfg, 0, str(own)).fit(message, config)
    assert n_own == 7


def test_a_client_above_the_servers_weight_cap_refuses(smoke_cfg, tmp_path):
    """A SuperNode whose own file holds more examples than the server allows says so, instead of
    letting SecAgg+ overflow (it only logs a warning) or the server reject it without a reason."""
    message, config = first_message(smoke_cfg)
    own = write_mcq(tmp_path / "big.jsonl", 9, seed=6)
    with pytest.raises(FedCoLLMError, match=r"client 1: 9 training examples exceed the server's "
                                            r"federation.max_client_examples = 5"):
        SLMClient(smoke_cfg, 1, str(own)).fit(message, {**config, "max_examples": 5})


def test_a_clients_training_shows_its_progress(smoke_cfg, smoke_overrides, capsys, monkeypatch):
    """A round of a client on a whole training split can take many minutes: with run.progress on,
    its steps show (as lines: a simulated client has no terminal), named by client and round."""
    monkeypatch.setattr("fedcollm.progress.PROGRESS_SECONDS", 0.0)
    message, config = first_message(smoke_cfg)
    SLMClient(smoke_cfg, 2).fit(message, config)
    assert ": step " not in capsys.readouterr().out  # the fixture's run.progress = false
    shown = load_config(overrides=[*smoke_overrides, "run.progress=true"], preset="smoke")
    SLMClient(shown, 2).fit(message, config)
    assert "[fedcollm] client 2 round 1: step 1 of " in capsys.readouterr().out


def test_a_client_out_of_memory_says_which_settings_give_memory_back(smoke_cfg, monkeypatch):
    """torch's message says how many bytes were missing; the one line says where, and what to set."""
    import torch

    def oom(*_, **__):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity")

    monkeypatch.setattr("fedcollm.train.sft.sft_step", oom)
    message, config = first_message(smoke_cfg)
    with pytest.raises(FedCoLLMError) as got:
        SLMClient(smoke_cfg, 2).fit(message, config)
    assert str(got.value) == (
        "client 2 round 1: SFT on cpu: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
        "total capacity); set model.activation_checkpointing = true (the same numbers, ~10x less activation "
        "memory), or client.micro_batch_size below client.batch_size = 4 (the same step in smaller forward passes)")

    def broken(*_, **__):
        raise RuntimeError("a bug keeps its traceback")

    monkeypatch.setattr("fedcollm.train.sft.sft_step", broken)
    with pytest.raises(RuntimeError, match="a bug keeps its traceback"):
        SLMClient(smoke_cfg, 2).fit(message, config)
