"""FedCoLLM's server round: validate → average (Flower's FedAvg, optionally inside Flower's DP
wrapper) → mutual KD → broadcast.

`aggregate_fit` gets the client adapters (or, with SecAgg+, only their already-unmasked
weighted mean, the same for every result), decodes and validates them, hands the valid ones to
the averaging strategy — `Averager`, Flower's FedAvg arithmetic, wrapped by Flower's
differential-privacy strategy when `privacy.mode` is on, which clips and adds noise around it —
and then runs mutual KD between the LLM and the aggregated SLM on the auxiliary data; what it
returns is the adapter broadcast next round (`configure_fit` sends each client what brings it
there: under a lossy transport, the changes since what it holds, federated/reference.py).
`evaluate` scores the global SLM and the LLM after every round (round 0 is zero-shot), writes
the round's metrics line and a checkpoint.

A round with fewer than `min_clients` valid updates (clients crashed, timed out, were
rejected, or SecAgg+ halted below its threshold) keeps the previous global adapter, is logged
with its reasons, and ends the run cleanly: the remaining rounds select no clients, and the
server writes its outputs from the last good state.

Resuming: Flower numbers the rounds of a run from 1, so a run resumed after round r adds r
(`offset`) wherever the round number matters (seeds, metrics, checkpoints).

Waiting: a round waits at most `round_timeout` for all num_clients to be connected, then goes
on with those that are, if they are at least min_clients (Flower's own wait is 24 hours).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg, Strategy
from flwr.server.strategy.aggregate import aggregate

from fedcollm import checkpoint, components
from fedcollm.config import Config
from fedcollm.crash import maybe_kill
from fedcollm.errors import FedCoLLMError
from fedcollm.eval import scoring
from fedcollm.eval.mcq import auto_batch_size
from fedcollm.federated import privacy, reference, secagg, transport
from fedcollm.federated.validate import update_problem
from fedcollm.models.lora import adapter_state, adapter_to_ndarrays, frozen_a_digest, load_adapter_ndarrays
from fedcollm.progress import progress_bar
from fedcollm.report import Recorder
from fedcollm.train.distill import mutual_distill
from fedcollm.train.memory import OutOfMemory, out_of_memory_advice, scoring_advice, training_advice


def _mean_bytes(per_node: dict[int, int]) -> float:
    return float(np.mean(list(per_node.values()))) if per_node else 0.0


def _client_id(proxy, res) -> dict:
    return {"client": res.metrics.get("partition"), "node": getattr(proxy, "node_id", None)}


def max_client_examples(cfg: Config, data: components.ServerData) -> int:
    """The cap on a client's claimed example count (its FedAvg weight, SecAgg+'s max_weight)."""
    if cfg.federation.max_client_examples:
        return cfg.federation.max_client_examples
    if data.client_sizes is None:
        raise FedCoLLMError("config: federation.max_client_examples must be set when the server has only "
                            "data.aux_file (it cannot derive the largest client part)")
    return max(data.client_sizes)


class Averager(FedAvg):
    """Sampling and the mean of the (already validated) client adapters: FedAvg's example
    weights, or equal weights under differential privacy. This is the strategy Flower's DP
    wrappers wrap: they clip around it and add noise to what it returns."""

    def __init__(self, decode, uniform: bool, **kwargs):
        super().__init__(**kwargs)
        self.decode, self.uniform = decode, uniform

    def aggregate_fit(self, server_round, results, failures):
        pairs = [(self.decode(res), 1 if self.uniform else res.num_examples) for _, res in results]
        return ndarrays_to_parameters(aggregate(pairs)), {}


class FedCoLLMStrategy(Strategy):
    def __init__(self, cfg: Config, recorder: Recorder, grid=None, resume: dict | None = None):
        super().__init__()
        self.offset = resume["round"] if resume else 0
        self.resumed = resume is not None  # also after round 0, where offset is 0
        self.cfg = cfg
        self.recorder = recorder
        self.grid = grid  # a CountingGrid, read after each round
        self.device = components.device_of(cfg)
        self.data = components.server_data(cfg)
        self.privacy = privacy.resolve(cfg)
        # Under DP every client weighs 1 (SecAgg+'s max_weight too); else its example count, capped.
        self.max_examples = 1 if self.privacy else max_client_examples(cfg, self.data)
        # Under DP, clipping to C bounds every update (server-side mode clips after this check).
        self.max_update_norm = float("inf") if self.privacy else cfg.federation.max_update_norm
        f = cfg.federation
        # Under SecAgg+: the unit clients hand it their values in, multiplied back on the mean.
        self.secagg_scale = secagg.value_scale(cfg, self.max_examples) if f.secure_aggregation else 1.0
        self.averager = Averager(
            self._decode, uniform=self.privacy is not None,
            fraction_fit=f.fraction_fit, fraction_evaluate=0.0, min_fit_clients=f.min_clients,
            min_available_clients=f.min_clients, min_evaluate_clients=0,
            on_fit_config_fn=lambda rnd: {"round": rnd + self.offset, "max_examples": self.max_examples,
                                          "uniform_weights": self.privacy is not None,
                                          **({secagg.SCALE: self.secagg_scale} if f.secure_aggregation else {}),
                                          # only when there is one: a run with A trained sends what it did
                                          **({"frozen_a": self.frozen_a} if self.frozen_a else {})})
        self.aggregator = privacy.wrap(self.averager, self.privacy)
        # No KD (the FedAvg baseline): the server holds no LLM at all.
        self.llm = components.build_llm(cfg) if cfg.distill.enabled else None
        self.slm = components.build_slm(cfg)
        self.frozen_a = frozen_a_digest(self.slm)  # lora.freeze_a: clients check theirs against it
        if resume:
            from peft import set_peft_model_state_dict  # noqa: PLC0415

            set_peft_model_state_dict(self.slm, resume["slm"])
            if self.llm is not None:
                set_peft_model_state_dict(self.llm, resume["llm"])
            torch.set_rng_state(resume["torch_rng"])  # for any draw that is not seeded per round
        # The adapter the clients hold, and the changes that bring each one up to date. The SLM
        # itself is the server's own adapter: under a lossy transport it keeps what the rounding
        # of the last broadcast left out, to send with the next change (federated/reference.py).
        held = None
        if resume:  # a checkpoint from before the server kept both holds the reference as its SLM
            held = ([t.numpy() for t in resume["reference"]] if "reference" in resume
                    else adapter_to_ndarrays(self.slm))
        self.reference = reference.ServerReference(cfg.transport_mode(), held)
        self.round_stats: dict = {}
        self.stopped: str | None = None  # why the run ended early, if it did
        self.failed_round: int | None = None
        self.aggregated = False  # this round produced a global adapter
        self.sampled = 0  # clients asked to fit this round
        self.sent_whole = 0  # of them, sent the adapter whole rather than changes
        self.round_t0 = time.time()
        self.last_items: dict = {}  # per-item correctness of the last scoring (paired tests)
        self.rounds_bar = progress_bar(cfg.federation.rounds, "rounds", cfg.run.progress, initial=self.offset,
                                       unit="round", leave=True)

    def __repr__(self) -> str:
        return f"FedCoLLMStrategy({self.aggregator!r} + server mutual KD)"

    def _broadcast(self):
        """The new global adapter as the clients will hold it (fp32; `configure_fit` encodes)."""
        return ndarrays_to_parameters(self.reference.publish(adapter_to_ndarrays(self.slm)))

    def _decode(self, res) -> list[np.ndarray]:
        """A client's adapter (with SecAgg+: the mean adapter), fp32, from what it sent."""
        arrays, mode = parameters_to_ndarrays(res.parameters), self.cfg.transport_mode()
        if self.cfg.federation.secure_aggregation:  # the unmasked aggregate, made on this server
            arrays = [(a * self.secagg_scale).astype(np.float32) for a in arrays]
        else:
            arrays = transport.decode(arrays, mode)
        return reference.restore(arrays, self.reference.held, mode)

    def initialize_parameters(self, client_manager):
        if self.resumed:  # the clients held this R when the run stopped; θ − R goes with the next change
            return ndarrays_to_parameters(self.reference.held)
        return self._broadcast()

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []  # the server scores the global models itself (evaluate)

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def configure_fit(self, server_round, parameters, client_manager):
        if self.stopped:
            return []
        self.round_t0 = time.time()  # for the row's fit_s (clients' work, as the server waits) and round_s
        k, f = self.cfg.data.num_clients, self.cfg.federation
        if not client_manager.wait_for(k, timeout=max(1, int(f.round_timeout))):
            print(f"[fedcollm] round {server_round + self.offset}: {client_manager.num_available()} of {k} "
                  f"clients connected within federation.round_timeout = {f.round_timeout:g} s", flush=True)
        if client_manager.num_available() < f.min_clients:
            self.stopped = (f"{client_manager.num_available()} clients connected, fewer than "
                            f"federation.min_clients = {f.min_clients}")
            self.sampled = 0
            return []
        instructions = []
        for proxy, ins in self.aggregator.configure_fit(server_round, parameters, client_manager):
            arrays, meta = self.reference.message(proxy.node_id)  # per node: what it holds differs
            instructions.append((proxy, FitIns(ndarrays_to_parameters(arrays), {**ins.config, **meta})))
        self.sampled = len(instructions)
        # Under a lossy transport, clients sent the adapter whole (fp32) as they held no recent
        # version (new, resumed server, or no reply last round): why a round's downlink grew.
        self.sent_whole = sum(1 for _, ins in instructions if not ins.config[reference.STEPS])
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        rnd = server_round + self.offset
        held = self.reference.held
        accepted, rejected = [], []  # accepted: (proxy, res, fp32 arrays)
        for proxy, res in results:
            self.reference.confirm(proxy.node_id)  # it replied: it holds this round's reference
            try:
                arrays = self._decode(res)
                problem = update_problem(arrays, held, res.num_examples, self.max_update_norm, self.max_examples)
            except ValueError as e:
                problem = str(e)
            if problem:
                rejected.append({**_client_id(proxy, res), "reason": problem})
            else:
                accepted.append((proxy, res, arrays))
        # Arrival order varies from run to run; summing in client order keeps FedAvg bit-exact.
        accepted.sort(key=lambda a: (a[1].metrics.get("partition", -1), getattr(a[0], "node_id", 0)))
        stats: dict = {"clients_ok": len(accepted), "clients_failed": self.sampled - len(results),
                       "rejected": rejected, "fit_s": time.time() - self.round_t0}
        if reference.sends_changes(self.cfg.transport_mode()):
            stats["sent_whole"] = self.sent_whole
        self.round_stats = stats
        for r in rejected:
            print(f"[fedcollm] round {rnd}: rejected the update of client {r['client']} "
                  f"(node {r['node']}): {r['reason']}", flush=True)
        if len(accepted) < self.cfg.federation.min_clients:
            self.stopped = (f"{len(accepted)} valid client updates, fewer than federation.min_clients = "
                            f"{self.cfg.federation.min_clients}")
            return None, {}
        if self.privacy and len(accepted) < self.privacy.clients_per_round:
            self.stopped = (f"{len(accepted)} valid client updates; differential privacy averages exactly the "
                            f"{self.privacy.clients_per_round} sampled clients its noise is calibrated for")
            return None, {}
        losses = [(r.num_examples, r.metrics.get("loss", float("nan"))) for _, r, _ in accepted]
        stats["client_loss"] = sum(w * x for w, x in losses) / sum(w for w, _ in losses)
        stats["client_examples"] = [r.num_examples for _, r, _ in accepted]
        stats["client_devices"] = sorted({str(r.metrics["device"]) for _, r, _ in accepted if "device" in r.metrics})
        if self.cfg.federation.secure_aggregation:  # values the clients clipped to SecAgg+'s range
            stats["secagg_clipped"] = sum(int(r.metrics.get("secagg_clipped", 0)) for _, r, _ in accepted)
            stats["secagg_peak"] = max(float(r.metrics.get("secagg_peak", 0.0)) for _, r, _ in accepted)
            if stats["secagg_clipped"]:
                print(f"[fedcollm] round {rnd}: clients clipped {stats['secagg_clipped']} values to secure "
                      f"aggregation's range ±{self.cfg.federation.secagg_clipping_range:g} (unit "
                      f"{self.secagg_scale:.3g}; largest {stats['secagg_peak']:.4g})", flush=True)
        if not self.cfg.federation.secure_aggregation:  # ‖θ_k − θ_global‖ per client (e.g. to choose a DP clip)
            stats["update_norms"] = [float(np.sqrt(sum(np.sum(np.square(a.astype(np.float64) - g))
                                                       for a, g in zip(arrays, held)))) for _, _, arrays in accepted]
        # Flower's FedAvg arithmetic on the decoded fp32 updates; under DP, Flower's wrapper clips
        # (server-side mode) and adds its noise, drawn from numpy's global RNG: seeded per round.
        if self.privacy:
            np.random.seed((self.cfg.run.seed * 7919 + rnd) % 2**32)
        mean, _ = self.aggregator.aggregate_fit(server_round, [(p, r) for p, r, _ in accepted], failures)
        if mean is None:  # Flower's DP wrappers refuse a round in which a client failed
            self.stopped = (f"{len(failures)} client(s) failed; differential privacy averages exactly the "
                            f"{self.privacy.clients_per_round} sampled clients its noise is calibrated for")
            return None, {}
        # θ_server + the mean change (the mean restored against R, plus θ_server − R).
        load_adapter_ndarrays(self.slm, reference.carry(parameters_to_ndarrays(mean), adapter_to_ndarrays(self.slm),
                                                        held, self.cfg.transport_mode()))
        if self.privacy:
            stats["epsilon"] = self.privacy.epsilon_after(rnd)
        self.aggregated = True
        if self.llm is None:
            return self._broadcast(), {}
        t1 = time.time()
        maybe_kill("kd", rnd)  # tests: a crash in the middle of the server's round
        llm_before = adapter_to_ndarrays(self.llm)
        try:
            with out_of_memory_advice(f"the server's mutual KD on {self.device}",
                                      training_advice("distill", self.cfg.distill.batch_size)):
                kd = mutual_distill(
                    self.llm, self.slm, self.data.aux, self.cfg.distill, seed=self.cfg.run.seed * 7919 + rnd,
                    device=self.device, maps=components.vocab_maps(self.cfg), progress=self.cfg.run.progress)
        except OutOfMemory as e:  # part-way through: both adapters half-trained
            return self._end_on_last_good_state(llm_before, str(e))
        stats.update({f"kd_{k}": v for k, v in kd.items()})
        stats["kd_s"] = time.time() - t1
        diverged = [name for name, model in (("LLM", self.llm), ("SLM", self.slm))  # checked where they are
                    if not all(torch.isfinite(t).all() for t in adapter_state(model).values())]
        if diverged:  # NaN adapters would score as if they were models
            return self._end_on_last_good_state(llm_before, (
                f"the server's mutual KD diverged: the {' and '.join(diverged)} adapter holds NaN or Inf "
                f"(KD losses {', '.join(f'{k} {v:.4g}' for k, v in kd.items() if k != 'steps')}); "
                f"lower distill.lr = {self.cfg.distill.lr:g}"))
        return self._broadcast(), {}

    def _end_on_last_good_state(self, llm_before: list, reason: str) -> tuple[None, dict]:
        """Fail this round and stop the run on the state the last round ended with (the LLM's
        adapter from before this round's KD, the SLM's as the clients hold it): what is saved,
        scored and resumed from."""
        load_adapter_ndarrays(self.llm, llm_before)
        self.hold_reference()
        self.aggregated = False
        components.release_cached_memory()
        self.stopped = reason
        return None, {}

    def evaluate(self, server_round, parameters):
        rnd = server_round + self.offset
        if server_round == 0 and self.resumed:
            return None  # the resumed state was recorded (and scored) before the interruption
        if server_round > 0 and not self.aggregated:
            if self.failed_round is None:  # this round produced no aggregate: log it once
                # (SecAgg+ that halts below its threshold never calls aggregate_fit)
                self.stopped = self.stopped or (
                    "secure aggregation halted: fewer clients survived than its reconstruction threshold")
                self.failed_round = rnd
                self.recorder.add_failed_round(
                    {"round": rnd, "failed": self.stopped, **self.round_stats, **self._take_traffic()})
            self.round_stats = {}
            return None
        self.aggregated = False
        row = {"round": rnd, **(self._score(rnd) if self._scored(rnd) else {}), **self.round_stats,
               **(self._take_traffic() if server_round else {})}
        if server_round:
            row["round_s"] = time.time() - self.round_t0
        self.round_stats = {}
        self.recorder.add_round(row)
        llm_state = adapter_state(self.llm) if self.llm is not None else {}
        checkpoint.save(self.recorder.out, rnd, self.cfg.digest(), adapter_state(self.slm), llm_state,
                        self.recorder.rows, reference=self.reference.held)
        self.rounds_bar.update(1 if server_round else 0)
        components.release_cached_memory()  # the clients train next, on the same GPU
        return 0.0, {}

    def hold_reference(self) -> None:
        """Make the SLM what the clients hold (the reference), for the run's saved adapter: the
        one it scored. (The server's own adapter differs by the last broadcast's rounding.)"""
        load_adapter_ndarrays(self.slm, self.reference.held)

    def score_last_state(self) -> None:
        """Score the state the run ends with where this process has not: a run that stopped early
        between scored rounds, or one resumed after its last round (cut short while writing its
        outputs): its row holds the scores but not which items each model got right, which the
        paired tests need. Scoring the same adapters again gives the same scores."""
        rows = self.recorder.rows
        if rows and ("slm" not in rows[-1] or not self.last_items):
            self.recorder.replace_last({**rows[-1], **self._score(rows[-1]["round"])})

    def _scored(self, rnd: int) -> bool:
        every = self.cfg.run.eval_every
        return rnd == self.cfg.federation.rounds or (every > 0 and rnd % every == 0)

    def _score(self, rnd: int) -> dict:
        """Accuracy (or, on prompt-completion data, loss and perplexity) of the global SLM and (if
        the server has one) the LLM; `llm` is None without.

        What each item scored (which items each model got right, or each item's loss) is kept
        (`last_items`) for the summary, not the row."""
        t0 = time.time()
        kw = dict(batch_size=self.cfg.run.eval_batch_size, device=self.device, progress=self.cfg.run.progress)
        models = {"slm": self.slm, **({"llm": self.llm} if self.llm is not None else {})}
        own = adapter_to_ndarrays(self.slm)
        self.hold_reference()  # the clients' SLM is the one scored: R, as the transport rounded it
        with out_of_memory_advice(f"round {rnd}: scoring on {self.device}",
                                  scoring_advice(auto_batch_size(self.cfg.run.eval_batch_size, self.device))):
            scores = {name: scoring.score(model, components.tokenizer(self.cfg, name), self.data.evals,
                                          self.data.eval_requests[name], desc=f"eval {name.upper()} r{rnd}", **kw)
                      for name, model in models.items()}
        load_adapter_ndarrays(self.slm, own)
        self.last_items = {"round": rnd, "ids": [r.id for r in self.data.evals],
                           **{m: {k: s[k] for k in scoring.items_of(s)} for m, s in scores.items()}}
        row = {m: {k: s[k] for k in (*scoring.metrics_of(s), "n")} for m, s in scores.items()}
        return {"slm": row["slm"], "llm": row.get("llm"), "eval_s": time.time() - t0}

    def _take_traffic(self) -> dict:
        if self.grid is None:
            return {}
        down, up, drops = self.grid.take()
        return {"bytes_down_per_client": _mean_bytes(down), "bytes_up_per_client": _mean_bytes(up),
                "dropped": drops}
