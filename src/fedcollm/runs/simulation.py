"""Run the FedCoLLM Flower app on Flower's simulation engine (Ray), in this process."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from fedcollm import components
from fedcollm.config import Config, check_device_name, check_files
from fedcollm.errors import FedCoLLMError
from fedcollm.models.loading import resolve_source


def client_resources(cfg: Config, cuda_available: bool, gpu_count: int, cpus: int) -> dict:
    """Ray resources of one simulated client.

    Ray hides the GPU from an actor that asks for none (CUDA_VISIBLE_DEVICES=""), so a run on a
    GPU must give its clients a share, or they would silently train on the CPU. `auto` splits the
    GPUs among the clients that can train at once: min(clients per round, cores / client_cpus).
    """
    f = cfg.federation
    check_device_name(cfg.model.device, "config: model.device", cuda_available)  # else Ray: "ActorPool is empty"
    if not cfg.on_cuda(cuda_available):
        if f.client_gpus not in ("auto", 0.0):
            raise FedCoLLMError(f"config: federation.client_gpus = {f.client_gpus} but model.device = "
                                f"{cfg.model.device!r} resolves to the CPU; set it to 0 or 'auto'")
        return {"num_cpus": f.client_cpus, "num_gpus": 0.0}
    if f.client_gpus == 0.0:
        raise FedCoLLMError(f"config: model.device = {cfg.model.device!r} runs on the GPU but federation.client_gpus "
                            "= 0 hides it from the simulated clients; set federation.client_gpus to 'auto' or a "
                            "share such as 0.25 (or model.device = 'cpu' for a CPU-only run)")
    if f.client_gpus != "auto":
        return {"num_cpus": f.client_cpus, "num_gpus": float(f.client_gpus)}
    per_round = max(1, round(f.fraction_fit * cfg.data.num_clients))
    parallel = max(1, min(per_round, cpus // f.client_cpus))
    share = min(1.0, max(gpu_count, 1) / parallel)
    return {"num_cpus": f.client_cpus, "num_gpus": math.floor(share * 1e4) / 1e4}  # Ray's precision


def prepare(cfg: Config) -> None:
    """Fail fast on bad models or data, and convert GGUF sources once, here, before clients
    start converting them concurrently. The server thread reuses the cached data."""
    check_files(cfg)
    for source in (cfg.model.llm, cfg.model.slm):
        if source and source != "tiny-random":
            resolve_source(source, cfg.model.cache_dir)
    components.server_data(cfg)


def run_simulation(cfg: Config, observe=None, extra_mods=()) -> dict:
    """Run cfg in Flower's simulation engine; return the summary.

    observe(strategy, grid) and extra_mods are instrumentation hooks (tests, benchmarks).
    """
    import torch  # noqa: PLC0415
    from flwr.simulation import run_simulation as flwr_run_simulation  # noqa: PLC0415

    from fedcollm.federated.client_app import make_client_app  # noqa: PLC0415
    from fedcollm.federated.server_app import make_server_app  # noqa: PLC0415

    cpus = os.cpu_count() or 1
    resources = client_resources(cfg, torch.cuda.is_available(), torch.cuda.device_count(), cpus)
    prepare(cfg)
    out = Path(cfg.run.out_dir)
    summary_path = out / "summary.json"
    summary_path.unlink(missing_ok=True)
    # Ray starts one idle Python worker per logical CPU when the driver connects and waits for
    # them (16 on a 16-core GPU host, 96 for 6 experiment jobs at once, ~70 MB each), while the
    # simulation needs one worker per client actor, started on demand anyway.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # Ray folds lines from two actors that differ only in their numbers into one ("[repeated 2x
    # across cluster]"): client 1's progress would hide behind client 0's. Our own lines always
    # show (read when ray is first imported, which the simulation below does).
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"^\[fedcollm\] ")
    backend = {
        "client_resources": resources,
        "init_args": {"num_cpus": max(cpus, cfg.federation.client_cpus), "include_dashboard": False},
    }
    flwr_run_simulation(server_app=make_server_app(cfg, observe), client_app=make_client_app(cfg, extra_mods),
                        num_supernodes=cfg.data.num_clients, backend_config=backend)
    if not summary_path.is_file():
        raise FedCoLLMError(f"the simulation ended without writing {summary_path} (see the log above)")
    return json.loads(summary_path.read_text())
