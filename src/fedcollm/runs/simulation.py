"""Run the FedCoLLM Flower app on Flower's simulation engine (Ray), in this process."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedcollm import components
from fedcollm.config import Config
from fedcollm.errors import FedCoLLMError
from fedcollm.models.loading import resolve_source


def prepare(cfg: Config) -> None:
    """Fail fast on bad models or data, and convert GGUF sources once, here, before clients
    start converting them concurrently. The server thread reuses the cached data."""
    for source in (cfg.model.llm, cfg.model.slm):
        if source and source != "tiny-random":
            resolve_source(source, cfg.model.cache_dir)
    components.run_data(cfg)


def run_simulation(cfg: Config, observe=None, extra_mods=()) -> dict:
    """Run cfg in Flower's simulation engine; return the summary.

    observe(strategy, grid) and extra_mods are instrumentation hooks (tests, benchmarks).
    """
    from flwr.simulation import run_simulation as flwr_run_simulation  # noqa: PLC0415

    from fedcollm.federated.client_app import make_client_app  # noqa: PLC0415
    from fedcollm.federated.server_app import make_server_app  # noqa: PLC0415

    prepare(cfg)
    out = Path(cfg.run.out_dir)
    summary_path = out / "summary.json"
    summary_path.unlink(missing_ok=True)
    cpus = os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": cfg.federation.client_gpus},
        "init_args": {"num_cpus": max(cpus, cfg.federation.client_cpus), "include_dashboard": False},
    }
    flwr_run_simulation(server_app=make_server_app(cfg, observe), client_app=make_client_app(cfg, extra_mods),
                        num_supernodes=cfg.data.num_clients, backend_config=backend)
    if not summary_path.is_file():
        raise FedCoLLMError(f"the simulation ended without writing {summary_path} (see the log above)")
    return json.loads(summary_path.read_text())
