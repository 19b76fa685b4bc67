"""The client: local answer-only SFT of the SLM adapter on its own private part."""

from __future__ import annotations

import sys

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as SECAGG_CONFIGS

from fedcollm import components
from fedcollm.config import Config
from fedcollm.errors import FedCoLLMError
from fedcollm.federated import privacy, reference, secagg, transport
from fedcollm.federated.app_config import config_from_run_config
from fedcollm.models.lora import adapter_to_ndarrays, frozen_a_digest, load_adapter_ndarrays
from fedcollm.train.sft import sft


def in_simulation() -> bool:
    """True inside a Ray actor of Flower's simulation (SuperNodes run no Ray)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


class SLMClient(NumPyClient):
    def __init__(self, cfg: Config, partition_id: int, train_file: str = "", state: RecordDict | None = None):
        self.cfg = cfg
        self.partition_id = partition_id
        self.train_file = train_file  # node-config train-file: this client's own data
        # The node's context.state: keeps the global adapter between rounds (federated/reference.py).
        self.state = state if state is not None else RecordDict()

    def examples(self):
        if self.train_file:
            return components.own_examples(self.cfg, self.train_file)
        return components.client_examples(self.cfg, self.partition_id)

    def fit(self, parameters, config):
        cfg = self.cfg
        if in_simulation():  # an actor's share of the host; a SuperNode keeps all of its cores
            torch.set_num_threads(cfg.federation.client_cpus)
        model = components.cached_client_slm(cfg)
        examples = self.examples()
        # Its FedAvg weight: its example count, or 1 for every client under differential privacy.
        weight = 1 if config.get("uniform_weights") else len(examples)
        cap = int(config.get("max_examples", 0))
        if cap and weight > cap:  # the server would reject (or SecAgg+ overflow) this weight
            raise FedCoLLMError(f"client {self.partition_id}: {weight} training examples exceed the "
                                f"server's federation.max_client_examples = {cap}")
        mine, servers = frozen_a_digest(model), str(config.get("frozen_a", ""))
        if mine != servers:  # B trained against another A would average into nonsense
            raise FedCoLLMError(
                f"client {self.partition_id}: its frozen LoRA A (digest {mine or 'none: A trains'}) is not the "
                f"server's ({servers or 'none: A trains'}); lora.freeze_a, run.seed and the torch version must match")
        mode = cfg.transport_mode()
        held = reference.receive(parameters, config, self.state, mode, f"client {self.partition_id}")
        load_adapter_ndarrays(model, held)
        rnd = int(config.get("round", 0))
        seed = cfg.run.seed * 1_000_003 + rnd * 1009 + self.partition_id
        torch.manual_seed(seed)  # LoRA dropout: same run, same seed, same adapter
        stats = sft(model, examples, epochs=cfg.client.local_epochs, lr=cfg.client.lr,
                    batch_size=cfg.client.batch_size, pad_id=components.pad_id(cfg, "slm"),
                    seed=seed, device=components.device_of(cfg), weight_decay=cfg.client.weight_decay,
                    progress=cfg.run.progress, desc=f"client {self.partition_id} round {rnd}",
                    micro_batch_size=cfg.client.micro_batch_size)
        arrays = adapter_to_ndarrays(model)
        components.release_cached_memory()  # idle until next round: the GPU's memory serves others
        print(f"[fedcollm] client {self.partition_id} round {rnd}: {stats['steps']} steps, "
              f"loss {stats['loss']:.3f} on {components.device_of(cfg)}", flush=True)
        metrics = {"loss": float(stats["loss"]), "steps": int(stats["steps"]), "partition": self.partition_id,
                   "device": str(components.device_of(cfg)), "examples": len(examples)}
        wire = transport.encode(reference.uplink(arrays, held, mode), mode)
        if cfg.federation.secure_aggregation:
            # SecAgg+ quantizes in the input's dtype (fp16 overflows) and sums across clients
            # (int8's and int4's per-client scales cannot be summed): hand it the values the
            # transport would deliver (the change, for a lossy one), in fp32, in the server's
            # unit and range (federated/secagg.py). Its own masked integers are what travels.
            who = f"client {self.partition_id}"
            secagg.check_weight(weight, cap or weight, cfg.secagg_levels(), who)
            wire, metrics["secagg_clipped"], metrics["secagg_peak"] = secagg.to_secagg_units(
                transport.decode(wire, mode), float(config.get(secagg.SCALE, 1.0)),
                cfg.federation.secagg_clipping_range, who)
            # SecAgg+ rounds stochastically with numpy's global RNG right after this returns.
            np.random.seed(seed % 2**32)
        return wire, weight, metrics


def secure_aggregation_mod(msg, context, call_next):
    """Hand SecAgg+ stages to Flower's secaggplus_mod; plain rounds pass straight through.

    (secaggplus_mod itself fails on a message without SecAgg+ configs.)
    """
    if SECAGG_CONFIGS in msg.content.config_records:
        reply = secaggplus_mod(msg, context, call_next)
        secagg.pack_masked_vectors(reply)  # the bits the modulus needs, losslessly (federated/secagg.py)
        return reply
    return call_next(msg, context)


def partition_of(context, num_clients: int) -> int:
    pid = int(context.node_config.get("partition-id", 0))
    if not 0 <= pid < num_clients:
        raise ValueError(f"node-config partition-id={pid} is outside 0..{num_clients - 1}")
    return pid


def make_client_app(cfg: Config | None = None, extra_mods=()) -> ClientApp:
    """A ClientApp bound to `cfg`, or (None) reading it from the run config (`flwr run`).

    extra_mods run outermost (tests use one to inject faults at a given protocol stage).
    privacy.clipping_mod clips only when the server's DP wrapper asks it to (fit config).
    """

    def client_fn(context):
        c = cfg or config_from_run_config(context.run_config)
        own = str(context.node_config.get("train-file", ""))
        return SLMClient(c, partition_of(context, c.data.num_clients), own, context.state).to_client()

    # Order matters: DP clipping acts on the update before SecAgg+ masks it.
    return ClientApp(client_fn=client_fn, mods=[*extra_mods, secure_aggregation_mod, privacy.clipping_mod])


app = make_client_app()
