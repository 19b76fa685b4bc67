"""Where clients train: a GPU share for simulated clients when the run is on CUDA (never a
silent CPU fallback), nothing asked of Ray on a CPU run. CUDA's presence is a parameter here;
the real GPU run is benchmarks/gpu_throughput.py."""

from __future__ import annotations

import pytest

from fedcollm.config import load_config
from fedcollm.errors import FedCoLLMError
from fedcollm.runs.simulation import client_resources


def _cfg(*overrides):
    return load_config(overrides=list(overrides))


def test_auto_share_on_a_gpu_host_splits_the_gpu_among_parallel_clients():
    assert client_resources(_cfg(), cuda_available=True, gpu_count=1, cpus=16) == {"num_cpus": 1, "num_gpus": 0.25}
    # Only 2 cores: 2 clients train at once, each gets half the GPU.
    assert client_resources(_cfg(), True, 1, cpus=2)["num_gpus"] == 0.5
    # 3 clients a round: a third each, rounded down to Ray's precision (3 × 0.3333 ≤ 1).
    assert client_resources(_cfg("data.num_clients=3"), True, 1, 16)["num_gpus"] == 0.3333
    # 100 clients, 10 a round, 16 cores: 10 at once.
    assert client_resources(_cfg("data.num_clients=100", "federation.fraction_fit=0.1"), True, 1, 16)["num_gpus"] == 0.1
    # 4 GPUs for 4 clients: a whole GPU each.
    assert client_resources(_cfg(), True, 4, 16)["num_gpus"] == 1.0


def test_cpu_run_asks_ray_for_no_gpu():
    assert client_resources(_cfg(), cuda_available=False, gpu_count=0, cpus=2) == {"num_cpus": 1, "num_gpus": 0.0}
    assert client_resources(_cfg('model.device="cpu"'), True, 1, 16)["num_gpus"] == 0.0


def test_an_explicit_share_is_passed_through():
    assert client_resources(_cfg("federation.client_gpus=0.5"), True, 1, 16)["num_gpus"] == 0.5


@pytest.mark.parametrize("overrides,cuda,message", [
    (("federation.client_gpus=0",), True,
     "config: model.device = 'auto' runs on the GPU but federation.client_gpus = 0 hides it from the simulated "
     "clients; set federation.client_gpus to 'auto' or a share such as 0.25 (or model.device = 'cpu' for a "
     "CPU-only run)"),
    (('model.device="cuda"', "federation.client_gpus=0"), True, "model.device = 'cuda' runs on the GPU"),
    (("federation.client_gpus=0.5",), False,
     "config: federation.client_gpus = 0.5 but model.device = 'auto' resolves to the CPU; set it to 0 or 'auto'"),
])
def test_settings_that_would_hide_or_invent_a_gpu_are_refused(overrides, cuda, message):
    with pytest.raises(FedCoLLMError) as err:
        client_resources(_cfg(*overrides), cuda_available=cuda, gpu_count=int(cuda), cpus=16)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_gpu_the_host_lacks_is_refused_in_one_line_before_ray_starts():
    # Without the check, Ray fails with "ActorPool is empty" deep in Flower's simulation.
    for device in ("cuda", "cuda:1"):
        with pytest.raises(FedCoLLMError) as err:
            client_resources(_cfg(f'model.device="{device}"'), cuda_available=False, gpu_count=0, cpus=16)
        assert str(err.value) == (f"config: model.device = '{device}' but torch sees no CUDA device; "
                                  "set it to 'auto' or 'cpu'")


def test_a_malformed_device_is_refused_by_the_config():
    with pytest.raises(FedCoLLMError, match=r"model.device = 'gpu' is not one of auto, cpu, cuda, cuda:N, mps"):
        _cfg('model.device="gpu"')
    assert _cfg('model.device="cuda:1"').model.device == "cuda:1"


def test_a_cuda_index_beyond_the_hosts_devices_is_refused(monkeypatch):
    import torch  # noqa: PLC0415

    from fedcollm.models.loading import resolve_device  # noqa: PLC0415

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(FedCoLLMError, match=r"model.device = 'cuda:1' but torch sees 1 CUDA device\(s\)"):
        resolve_device("cuda:1")


def test_auto_dtype_is_bf16_on_cuda_and_fp32_on_cpu():
    import torch  # noqa: PLC0415

    from fedcollm.models.loading import resolve_dtype  # noqa: PLC0415

    assert _cfg().model.dtype == "auto"
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_where_clients_train_is_not_part_of_the_digest():
    # Cached results stay found when concurrent experiment jobs pack their clients differently.
    assert _cfg("federation.client_gpus=1.0").digest() == _cfg().digest() == _cfg("federation.client_gpus=0.25").digest()
    assert _cfg("federation.rounds=2").digest() != _cfg().digest()


def test_a_gpu_run_and_a_cpu_run_do_not_share_cached_results(monkeypatch):
    # dtype "auto" is bf16 on a GPU, fp32 on a CPU: different numbers, so different digests;
    # on a CPU the digest is what it always was (results/default's summary.json holds it).
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import torch  # noqa: PLC0415

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = _cfg().digest()
    committed = Path(__file__).resolve().parents[1] / "results" / "default" / "summary.json"
    assert cpu == json.loads(committed.read_text())["config_digest"]
    assert _cfg('model.device="cpu"').digest() != cpu  # (a changed field, as before)
    forced_cpu = _cfg('model.device="cpu"').digest()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = _cfg().digest()
    assert gpu != cpu and gpu == _cfg('model.dtype="bfloat16"').digest()
    assert _cfg('model.device="cpu"').digest() == forced_cpu  # fp32 on a GPU host too


def test_jobs_beside_others_on_a_gpu_train_their_clients_in_one_actor(monkeypatch):
    import torch  # noqa: PLC0415

    from fedcollm.experiment.runner import sharing_one_gpu  # noqa: PLC0415

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sharing_one_gpu(_cfg()).federation.client_gpus == 1.0
    assert client_resources(sharing_one_gpu(_cfg()), True, 1, cpus=16) == {"num_cpus": 1, "num_gpus": 1.0}
    assert sharing_one_gpu(_cfg("federation.client_gpus=0.5")).federation.client_gpus == 0.5  # the user's choice
    assert sharing_one_gpu(_cfg('model.device="cpu"')).federation.client_gpus == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sharing_one_gpu(_cfg()).federation.client_gpus == "auto"
