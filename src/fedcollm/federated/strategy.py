"""FedCoLLM's server round on top of Flower's FedAvg: aggregate → mutual KD → broadcast.

`aggregate_fit` gets the client adapters (or, with SecAgg+, only their already-unmasked
weighted mean), lets Flower's FedAvg average them, then runs mutual KD between the LLM and the
aggregated SLM on the auxiliary data; what it returns is the adapter broadcast next round.
`evaluate` scores the global SLM and the LLM after every round (round 0 = zero-shot).
"""

from __future__ import annotations

import time

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from fedcollm import components
from fedcollm.config import Config
from fedcollm.errors import FedCoLLMError
from fedcollm.eval.mcq import evaluate
from fedcollm.models.lora import adapter_to_ndarrays, load_adapter_ndarrays
from fedcollm.report import Recorder
from fedcollm.train.distill import mutual_distill


class FedCoLLMStrategy(FedAvg):
    def __init__(self, cfg: Config, recorder: Recorder, grid=None):
        k = cfg.data.num_clients
        n_fit = max(1, round(cfg.federation.fraction_fit * k))
        super().__init__(
            fraction_fit=cfg.federation.fraction_fit, fraction_evaluate=0.0,
            min_fit_clients=n_fit, min_available_clients=k, min_evaluate_clients=0,
            on_fit_config_fn=lambda rnd: {"round": rnd})
        self.cfg = cfg
        self.recorder = recorder
        self.grid = grid  # a CountingGrid, read after each fit round
        self.device = components.device_of(cfg)
        self.tokenizer = components.tokenizer(cfg)
        self.data = components.run_data(cfg)
        self.llm = components.build_llm(cfg)
        self.slm = components.build_slm(cfg)
        self.round_stats: dict = {}

    def __repr__(self) -> str:
        return "FedCoLLMStrategy(FedAvg + server mutual KD)"

    def initialize_parameters(self, client_manager):
        return ndarrays_to_parameters(adapter_to_ndarrays(self.slm))

    def aggregate_fit(self, server_round, results, failures):
        t0 = time.time()
        stats: dict = {"clients_ok": len(results), "clients_failed": len(failures)}
        if self.grid is not None:
            down, up = self.grid.take()
            stats["bytes_down_per_client"] = float(np.mean(list(down.values()))) if down else 0.0
            stats["bytes_up_per_client"] = float(np.mean(list(up.values()))) if up else 0.0
        if results:  # plain FedAvg: per-client train metrics are visible
            losses = [(r.num_examples, r.metrics.get("loss", float("nan"))) for _, r in results]
            n = sum(w for w, _ in losses)
            stats["client_loss"] = sum(w * x for w, x in losses) / max(n, 1)
        if not results:
            first = failures[0] if failures else "no reply"
            raise FedCoLLMError(f"round {server_round}: no client returned an update "
                                f"({len(failures)} failed; first: {str(first).strip()[:300]!r})")
        params, _ = super().aggregate_fit(server_round, results, failures)
        load_adapter_ndarrays(self.slm, parameters_to_ndarrays(params))
        stats["aggregate_s"] = time.time() - t0
        t1 = time.time()
        kd = mutual_distill(
            self.llm, self.slm, self.data.aux, self.cfg.distill,
            pad_id=self.tokenizer.pad_token_id, seed=self.cfg.run.seed * 7919 + server_round,
            device=self.device, progress=self.cfg.run.progress)
        stats.update({f"kd_{k}": v for k, v in kd.items()})
        stats["kd_s"] = time.time() - t1
        self.round_stats = stats
        return ndarrays_to_parameters(adapter_to_ndarrays(self.slm)), {}

    def evaluate(self, server_round, parameters):
        t0 = time.time()
        load_adapter_ndarrays(self.slm, parameters_to_ndarrays(parameters))
        kw = dict(max_length=self.cfg.data.max_length, batch_size=self.cfg.run.eval_batch_size,
                  device=self.device, progress=self.cfg.run.progress)
        slm = evaluate(self.slm, self.tokenizer, self.data.evals, desc=f"eval SLM r{server_round}", **kw)
        llm = evaluate(self.llm, self.tokenizer, self.data.evals, desc=f"eval LLM r{server_round}", **kw)
        row = {"round": server_round, "slm": slm, "llm": llm, **self.round_stats,
               "eval_s": time.time() - t0}
        self.round_stats = {}
        self.recorder.add_round(row)
        return 0.0, {"slm_acc": slm["acc"], "llm_acc": llm["acc"]}
