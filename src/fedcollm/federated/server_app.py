"""The server: one legacy-workflow round loop for plain and secure aggregation alike.

Flower 1.42's SecAgg+ exists only on the legacy workflow API, so the whole app uses it:
`DefaultWorkflow` with `SecAggPlusWorkflow` as its fit workflow when secure aggregation is on.
The strategy's `aggregate_fit` receives the (unmasked) aggregate either way and runs the KD.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow

from fedcollm.config import Config
from fedcollm.federated.app_config import config_from_run_config
from fedcollm.federated.strategy import FedCoLLMStrategy
from fedcollm.federated.traffic import CountingGrid
from fedcollm.models.lora import adapter_numel, base_numel
from fedcollm.report import Recorder, build_summary, write_outputs


def run_server(grid, context, cfg: Config) -> dict:
    t0 = time.time()
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(cfg.to_toml())
    recorder = Recorder(out)
    counting = CountingGrid(grid, cfg.federation.round_timeout)
    strategy = FedCoLLMStrategy(cfg, recorder, counting)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.federation.rounds),
                           strategy=strategy)
    DefaultWorkflow(fit_workflow=None)(counting, legacy)

    strategy.slm.save_pretrained(out / "adapters" / "slm")
    strategy.llm.save_pretrained(out / "adapters" / "llm")
    full = base_numel(strategy.slm)
    comm = {"adapter_params": adapter_numel(strategy.slm), "full_slm_params": full,
            "full_slm_fp32_bytes": 4 * full}
    summary = build_summary(recorder.rows, comm, {
        "dataset": cfg.data.dataset, "eval_split": cfg.data.eval_split,
        "num_clients": cfg.data.num_clients, "llm_model": cfg.model.llm,
        "slm_model": cfg.model.slm or f"{cfg.model.llm} layers 0-{cfg.model.slm_keep_first - 1} + last {cfg.model.slm_keep_last}",
        "secure_aggregation": cfg.federation.secure_aggregation, "seed": cfg.run.seed,
        "config_digest": cfg.digest(), "wall_s": time.time() - t0})
    write_outputs(out, recorder.rows, summary, shlex.join(["fedcollm", *sys.argv[1:]]))
    return summary


def make_server_app(cfg: Config | None = None) -> ServerApp:
    """A ServerApp bound to `cfg`, or (None) reading it from the run config (`flwr run`)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        run_server(grid, context, cfg or config_from_run_config(context.run_config))

    return server_app


app = make_server_app()
