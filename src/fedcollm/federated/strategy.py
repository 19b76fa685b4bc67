"""FedCoLLM's server round on top of Flower's FedAvg: aggregate → mutual KD → broadcast.

`aggregate_fit` gets the client adapters (or, with SecAgg+, only their already-unmasked
weighted mean, the same for every result), lets Flower's FedAvg average them, then runs mutual
KD between the LLM and the aggregated SLM on the auxiliary data; what it returns is the adapter
broadcast next round. `evaluate` scores the global SLM and the LLM after every round (round 0 is
zero-shot) and writes the round's metrics line.

A round that yields no aggregate (no client answered, or SecAgg+ halted below its threshold)
keeps the previous global adapter, is logged with its reason, and ends the run cleanly: the
remaining rounds select no clients, and the server writes its outputs from the last good state.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg
from tqdm.auto import tqdm

from fedcollm import components
from fedcollm.config import Config
from fedcollm.eval.mcq import evaluate
from fedcollm.models.lora import adapter_to_ndarrays, load_adapter_ndarrays
from fedcollm.report import Recorder
from fedcollm.train.distill import mutual_distill


def _mean_bytes(per_node: dict[int, int]) -> float:
    return float(np.mean(list(per_node.values()))) if per_node else 0.0


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
        self.grid = grid  # a CountingGrid, read after each round
        self.device = components.device_of(cfg)
        self.tokenizer = components.tokenizer(cfg)
        self.data = components.run_data(cfg)
        self.llm = components.build_llm(cfg)
        self.slm = components.build_slm(cfg)
        self.round_stats: dict = {}
        self.stopped: str | None = None  # why the run ended early, if it did
        self.failed_round: int | None = None
        self.sampled = 0  # clients asked to fit this round
        self.rounds_bar = tqdm(total=cfg.federation.rounds, desc="rounds", unit="round",
                               disable=not cfg.run.progress)

    def __repr__(self) -> str:
        return "FedCoLLMStrategy(FedAvg + server mutual KD)"

    def initialize_parameters(self, client_manager):
        return ndarrays_to_parameters(adapter_to_ndarrays(self.slm))

    def configure_fit(self, server_round, parameters, client_manager):
        if self.stopped:
            return []
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.sampled = len(instructions)
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        # (Flower's SecAgg+ can list one client's failure twice: count clients, not entries.)
        stats: dict = {"clients_ok": len(results), "clients_failed": self.sampled - len(results),
                       "failures": sorted({str(f)[:300] for f in failures})}
        self.round_stats = stats
        if not results:
            first = stats["failures"][0] if failures else "no reply"
            self.stopped = f"no client returned an update ({len(failures)} failed; first: {first!r})"
            return None, {}
        losses = [(r.num_examples, r.metrics.get("loss", float("nan"))) for _, r in results]
        stats["client_loss"] = sum(w * x for w, x in losses) / max(sum(w for w, _ in losses), 1)
        stats["client_examples"] = [r.num_examples for _, r in results]
        params, _ = super().aggregate_fit(server_round, results, failures)
        load_adapter_ndarrays(self.slm, parameters_to_ndarrays(params))
        t1 = time.time()
        kd = mutual_distill(
            self.llm, self.slm, self.data.aux, self.cfg.distill,
            pad_id=self.tokenizer.pad_token_id, seed=self.cfg.run.seed * 7919 + server_round,
            device=self.device, progress=self.cfg.run.progress)
        stats.update({f"kd_{k}": v for k, v in kd.items()})
        stats["kd_s"] = time.time() - t1
        return ndarrays_to_parameters(adapter_to_ndarrays(self.slm)), {}

    def evaluate(self, server_round, parameters):
        if server_round > 0 and "kd_steps" not in self.round_stats:
            if self.failed_round is None:  # this round produced no aggregate: log it once
                # (SecAgg+ that halts below its threshold never calls aggregate_fit)
                self.stopped = self.stopped or (
                    "secure aggregation halted: fewer clients survived than its reconstruction threshold")
                self.failed_round = server_round
                self.recorder.add_failed_round(
                    {"round": server_round, "failed": self.stopped, **self.round_stats, **self._take_bytes()})
            self.round_stats = {}
            return None
        t0 = time.time()
        load_adapter_ndarrays(self.slm, parameters_to_ndarrays(parameters))
        kw = dict(max_length=self.cfg.data.max_length, batch_size=self.cfg.run.eval_batch_size,
                  device=self.device, progress=self.cfg.run.progress)
        slm = evaluate(self.slm, self.tokenizer, self.data.evals, desc=f"eval SLM r{server_round}", **kw)
        llm = evaluate(self.llm, self.tokenizer, self.data.evals, desc=f"eval LLM r{server_round}", **kw)
        row = {"round": server_round, "slm": slm, "llm": llm, **self.round_stats,
               **(self._take_bytes() if server_round else {}), "eval_s": time.time() - t0}
        self.round_stats = {}
        self.recorder.add_round(row)
        self.rounds_bar.update(1 if server_round else 0)
        return 0.0, {"slm_acc": slm["acc"], "llm_acc": llm["acc"]}

    def _take_bytes(self) -> dict:
        if self.grid is None:
            return {}
        down, up = self.grid.take()
        return {"bytes_down_per_client": _mean_bytes(down), "bytes_up_per_client": _mean_bytes(up)}
